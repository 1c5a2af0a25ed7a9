"""Keeping replicated tensors equal, as DDP does: parameters at the start of fit, buffers before forwards.

DDP broadcasts parameters and buffers from rank 0 of its group when it wraps the model, and (with
``broadcast_buffers=True``, its default) the buffers again before every forward that follows a
synchronising training forward. Under a :class:`ParallelContext` "rank 0 of the group" becomes
"the first rank of each replica group": a tensor is only ever copied between ranks holding the same
shard of it, never across tensor-parallel or expert shards.

Who holds replicas of what:

- a parameter not marked tensor-parallel (LayerNorm, a row-parallel bias, the router of an MoE
  layer) is replicated over TENSOR as well as over its replica group, so at the start of fit it is
  first copied from the first TENSOR rank, then from the first replica;
- dense parameters and buffers: ``dense_replica`` (DATA x SEQUENCE x EXPERT);
- expert parameters and buffers (``markers.is_expert``): ``expert_replica`` (DATA x SEQUENCE).

Buffers are never copied over TENSOR: a BatchNorm after a column-parallel layer holds a shard of the
statistics on each TENSOR rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..context import ParallelContext
from ..dtensor import local, split_params
from ..markers import is_expert, is_tensor_parallel

__all__ = ["ReplicaBufferSync", "broadcast_from_first", "sync_replicas_at_fit_start"]


@torch.no_grad()
def broadcast_from_first(tensors: Iterable[Tensor], ctx: ParallelContext, mode: str) -> None:
    """Copy ``tensors`` from the first rank of this rank's ``mode`` group to the others, in place."""
    tensors = list(tensors)
    if not tensors or ctx.get_world_size(mode) == 1:
        return
    src = ctx.get_ranks_in_group(mode)[0]
    group = ctx.get_group(mode)
    # One flat broadcast per dtype, not one per tensor: a real model has hundreds.
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        t = local(t)  # a DTensor's local piece, shared storage: its replicas hold the same piece
        by_dtype.setdefault(t.dtype, []).append(t.data if isinstance(t, torch.nn.Parameter) else t)
    for same in by_dtype.values():
        flat = _flatten_dense_tensors(same)
        dist.broadcast(flat, src=src, group=group)
        for t, synced in zip(same, _unflatten_dense_tensors(flat, same)):
            t.copy_(synced)


def _split_expert(tensors: Iterable[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    dense, expert = [], []
    for t in tensors:
        (expert if is_expert(t) else dense).append(t)
    return dense, expert


def sync_replicas_at_fit_start(module: torch.nn.Module, ctx: ParallelContext) -> None:
    """DDP's start-of-training broadcast of parameters and buffers, inside each replica group only.

    FSDP2's shards differ by design and are left out; DTensors replicated over the data ranks sync
    their local pieces like plain tensors (their placements already say what TENSOR holds). Bad
    meshes raise in ``split_params``, on every rank, before any collective.
    """
    plain, dtensors = split_params(module, ctx)
    plain_params = [p for _, p in plain]
    params = plain_params + [p for _, p in dtensors]
    # Replicated over TENSOR first: ranks that started from different random states (a seed that
    # depends on the rank) would otherwise keep different LayerNorms forever, since their
    # gradients are never reduced over TENSOR.
    broadcast_from_first([p for p in plain_params if not is_tensor_parallel(p)], ctx, "tensor")
    dense, expert = _split_expert(params + list(module.buffers()))
    broadcast_from_first(dense, ctx, "dense_replica")
    broadcast_from_first(expert, ctx, "expert_replica")


class ReplicaBufferSync:
    """DDP's ``broadcast_buffers=True`` over the replica groups.

    DDP copies the buffers from the first replica before a forward when the previous forward was a
    synchronising training forward (grad enabled, not inside ``no_sync``), and at the first forward
    after wrapping. The same rule here gives the same running statistics as DDP on every rank,
    including the per-replica drift DDP leaves after the last forward.
    """

    def __init__(self, module: torch.nn.Module, ctx: ParallelContext, require_sync: Callable[[], bool]):
        self._module = module
        self._ctx = ctx
        self._require_sync = require_sync
        self._pending = True  # DDP's require_forward_param_sync starts True
        self._active = any(ctx.get_world_size(m) > 1 for m in ("dense_replica", "expert_replica"))

    @contextlib.contextmanager
    def around_forward(self) -> Iterator[None]:
        if self._active and self._pending:
            # Buffers are looked up each time: a module may reassign them (DDP does the same).
            dense, expert = _split_expert(self._module.buffers())
            broadcast_from_first(dense, self._ctx, "dense_replica")
            broadcast_from_first(expert, self._ctx, "expert_replica")
        yield
        self._pending = torch.is_grad_enabled() and self._require_sync()
