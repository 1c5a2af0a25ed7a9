"""Cross-entropy over logits whose vocabulary is split over the group (never gathered).

Same value and gradient as ``F.cross_entropy(full_logits, target, ignore_index=...,
label_smoothing=..., reduction=...)`` with the full logits = the shards concatenated in rank
order (a column-parallel output layer without ``gather_output``). Per token:
``lse = log sum_v exp(z_v)`` via a max all-reduce and one sum all-reduce carrying the exp-sum, the
target logit (from the rank that holds it) and, with smoothing, the logit sum, so the whole loss
costs two small all-reduces whatever the vocabulary size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..distributed import collectives as C
from ..distributed._state import ContextLike, group_info
from ..errors import ParallelCtxError
from ..mode import ParallelMode


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                                 label_smoothing: float = 0.0, reduction: str = "mean", *,
                                 mode: "ParallelMode | str" = ParallelMode.TENSOR,
                                 context: ContextLike | None = None) -> torch.Tensor:
    """Cross-entropy of ``logits`` (..., vocab/n), this rank's vocabulary slice, and ``target``
    (...,) global class ids. ``reduction``: 'mean' (over non-ignored tokens), 'sum' or 'none'."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r} is not a reduction; use 'mean', 'sum' or 'none'")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1] (the share of the target's "
                         f"probability spread over the vocabulary); use e.g. 0.0 (none) or 0.1")
    g = group_info(mode, context)
    local_vocab = logits.shape[-1]
    vocab = local_vocab * g.size
    start = g.rank * local_vocab
    # Half-precision logits: the exp-sum over a large vocabulary needs float32 (as Megatron does).
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    z = z.reshape(-1, local_vocab)
    t = target.reshape(-1)
    if t.shape[0] != z.shape[0]:
        raise ParallelCtxError(
            f"target has {t.shape[0]} entries for {z.shape[0]} rows of logits (logits {tuple(logits.shape)}, "
            f"target {tuple(target.shape)}); there must be one class id per row, i.e. target.shape == "
            f"logits.shape[:-1]. Fix: pass the target of the same batch/sequence slice as the logits (with sequence "
            f"parallelism, this rank's slice of the target too)"
        )
    valid = t != ignore_index
    if bool(((t < 0) | (t >= vocab))[valid].any()):
        bad = t[valid & ((t < 0) | (t >= vocab))]
        shown = ", ".join(map(str, torch.unique(bad).tolist()[:8]))
        raise ParallelCtxError(
            f"target holds id(s) {shown} outside [0, {vocab}): the full vocabulary is {local_vocab} ids per rank x "
            f"{g.size} ranks of {g.mode!r} = {vocab}, and every target id must be in it or equal ignore_index="
            f"{ignore_index}. Fix: build the head with the data's vocab_size, or mark padding with ignore_index"
        )

    with torch.no_grad():  # the shift cancels exactly in the loss: no gradient flows through it
        shift = z.max(dim=-1).values
        if g.size > 1:
            dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=g.group)
    shifted = z - shift.unsqueeze(-1)
    mine = valid & (t >= start) & (t < start + local_vocab)
    local_t = (t - start).masked_fill(~mine, 0)
    picked = shifted.gather(1, local_t.unsqueeze(1)).squeeze(1).masked_fill(~mine, 0.0)
    parts = [shifted.exp().sum(-1), picked]
    if label_smoothing > 0:
        parts.append(shifted.sum(-1))
    summed = C.reduce(torch.stack(parts), mode, context=context)  # one all-reduce for all of them
    lse = summed[0].log()
    loss = lse - summed[1]
    if label_smoothing > 0:
        loss = (1 - label_smoothing) * loss + label_smoothing * (lse - summed[2] / vocab)
    loss = loss.masked_fill(~valid, 0.0)
    if reduction == "none":
        out = loss.reshape(target.shape)
    elif reduction == "sum":
        out = loss.sum()
    else:
        out = loss.sum() / valid.sum()  # all ignored: nan, like torch
    return out.to(logits.dtype)


class VocabParallelCrossEntropy(torch.nn.Module):
    """Module form of :func:`vocab_parallel_cross_entropy`."""

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean", *,
                 mode: "ParallelMode | str" = ParallelMode.TENSOR, context: ContextLike | None = None) -> None:
        super().__init__()
        self.ignore_index, self.label_smoothing, self.reduction = ignore_index, label_smoothing, reduction
        self.mode, self._context = mode, context

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, target, self.ignore_index, self.label_smoothing,
                                            self.reduction, mode=self.mode, context=self._context)
