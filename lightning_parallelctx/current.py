"""Which ParallelContext is current: the set of live contexts and the explicit "current" pointer.

Collectives are called deep inside models, far from where the context was built, so they need a
"current" context. It is explicit and inspectable: ``set_current_context(ctx)`` (called by
``ParallelContext.__init__``), else the most recently built context that is still alive, else -
when ``torch.distributed`` is not running at all - a :class:`LocalContext` in which every mode
has size 1. Every public function of the collectives also takes ``context=`` to bypass all of this.

This module sits below both ``context.py`` (which registers every context it builds) and
``distributed/`` (which asks who is current), so neither imports the other.
"""

from __future__ import annotations

import weakref
from typing import Any, Protocol

import torch.distributed as dist

from .errors import ParallelCtxError
from .mode import ParallelMode, mode_name

#: Every ParallelContext built in this process and not yet destroyed (weakly held).
LIVE: "weakref.WeakSet[Any]" = weakref.WeakSet()


class ContextLike(Protocol):
    """What the collectives need from a context: ``ParallelContext`` and ``LocalContext`` have it."""

    def get_world_size(self, mode: Any = ...) -> int: ...
    def get_local_rank(self, mode: Any = ...) -> int: ...
    def get_group(self, mode: Any) -> Any: ...


class LocalContext:
    """A stand-in context in which every mode has size 1 and nothing is ever communicated.

    Used when ``torch.distributed`` is not initialised, and useful inside a distributed run to
    build the unsplit reference of a parallel model (``ColumnParallelLinear(..., context=LocalContext())``
    holds the full weight).
    """

    is_destroyed = False

    def get_world_size(self, mode: Any = ParallelMode.GLOBAL) -> int:
        mode_name(mode)  # validates the type, like a real context would
        return 1

    def get_local_rank(self, mode: Any = None) -> int:
        if mode is not None:
            mode_name(mode)
        return 0

    def get_group(self, mode: Any) -> Any:
        raise ParallelCtxError(
            f"LocalContext has no process groups (every mode has size 1, so {mode_name(mode)!r} needs no "
            f"communication); check get_world_size(mode) > 1 before asking for a group"
        )

    def get_ranks_in_group(self, mode: Any) -> list[int]:
        mode_name(mode)
        return [0]

    def __repr__(self) -> str:
        return "LocalContext()"


_current: "weakref.ref[Any] | None" = None


def set_current_context(ctx: "ContextLike | None") -> None:
    """Make ``ctx`` the context used by collectives and layers called without ``context=``.

    ``None`` clears it (the most recent live context is then used). Held by weak reference, so
    this never keeps a context (and its process groups) alive.
    """
    global _current
    _current = None if ctx is None else weakref.ref(ctx)


def _build_number(ctx: Any) -> int:
    # ParallelContext.build_id increases with every build in this process.
    return int(getattr(ctx, "build_id", -1))


def current_context(required: bool = True) -> "ContextLike | None":
    """The context collectives use by default.

    Order: the one given to :func:`set_current_context` if still alive; else the most recently
    built live ``ParallelContext``; else, if ``torch.distributed`` is not initialised (or has one
    process), a :class:`LocalContext`. Otherwise an error (or None with ``required=False``): with
    several processes and no context the groups are unknown, and guessing would be wrong.
    """
    ctx = _current() if _current is not None else None
    if ctx is not None and not getattr(ctx, "is_destroyed", False):
        return ctx
    live = [c for c in list(LIVE) if not c.is_destroyed]
    if live:
        return max(live, key=_build_number)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return _LOCAL
    if not required:
        return None
    raise ParallelCtxError(
        f"torch.distributed runs {dist.get_world_size()} processes but no live ParallelContext exists, "
        f"so the collectives do not know their groups. Fix: build one (ParallelContext.from_env(...)) "
        f"or pass context=... explicitly"
    )


_LOCAL = LocalContext()


