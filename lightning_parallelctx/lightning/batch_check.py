"""Tensor and pipeline peers must train on the same batch: checked once per epoch, loudly.

A tensor-parallel layer assumes its input is identical on every TENSOR rank (the column layer
copies it, the backward all-reduces its gradient); pipeline stage 0 reads a batch's inputs while the
last stage reads the targets of what must be the same batch. Nothing fails when they differ: the
model trains on garbage. The library's sampler gives those peers the same indices, but a loader the
strategy does not rebuild (``use_distributed_sampler=False``, a custom sampler or batch sampler, an
unseeded shuffle, random augmentation drawn from a generator that differs per rank) can break it.

So the first batch of every epoch is fingerprinted on every rank (four float64 numbers: leaves,
elements and two position-weighted sums, so a permutation of the same samples differs too), the
fingerprints are gathered over TENSOR and over PIPELINE, and one all-reduce over the world tells
every rank whether any group disagreed: all raise together, none hangs. Three small collectives per
epoch. SEQUENCE peers are not checked: a loader may legitimately hand each its own slice.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_leaves

from ..context import ParallelContext
from ..mode import ParallelMode

__all__ = ["BatchCheck", "BatchMismatchError", "fingerprint"]

_CHECKED_MODES = (ParallelMode.TENSOR, ParallelMode.PIPELINE)


class BatchMismatchError(RuntimeError):
    """Ranks that must see the same batch were given different ones."""


def fingerprint(batch: Any) -> torch.Tensor:
    """Four float64 numbers that equal ranks compute bit-identically for identical batches."""
    leaves = [t for t in tree_leaves(batch) if isinstance(t, torch.Tensor)]
    numel, s1, s2 = 0, torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for i, t in enumerate(leaves):
        x = t.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
        pos = torch.arange(x.numel(), dtype=torch.float64)
        s1 += (x * (pos % 251 + 1)).sum() * (i + 1)
        s2 += (x.abs() * (pos % 17 + 1)).sum()
        numel += x.numel()
    return torch.stack([torch.tensor(float(len(leaves)), dtype=torch.float64),
                        torch.tensor(float(numel), dtype=torch.float64), s1, s2])


def _disagreeing(rows: torch.Tensor) -> bool:
    # Bit-equal on CPU; a relative 1e-12 leaves room for a device's reduction order.
    ref = rows[0]
    return not torch.allclose(rows, ref.expand_as(rows), rtol=1e-12, atol=0.0)


class BatchCheck:
    """Checks the first training batch of each epoch (and the first after a resume)."""

    def __init__(self, ctx: ParallelContext, device: torch.device) -> None:
        self._ctx = ctx
        self._device = device
        self._modes = [m for m in _CHECKED_MODES if ctx.get_world_size(m) > 1]
        self._checked_epoch: int | None = None

    @property
    def active(self) -> bool:
        return bool(self._modes)

    def __call__(self, batch: Any, epoch: int) -> None:
        if not self._modes or self._checked_epoch == epoch:
            return
        self._checked_epoch = epoch
        own = fingerprint(batch).to(self._device)
        found: dict[ParallelMode, list[int]] = {}
        for mode in self._modes:
            rows = [torch.empty_like(own) for _ in range(self._ctx.get_world_size(mode))]
            dist.all_gather(rows, own, group=self._ctx.get_group(mode))
            if _disagreeing(torch.stack(rows).cpu()):
                found[mode] = self._ctx.get_ranks_in_group(mode)
        flags = torch.tensor([float(m in found) for m in self._modes], device=self._device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags.sum().item() == 0:
            return
        modes = [m for m, f in zip(self._modes, flags.tolist()) if f]
        names = " and ".join(m.name.lower() for m in modes)
        here = "".join(f" This rank's {m.name.lower()} group {found[m]} is one of them." for m in modes if m in found)
        raise BatchMismatchError(
            f"Ranks of one {names} group received different batches at the first step of epoch {epoch} "
            f"(rank {self._ctx.global_rank} checked a fingerprint of its batch against its peers').{here} "
            f"Rule: tensor-parallel peers feed the same input to their shards, and pipeline stages read the "
            f"inputs and targets of one batch, so their DataLoaders must yield identical batches; with "
            f"different ones the model silently trains on mismatched data. Fix: let the strategy shard the "
            f"data (Lightning's default use_distributed_sampler=True, no custom sampler), or give every "
            f"peer the same sampler seed and draw any random augmentation from a generator seeded the same "
            f"on those peers (not the default one).")
