"""Gradient norm and clipping across model shards (TRAPS.md #8).

Lightning's precision plugin clips with ``torch.nn.utils.clip_grad_norm_`` over the parameters of
one rank. With tensor/pipeline/expert sharding each rank then sees only part of the model and
clips by a different norm, so replicas drift apart and nothing matches a single-process run.
Here every parameter of the full model is counted exactly once: tensor-parallel shards on every
TENSOR rank, expert shards on every EXPERT rank, pipeline stages on every stage, and a parameter
replicated across TENSOR (or EXPERT) only on that group's first rank; one all-reduce over the
'model_parallel' group (TENSOR x PIPELINE x EXPERT) then gives the full model's norm everywhere.
Gradients must already be synchronised over the data replicas (they are identical there).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist

from ..context import ParallelContext
from ..markers import is_expert, is_tensor_parallel


def _owned_grads(params: Iterable[torch.Tensor], ctx: ParallelContext) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    first_tp = ctx.get_local_rank("tensor") == 0
    first_ep = ctx.get_local_rank("expert") == 0
    every, owned = [], []
    seen: set[int] = set()
    for p in params:
        if p.grad is None or id(p) in seen:  # tied weights appear twice in some param lists
            continue
        seen.add(id(p))
        every.append(p.grad)
        if getattr(p, "_pctx_tied_copy", False):  # a pipeline stage's copy of a tied weight: counted once, on its owner
            continue
        if (is_tensor_parallel(p) or first_tp) and (is_expert(p) or first_ep):
            owned.append(p.grad)
    return every, owned


@torch.no_grad()
def grad_norm(parameters: Iterable[torch.Tensor], ctx: ParallelContext, norm_type: float = 2.0) -> torch.Tensor:
    """The ``norm_type`` norm of the gradients of the whole (unsharded) model, on every rank."""
    _, owned = _owned_grads(parameters, ctx)
    return _reduce_norm(owned, ctx, float(norm_type))


def _reduce_norm(owned: list[torch.Tensor], ctx: ParallelContext, norm_type: float) -> torch.Tensor:
    group = ctx.get_group("model_parallel") if ctx.get_world_size("model_parallel") > 1 else None
    device = owned[0].device if owned else torch.device("cpu")
    if math.isinf(norm_type):
        local = torch.stack([g.detach().abs().max().float() for g in owned]).max() if owned else torch.zeros((), device=device)
        if group is not None:
            dist.all_reduce(local, op=dist.ReduceOp.MAX, group=group)
        return local
    local = (
        torch.stack([torch.linalg.vector_norm(g.detach().float(), norm_type) ** norm_type for g in owned]).sum()
        if owned else torch.zeros((), device=device)
    )
    if group is not None:
        dist.all_reduce(local, group=group)
    return local ** (1.0 / norm_type)


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
