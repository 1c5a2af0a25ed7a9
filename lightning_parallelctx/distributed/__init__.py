"""Collectives with autograd over any parallel mode's group, and the helpers built on them.

See :mod:`.collectives` for the forward/backward table and the uneven-size rules,
:mod:`._state` for how the current context is found.
"""

from ._comm import split_sizes
from ._state import (
    ContextLike,
    LocalContext,
    current_context,
    get_group,
    get_rank,
    get_world_size,
    is_initialized,
    set_current_context,
)
from .collectives import all_gather, all_to_all, copy, gather, reduce, reduce_scatter, scatter
from .expert import DispatchHandle, combine, dispatch
from .sequence import heads_to_sequence, sequence_to_heads, ulysses_attention

__all__ = [
    "ContextLike",
    "DispatchHandle",
    "LocalContext",
    "all_gather",
    "all_to_all",
    "combine",
    "copy",
    "current_context",
    "dispatch",
    "gather",
    "get_group",
    "get_rank",
    "get_world_size",
    "heads_to_sequence",
    "is_initialized",
    "reduce",
    "reduce_scatter",
    "scatter",
    "sequence_to_heads",
    "set_current_context",
    "split_sizes",
    "ulysses_attention",
]
