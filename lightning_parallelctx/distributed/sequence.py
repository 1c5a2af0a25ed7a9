"""Ulysses (DeepSpeed) sequence parallelism: attention on the full sequence, heads split.

Each SEQUENCE rank holds a slice of the sequence. Before attention one all-to-all trades it for
all of the sequence and a slice of the heads; attention runs unchanged on those heads; a second
all-to-all trades back. Gradients flow through the inverse all-to-alls. Uneven sequence slices
(``torch.tensor_split`` or any other split) work: their sizes are exchanged once per call (or
given as ``seq_sizes``) and reused for every all-to-all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..mode import ParallelMode
from ._comm import normalize_dim
from ._state import ContextLike, group_info
from .collectives import all_to_all, resolve_sizes

_SEQ = ParallelMode.SEQUENCE


def sequence_to_heads(x: torch.Tensor, seq_dim: int = 1, head_dim: int = 2,
                      mode: "ParallelMode | str" = _SEQ, *, seq_sizes: "int | Sequence[int] | None" = None,
                      context: ContextLike | None = None) -> torch.Tensor:
    """(.., S/n, .., H, ..) sequence-split -> (.., S, .., H/n, ..) head-split (tensor_split of H)."""
    return all_to_all(x, head_dim, seq_dim, mode, gather_sizes=seq_sizes, context=context)


def heads_to_sequence(x: torch.Tensor, seq_dim: int = 1, head_dim: int = 2,
                      mode: "ParallelMode | str" = _SEQ, *, seq_sizes: "int | Sequence[int] | None" = None,
                      num_heads: int | None = None, context: ContextLike | None = None) -> torch.Tensor:
    """The inverse of :func:`sequence_to_heads`. ``seq_sizes`` is how the sequence is split
    (default: ``tensor_split`` of the full length); ``num_heads`` the full head count (default:
    exchanged)."""
    return all_to_all(x, seq_dim, head_dim, mode, scatter_sizes=seq_sizes, gather_sizes=num_heads,
                      context=context)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      attn_fn: Callable[..., torch.Tensor], *, seq_dim: int = 1, head_dim: int = 2,
                      mode: "ParallelMode | str" = _SEQ, seq_sizes: "int | Sequence[int] | None" = None,
                      context: ContextLike | None = None, **attn_kwargs: Any) -> torch.Tensor:
    """``attn_fn(q, k, v, **attn_kwargs)`` over the full sequence, for sequence-split q, k, v.

    q, k, v hold this rank's sequence slice along ``seq_dim`` and all heads along ``head_dim``
    (e.g. (batch, seq, heads, head_dim) with the defaults). ``attn_fn`` receives the full
    sequence and this rank's heads in the same layout and must return that layout (q's shape
    with v's last dim). Returns this rank's sequence slice of the output with all heads.
    For grouped-query attention the head counts of q and k/v must both divide by the group size.
    """
    g = group_info(mode, context)
    if g.size == 1:
        return attn_fn(q, k, v, **attn_kwargs)
    seq_dim = normalize_dim(seq_dim, q.dim(), "seq_dim")
    head_dim = normalize_dim(head_dim, q.dim(), "head_dim")
    # One exchange of the slice sizes serves all four all-to-alls; a full length (an int) is passed
    # on as it is, so an even split stays one int piece size with no list to build or check.
    sizes = seq_sizes if isinstance(seq_sizes, int) and not isinstance(seq_sizes, bool) else \
        resolve_sizes(seq_sizes, q.shape[seq_dim], g, q.device, "seq_sizes")
    qh, kh, vh = (sequence_to_heads(t, seq_dim, head_dim, mode, seq_sizes=sizes, context=context) for t in (q, k, v))
    out = attn_fn(qh, kh, vh, **attn_kwargs)
    return heads_to_sequence(out, seq_dim, head_dim, mode, seq_sizes=sizes, num_heads=q.shape[head_dim],
                             context=context)
