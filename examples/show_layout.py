"""Print every rank's place in every parallel mode. Run under any launcher, e.g.

    torchrun --nproc_per_node 8 examples/show_layout.py --tp 2 --pp 2
    srun -n 8 python examples/show_layout.py --tp 2 --pp 2
    mpirun -np 8 -x MASTER_ADDR=127.0.0.1 -x MASTER_PORT=29500 python examples/show_layout.py --tp 2
"""

import argparse

import torch
import torch.distributed as dist

from lightning_parallelctx import ParallelContext


def main() -> None:
    parser = argparse.ArgumentParser()
    for short in ("tp", "pp", "sp", "ep"):
        parser.add_argument(f"--{short}", type=int, default=1)
    parser.add_argument("--dp", default=None)
    parser.add_argument("--order", default=None, help="axes innermost first, e.g. tp-sp-ep-dp-pp")
    args = parser.parse_args()

    ctx = ParallelContext.from_config(
        {"tp": args.tp, "pp": args.pp, "sp": args.sp, "ep": args.ep,
         "dp": None if args.dp in (None, "auto") else int(args.dp)},
        order=args.order,
    )
    line = f"{ctx!r}  groups: " + "  ".join(
        f"{m}={ctx.get_ranks_in_group(m)}" for m in ("tensor", "data", "pipeline") if ctx.get_world_size(m) > 1
    )
    # A collective on every group proves the groups work, not just that they were computed.
    total = torch.tensor([1.0])
    dist.all_reduce(total, group=ctx.get_group("global"))
    lines: list = [None] * ctx.world_size
    dist.all_gather_object(lines, line)
    if ctx.global_rank == 0:
        print(f"launched by {ctx.launch.launcher}; {int(total.item())} ranks answered; layout {ctx.layout.describe()}")
        print("\n".join(lines))
    ctx.destroy()


if __name__ == "__main__":
    main()
