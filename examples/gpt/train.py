"""Train the GPT example with one line of parallelism: ``strategy=ParallelCtxStrategy(...)``.

    python examples/gpt/train.py --tp 2 --devices 4             # the strategy starts 4 local processes
    torchrun --nproc_per_node 4 examples/gpt/train.py --tp 2    # the same training under torchrun
    mpirun -np 4 python examples/gpt/train.py --tp 2            # ... under MPI (no mpi4py needed)
    srun --ntasks-per-node 4 python examples/gpt/train.py --tp 2

Under a launcher, --devices defaults to the processes it started on this node. The YAML route is
``python -m lightning_parallelctx fit --config configs/cpu-tp2-dp2.yaml``.
"""

from __future__ import annotations

import argparse
import os
import sys

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import GPTDataModule
from model import GPTLightning

from lightning_parallelctx import ParallelCtxEnvironment, ParallelCtxStrategy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size")
    p.add_argument("--sp", type=int, default=1, help="sequence-parallel size")
    p.add_argument("--dp", default="auto", help="data-parallel size (default: the rest)")
    p.add_argument("--devices", type=int, default=None, help="processes per node (default: 4, or the launcher's)")
    p.add_argument("--num-nodes", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--log-dir", default="lightning_logs")
    args = p.parse_args()

    env = ParallelCtxEnvironment()
    launch = env.launch if env.launcher != "local" else None
    devices = args.devices or (launch.local_world_size if launch and launch.local_world_size else 4)
    num_nodes = args.num_nodes or (env.num_nodes() if launch else None) or 1

    pl.seed_everything(1234)
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, num_nodes=num_nodes,
        strategy=ParallelCtxStrategy(tensor_parallel_size=args.tp, sequence_parallel_size=args.sp,
                                     data_parallel_size=args.dp if args.dp == "auto" else int(args.dp),
                                     cluster_environment=env),
        max_steps=args.max_steps, accumulate_grad_batches=args.accumulate, log_every_n_steps=10,
        logger=CSVLogger(args.log_dir, name=f"gpt-tp{args.tp}-sp{args.sp}"), enable_model_summary=False,
    )
    model = GPTLightning()
    trainer.fit(model, GPTDataModule(global_batch_size=args.global_batch_size))
    if trainer.is_global_zero:
        print(f"final loss: {float(trainer.callback_metrics['train_loss']):.6f} (step {trainer.global_step})")


if __name__ == "__main__":
    main()
