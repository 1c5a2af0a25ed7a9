"""Simulated scale: torch's fake process-group backend lets one process play any rank of a huge job."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from lightning_parallelctx import ParallelContext
from lightning_parallelctx.initializers import _COMPOSITES

SIZES = dict(tensor_parallel_size=8, pipeline_parallel_size=4, sequence_parallel_size=2, expert_parallel_size=2)


def build_as(rank: int, world: int, **sizes) -> ParallelContext:
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    return ParallelContext.from_torch(**sizes)


@pytest.mark.parametrize("world", [1024, 4096, 16384, 65536])
def test_groups_and_call_count_at_scale(world):
    calls = set()
    for rank in (0, 1, world // 2 + 3, world - 1):
        ctx = build_as(rank, world, **SIZES)
        try:
            for mode, axes in _COMPOSITES.items():
                expected = list(ctx.layout.group_of(rank, axes)) if axes else list(range(world))
                assert ctx.get_ranks_in_group(mode) == expected, (world, rank, mode)
                assert ctx.get_local_rank(mode) == expected.index(rank)
            calls.add(ctx.new_group_calls)
        finally:
            ctx.destroy()
            dist.destroy_process_group()
    # One call per distinct rank set of 2..world-1 ranks this rank is in, never per group in the world.
    assert calls == {9}, calls
