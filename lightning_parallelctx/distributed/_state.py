"""The group a collective talks over (resolved from the current context) and the torchshard-style
queries. Which context is current is owned by :mod:`lightning_parallelctx.current`."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Union

from ..current import ContextLike, LocalContext, current_context, set_current_context  # noqa: F401
from ..errors import ParallelCtxError
from ..mode import ParallelMode, mode_name

#: A mode as every call accepts it: the enum member or its string value.
ModeArg = Union[ParallelMode, str]


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


def _lookup(ctx: ContextLike, mode: ModeArg) -> GroupInfo:
    size = ctx.get_world_size(mode)
    if size == 1:  # check before get_group: ParallelContext makes size-1 groups lazily
        return GroupInfo(1, 0, None, mode_name(mode))
    return GroupInfo(size, ctx.get_local_rank(mode), ctx.get_group(mode), mode_name(mode))


#: context -> {mode argument as given -> GroupInfo}. A context's modes and groups are fixed when it
#: is built, so the answer never changes while it lives; asking the context every call (mode-name
#: normalisation, rank lookups, the group factory, dist.get_rank) cost ~10 us per collective, as
#: much as a 64 KiB gloo call. Weak keys: a destroyed, dropped context takes its entries with it.
_CACHE: "weakref.WeakKeyDictionary[Any, dict[Any, GroupInfo]]" = weakref.WeakKeyDictionary()


#: The last context looked up (weakly) and its entry in _CACHE: nearly every call asks about the
#: same context, and this answers it with one weakref call and one dict lookup instead of
#: WeakKeyDictionary.get()'s Python frames.
#: One tuple, replaced whole: a thread reads the reference and the entry of the same context.
#: The reference's callback empties it when that context is collected, so it never keeps a dead
#: context's groups alive.
_LAST: "tuple[Any, dict[Any, GroupInfo] | None]" = (None, None)


def _forget(ref: "weakref.ref[Any]") -> None:
    global _LAST
    if _LAST[0] is ref:
        _LAST = (None, None)


def group_info(mode: ModeArg, context: "ContextLike | None" = None) -> GroupInfo:
    global _LAST
    # current.py owns which context is current; resolve() would only add a frame for context=None.
    ctx = current_context() if context is None else resolve(context)  # raises for a destroyed explicit one
    try:
        last_ref, last_entry = _LAST
        if last_ref is not None and last_ref() is ctx:
            info = last_entry.get(mode)
            if info is not None:
                return info
        per_ctx = _CACHE.get(ctx)
        if per_ctx is None:
            per_ctx = _CACHE[ctx] = {}
        info = per_ctx.get(mode)
        _LAST = (weakref.ref(ctx, _forget), per_ctx)
    except TypeError:  # a context-like object that cannot be weakly referenced, or an unhashable mode
        return _lookup(ctx, mode)
    if info is None:
        info = per_ctx[mode] = _lookup(ctx, mode)  # a bad mode raises here and is never cached
    return info


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
