"""Run under a real launcher: build the context from the environment, check every answer against the
pure layout, run an all-reduce on every group, and print one 'OK' line per rank."""

import argparse
import sys

import torch
import torch.distributed as dist

from lightning_parallelctx import ParallelContext
from lightning_parallelctx.initializers import _COMPOSITES

parser = argparse.ArgumentParser()
parser.add_argument("--tp", type=int, default=1)
parser.add_argument("--pp", type=int, default=1)
parser.add_argument("--launcher", default=None)
args = parser.parse_args()

ctx = ParallelContext.from_env(tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp, timeout=120,
                               launcher=args.launcher)
rank = ctx.global_rank
for mode, axes in _COMPOSITES.items():
    expected = list(ctx.layout.group_of(rank, axes)) if axes else list(range(ctx.world_size))
    assert ctx.get_ranks_in_group(mode) == expected, (mode, ctx.get_ranks_in_group(mode), expected)
    value = torch.tensor([float(rank)])
    dist.all_reduce(value, group=ctx.get_group(mode))
    assert value.item() == sum(expected), (mode, value.item())
# One write per line: ranks share the launcher's stdout and print() would split line and newline.
sys.stdout.write(f"OK launcher={ctx.launch.launcher} rank={rank} world={ctx.world_size} "
                 f"local={ctx.get_local_rank()} {ctx!r}\n")
sys.stdout.flush()
ctx.destroy()
