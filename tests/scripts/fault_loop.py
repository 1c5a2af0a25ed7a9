"""A user's own training loop over a ParallelContext (no Lightning), under ``fault_guard``; one rank
misbehaves at --step. For tests/test_fault_guard.py, which starts each rank as a plain process with
torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, ...) and no launcher that kills anyone.

    RANK=0 WORLD_SIZE=3 ... python tests/scripts/fault_loop.py --fault hang --rank 1 --timeout 20 --pids DIR

Faults at --step on --rank: raise (ValueError), hang (sleep). Without a fault it prints its weights.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from lightning_parallelctx import ParallelContext, fault_guard

parser = argparse.ArgumentParser()
parser.add_argument("--fault", choices=["none", "raise", "hang"], default="none")
parser.add_argument("--rank", type=int, default=1)
parser.add_argument("--step", type=int, default=2)
parser.add_argument("--steps", type=int, default=5)
parser.add_argument("--timeout", type=float, default=20.0)
parser.add_argument("--grace", type=float, default=5.0)
parser.add_argument("--pids", default=None)
args = parser.parse_args()

if args.pids:
    Path(args.pids).mkdir(parents=True, exist_ok=True)
    Path(args.pids, f"{os.getpid()}.pid").write_text(str(os.getpid()))

ctx = ParallelContext.from_torch(timeout=args.timeout)  # data parallel over every process
rank, world = ctx.get_global_rank(), ctx.get_world_size("data")
torch.manual_seed(0)
model = torch.nn.Linear(8, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
data = torch.randn(world * 4 * args.steps, 8, generator=torch.Generator().manual_seed(1))

with fault_guard(ctx, grace_s=args.grace):
    for step in range(args.steps):
        if rank == args.rank and step == args.step:
            if args.fault == "raise":
                raise ValueError(f"injected failure at step {step}")
            if args.fault == "hang":
                time.sleep(3600)
        batch = data[(step * world + rank) * 4:(step * world + rank + 1) * 4]
        opt.zero_grad()
        model(batch).sum().backward()
        for p in model.parameters():  # plain data parallelism: average the gradients
            dist.all_reduce(p.grad, group=ctx.get_group("data"))
            p.grad /= world
        opt.step()

sys.stdout.write(f"rank {rank}: done weights={[round(float(v), 6) for v in model.weight.reshape(-1)[:4]]}\n")
ctx.destroy()
