"""Data parallelism at the Lightning level: ``Trainer.fit`` with ParallelCtxStrategy against
``Trainer.fit`` with Lightning's ``DDPStrategy`` (torch DDP, default settings), same model, same data.

2 processes, gloo, the 25.2M-parameter MLP of dp_hook_vs_ddp.py (6 x Linear(2048, 2048)), batch 64
per rank, SGD. A step is what Lightning runs per batch (training_step, zero_grad, backward, gradient
sync, optimizer step), timed from ``on_train_batch_start`` to ``on_train_batch_end``. Both strategies
fit in the same two processes (one spawned world: each rank pinned to its own core, one torch thread,
glibc's MALLOC_* thresholds set), in fits of ``--steps`` steps whose order is mirrored every round
(A B B A ...): the first 3 steps of a fit are warm-up. A step's time is the max over the ranks; CPU
time (every thread of both ranks, gloo's included) is the work, which load cannot inflate.

Variants: ``ours`` (the strategy's defaults: the bucketed hook, the average in the backward's seed),
``ours, scale pass`` (``average_in_backward=False``: the hook scales every gradient), ``ddp``
(``DDPStrategy()``), ``ddp bucket view`` (``DDPStrategy(gradient_as_bucket_view=True)``).

    python benchmarks/dp_lightning_vs_ddp.py [--rounds 4] [--steps 12] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from _bench import dp_mlp, pin_to_core, reexec_with_malloc_env, spawn_measured, step_timer  # benchmarks/_bench.py

VARIANTS = ("ours", "ours, scale pass", "ddp", "ddp bucket view")


def _strategy(name: str):
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_parallelctx import ParallelCtxStrategy
    from lightning_parallelctx.grad_sync import BucketedGradientHandler

    if name == "ours":
        return ParallelCtxStrategy(print_layout=False)
    if name == "ours, scale pass":
        return ParallelCtxStrategy(print_layout=False, gradient_handler=BucketedGradientHandler(average_in_backward=False))
    return DDPStrategy(gradient_as_bucket_view=name == "ddp bucket view")


def _fit(name: str, world: int, steps: int, batch: int) -> tuple[list[float], list[float]]:
    import lightning.pytorch as pl
    import torch

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = dp_mlp(torch)

        def training_step(self, b, batch_idx):
            return self.net(b[0]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-4)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(batch * world * steps, 2048, generator=g))
    timer = step_timer()
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=_strategy(name), max_steps=steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[timer])
    trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=batch))
    return timer.times[3:], timer.cpu_times[3:]


def _worker(rank: int, world: int, args: dict) -> dict:
    pin_to_core(rank)  # before the process group: gloo threads inherit it
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    times: dict[str, list[list[float]]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[list[float]]] = {v: [] for v in VARIANTS}
    for r in range(args["rounds"]):
        order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))  # mirrored: no variant always first
        for name in order:
            t, c = _fit(name, world, args["steps"], args["batch"])
            wall = torch.tensor(t, dtype=torch.float64)
            work = torch.tensor(c, dtype=torch.float64)
            dist.all_reduce(wall, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
            dist.all_reduce(work)  # work adds up over the ranks
            times[name].append(wall.tolist())
            cpu[name].append(work.tolist())
    return {"times": times, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="rounds; each fits every variant once")
    parser.add_argument("--steps", type=int, default=12, help="steps per fit (the first 3 are warm-up)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--json", help="also write the results here (benchmarks/run_all.py reads them)")
    args = parser.parse_args()
    reexec_with_malloc_env()
    res, wall, load_before = spawn_measured(_worker, 2, dict(vars(args)))
    flat = {v: [s for fit in res["times"][v] for s in fit] for v in VARIANTS}
    med = {v: statistics.median(t) for v, t in flat.items()}
    cpu = {v: statistics.median([s for fit in res["cpu"][v] for s in fit]) for v in VARIANTS}
    # Per round, the ratio of the fits' medians: fits of one round ran back to back, under the same load.
    per_fit = {v: [statistics.median(fit) for fit in res["times"][v]] for v in VARIANTS}
    paired = {v: statistics.median(a / b for a, b in zip(per_fit[v], per_fit["ddp"])) for v in VARIANTS}
    print(f"Trainer.fit, 2 ranks, gloo, 6 x Linear(2048, 2048), batch {args.batch}/rank, SGD; {args.rounds} rounds of "
          f"{args.steps}-step fits per variant (3 warm-up steps each), mirrored order; step = max over ranks; "
          f"wall {wall:.0f} s; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"{'variant':<20}{'median ms':>10}{'ratio to DDP':>14}{'paired':>9}{'CPU ms':>9}{'CPU ratio':>11}")
    rows = {}
    for v in VARIANTS:
        rows[v] = {"median_ms": med[v] * 1e3, "ratio": med[v] / med["ddp"], "paired": paired[v],
                   "cpu_ms": cpu[v] * 1e3, "cpu_ratio": cpu[v] / cpu["ddp"]}
        print(f"{v:<20}{med[v] * 1e3:>10.1f}{rows[v]['ratio']:>14.3f}{paired[v]:>9.3f}{cpu[v] * 1e3:>9.1f}"
              f"{rows[v]['cpu_ratio']:>11.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "wall_s": wall, "rows": rows, "raw": res}, f)


if __name__ == "__main__":
    main()
