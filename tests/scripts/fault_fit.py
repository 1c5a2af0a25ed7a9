"""A tiny fit in which one rank misbehaves, for the fault tests (tests/test_faults*.py, via tests/fault_jobs.py).

    python tests/scripts/fault_fit.py --fault raise --rank 2 --devices 3 --timeout 10 --pids DIR

Faults, all at --step on --rank: raise (ValueError in training_step), kill (SIGKILL itself),
hang (sleep forever in training_step), exit (os._exit(3) inside the gradient all-reduce's backward,
i.e. dying during a collective), norendezvous (the rank sleeps before the Trainer starts, so it
never reaches the rendezvous). Every rank writes its pid to DIR/<rank>.pid first, so the test can
check that no process of the job outlives it.
"""

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_parallelctx.lightning import ParallelCtxStrategy

parser = argparse.ArgumentParser()
parser.add_argument("--fault", choices=["none", "raise", "kill", "hang", "exit", "norendezvous", "slowstart"], default="none")
parser.add_argument("--rank", type=int, default=1)
parser.add_argument("--step", type=int, default=2)
parser.add_argument("--devices", type=int, default=2)
parser.add_argument("--timeout", type=float, default=10.0)
parser.add_argument("--rendezvous-timeout", type=float, default=None)
parser.add_argument("--pids", default=None)
parser.add_argument("--launcher", default="auto")
parser.add_argument("--nodes", type=int, default=1)
parser.add_argument("--tp", type=int, default=1)
parser.add_argument("--steps", type=int, default=6)
parser.add_argument("--step-sleep", type=float, default=0.0, help="seconds per step: a long run to interrupt")
args = parser.parse_args()


def my_rank() -> int:
    for name in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "LOCAL_RANK"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


if args.pids:
    Path(args.pids).mkdir(parents=True, exist_ok=True)
    Path(args.pids, f"{os.getpid()}.pid").write_text(str(os.getpid()))
    if args.steps > 1000:  # a run meant to be interrupted: never longer than this
        signal.alarm(600)

if args.fault == "norendezvous" and my_rank() == args.rank:
    time.sleep(3600)
if args.fault == "slowstart" and my_rank() == args.rank:  # later than --timeout, within --rendezvous-timeout
    time.sleep(args.timeout + 5)


class Model(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 2)

    def training_step(self, batch, batch_idx):
        if self.global_step == 1 and args.pids:  # tells a test that training is under way
            Path(args.pids, f"{self.global_rank}.training").touch()
        time.sleep(args.step_sleep)
        if self.global_rank == args.rank and self.global_step == args.step:
            if args.fault == "raise":
                raise ValueError(f"injected failure at step {args.step}")
            if args.fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if args.fault == "hang":
                time.sleep(3600)
            if args.fault == "exit":
                # Dies in the middle of backward, while the gradient all-reduce is in flight.
                self.layer.weight.register_hook(lambda g: os._exit(3))
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


pl.seed_everything(0, verbose=False)  # every rank starts from the same weights, as a single process would
data = DataLoader(TensorDataset(torch.randn(64, 8)), batch_size=4)
trainer = pl.Trainer(accelerator="cpu", devices=args.devices, num_nodes=args.nodes, max_steps=args.steps, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     strategy=ParallelCtxStrategy(timeout=args.timeout, rendezvous_timeout=args.rendezvous_timeout,
                                                  launcher=args.launcher, print_layout=False,
                                                  tensor_parallel_size=args.tp))
model = Model()
trainer.fit(model, data)
ctx = model.parallel_context
# One write per line: ranks share the launcher's stdout.
sys.stdout.write(f"rank {trainer.global_rank}: done local_rank={ctx.get_local_rank()} node={trainer.node_rank} "
                 f"weights={[round(float(v), 6) for v in model.layer.weight.detach().reshape(-1)[:4]]}\n")
