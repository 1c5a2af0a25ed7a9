"""Gradient norm and clipping across model shards (docs/traps.md #8).

Lightning's precision plugin clips with ``torch.nn.utils.clip_grad_norm_`` over the parameters of
one rank. With tensor/pipeline/expert sharding each rank then sees only part of the model and
clips by a different norm, so replicas drift apart and nothing matches a single-process run.
Here every piece of the full model is counted exactly once over the whole world
(:func:`lightning_parallelctx.dtensor.counts_in_norm`): tensor-parallel shards on every TENSOR rank,
expert shards on every EXPERT rank, pipeline stages on every stage, DTensor shards (tensor
parallelism, FSDP2) wherever their placements shard them, and replicas only at coordinate 0. One
all-reduce of one scalar over the world then gives the full model's norm on every rank.

DTensor gradients are read through their local tensors: ``DTensor.norm()``/``full_tensor()`` run
collectives, and with a mix of meshes (or of DTensor and plain parameters) the ranks would run
different ones and hang (docs/traps.md #27). Here every rank runs the same single all-reduce, whatever
it holds. Gradients must already be synchronised over the data replicas (they are identical there;
FSDP2's are reduce-scattered).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist

from ..context import ParallelContext
from ..dtensor import counts_in_norm, is_dtensor, local


def _owned_grads(params: Iterable[torch.Tensor], ctx: ParallelContext) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(every local gradient, the local gradients this rank counts in the norm)."""
    every, owned = [], []
    seen: set[int] = set()
    for i, p in enumerate(params):
        if p.grad is None or id(p) in seen:  # tied weights appear twice in some param lists
            continue
        seen.add(id(p))
        grad = _without_partial(p.grad)
        every.append(local(p.grad))
        if getattr(p, "_pctx_tied_copy", False):  # a pipeline stage's copy of a tied weight: counted once, on its owner
            continue
        if counts_in_norm(p, ctx, name=f"parameter #{i} {tuple(p.shape)}", grad=grad):
            owned.append(local(grad))
    return every, owned


def _without_partial(grad: torch.Tensor) -> torch.Tensor:
    # A Partial placement holds unsummed contributions: sum them (for the norm only) with one
    # collective that every rank of that mesh dim runs too, since they all hold this parameter.
    if not is_dtensor(grad) or not any(pl.is_partial() for pl in grad.placements):  # type: ignore[attr-defined]
        return grad
    from torch.distributed.tensor import Replicate

    return grad.redistribute(grad.device_mesh,  # type: ignore[attr-defined]
                             [Replicate() if pl.is_partial() else pl for pl in grad.placements])  # type: ignore[attr-defined]


@torch.no_grad()
def grad_norm(parameters: Iterable[torch.Tensor], ctx: ParallelContext, norm_type: float = 2.0) -> torch.Tensor:
    """The ``norm_type`` norm of the gradients of the whole (unsharded) model, on every rank."""
    _, owned = _owned_grads(parameters, ctx)
    return _reduce_norm(owned, ctx, float(norm_type))


def _reduce_norm(owned: list[torch.Tensor], ctx: ParallelContext, norm_type: float) -> torch.Tensor:
    # Over the world, not 'model_parallel': DTensor shards (FSDP2) differ across data ranks too.
    talk = ctx.get_world_size() > 1
    device = owned[0].device if owned else torch.device("cpu")
    if math.isinf(norm_type):
        local_max = torch.stack([g.detach().abs().max().float() for g in owned]).max() if owned else torch.zeros((), device=device)
        if talk:
            dist.all_reduce(local_max, op=dist.ReduceOp.MAX)
        return local_max
    total = (
        torch.stack([torch.linalg.vector_norm(g.detach().float(), norm_type) ** norm_type for g in owned]).sum()
        if owned else torch.zeros((), device=device)
    )
    if talk:
        dist.all_reduce(total)
    return total ** (1.0 / norm_type)


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, ctx: ParallelContext,
                    norm_type: float = 2.0) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a sharded model: scale every gradient by
    ``max_norm / (total_norm + 1e-6)`` (if below 1), where ``total_norm`` is the full model's norm.
    Returns the total norm."""
    every, owned = _owned_grads(parameters, ctx)
    total = _reduce_norm(owned, ctx, float(norm_type))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    if every:
        torch._foreach_mul_(every, coef.to(every[0].device))
    return total
