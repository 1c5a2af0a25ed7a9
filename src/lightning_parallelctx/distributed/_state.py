"""Which ParallelContext the collectives talk over, and the torchshard-style queries.

Collectives are called deep inside models, far from where the context was built, so they need a
"current" context. It is explicit and inspectable: ``set_current_context(ctx)`` (called by
``ParallelContext.__init__``), else the most recently built context that is still alive, else -
when ``torch.distributed`` is not running at all - a :class:`LocalContext` in which every mode
has size 1. Every public function also takes ``context=`` to bypass all of this.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Protocol, Union

import torch.distributed as dist

from ..errors import ParallelCtxError
from ..mode import ParallelMode, mode_name

#: A mode as every call accepts it: the enum member or its string value.
ModeArg = Union[ParallelMode, str]


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
    from ..context import _LIVE  # late import: context.py may import this package one day

    live = [c for c in list(_LIVE) if not c.is_destroyed]
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


def resolve(context: "ContextLike | None") -> ContextLike:
    if context is None:
        return current_context()  # type: ignore[return-value]
    if getattr(context, "is_destroyed", False):
        raise ParallelCtxError("the context passed as context= was destroyed; build a new one")
    return context


@dataclass(frozen=True)
class GroupInfo:
    """A mode's group as the communication code needs it (resolved once per call)."""

    size: int
    rank: int
    group: Any  # None for size 1: size-1 groups are never created just to be skipped
    mode: str


def group_info(mode: ModeArg, context: "ContextLike | None" = None) -> GroupInfo:
    ctx = resolve(context)
    size = ctx.get_world_size(mode)
    if size == 1:  # check before get_group: ParallelContext makes size-1 groups lazily
        return GroupInfo(1, 0, None, mode_name(mode))
    return GroupInfo(size, ctx.get_local_rank(mode), ctx.get_group(mode), mode_name(mode))


# ------------------------------------------------------------------ torchshard-style queries
def is_initialized() -> bool:
    """True when a live ParallelContext exists (the collectives then communicate)."""
    return not isinstance(current_context(required=False), (LocalContext, type(None)))


def get_rank(mode: ModeArg = ParallelMode.TENSOR, context: "ContextLike | None" = None) -> int:
    """This process's rank inside its group of ``mode`` (0 without a context)."""
    return resolve(context).get_local_rank(mode)


def get_world_size(mode: ModeArg = ParallelMode.TENSOR, context: "ContextLike | None" = None) -> int:
    """Size of this process's group of ``mode`` (1 without a context)."""
    return resolve(context).get_world_size(mode)


def get_group(mode: ModeArg = ParallelMode.TENSOR, context: "ContextLike | None" = None) -> Any:
    """The ``ProcessGroup`` of ``mode`` (None under a :class:`LocalContext`, which has no groups)."""
    ctx = resolve(context)
    return None if isinstance(ctx, LocalContext) else ctx.get_group(mode)
