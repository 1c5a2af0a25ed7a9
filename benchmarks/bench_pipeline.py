"""Pipeline schedules on 2 stages / 2 processes / 8 micro-batches (docs/benchmarking.md).

Model: 8 x (Linear(1024, 1024) + tanh), 4 layers per stage, batch 256 (micro-batches of 32 rows),
MSE loss, gloo, one thread and one core per process: compute dominates the 128 KB activations sent
between the stages.

1. ``T_mb``: one stage's forward + backward of one micro-batch, measured on each rank alone (max).
2. Each schedule driven directly with torch (``PipelineStage`` + the schedule class, ``step()``):
   step time against the ideal ``T_mb x (m + p - 1)`` (the GPipe/1F1B bound with backward = what
   it really costs), and the measured bubble ``1 - m T_mb / step`` beside the planner's unit-slot one.
3. The strategy's overhead: ``Trainer.fit`` with ``ParallelCtxStrategy(pipeline_parallel_size=2)``
   (1F1B) against torch's 1F1B driven directly (its own stages and SGD step), measured in
   interleaved rounds inside the same fit: a callback runs one direct step before or after each
   Lightning step, in the order A B | B A | A B ... (ABBA), so a change of the machine's load hits
   both alike. A Lightning step is timed from ``on_train_batch_start`` to ``on_train_batch_end``
   (training_step with the schedule, the loss broadcast, hooks, zero_grad, optimizer step; the
   batch is already fetched, as the direct step's is in memory). Reported: the ratio of medians,
   the median of the per-round ratios and their quartiles (the spread says how far to trust it),
   and the ratio of the median CPU time of both ranks (the work done, less disturbed by other jobs).

    python benchmarks/bench_pipeline.py [--steps 10] [--warmup 3] [--rounds 30] [--overhead-only]

Timings on a shared machine are noisy: only ratios measured in the same run are reported, with the
load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _bench import pin_to_core, reexec_with_malloc_env  # benchmarks/_bench.py

WIDTH, LAYERS, BATCH, M = 1024, 8, 256, 8
SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("looped_bfs", 2), ("interleaved_zero_bubble", 2),
             ("zbv_zero_bubble", 2)]


def _layers(torch):
    from torch import nn

    class Dense(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(WIDTH, WIDTH)

        def forward(self, x):
            return torch.tanh(self.linear(x))

    torch.manual_seed(0)
    return [Dense() for _ in range(LAYERS)]


def _time(fn, steps: int, warmup: int, dist) -> float:
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        t = torch.tensor([time.perf_counter() - t0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step ends when the slower rank is done
        times.append(float(t))
    return statistics.median(times)


def _worker(rank: int, world: int, steps: int, warmup: int, rounds: int, overhead_only: bool) -> dict:
    pin_to_core(rank)
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed import pipelining as tpp

    from lightning_parallelctx.pipeline import get_schedule, layer_ranges, stages_of_rank
    from lightning_parallelctx.pipeline.timeline import timeline_for

    dist.init_process_group("gloo")
    x, y = torch.randn(BATCH, WIDTH), torch.randn(BATCH, WIDTH)
    out: dict = {}
    if overhead_only:
        return {"strategy": _overhead(rank, rounds, warmup, x, y)}

    # 1. One stage, one micro-batch, alone.
    stage = torch.nn.Sequential(*_layers(torch)[:LAYERS // 2])
    mb = x[: BATCH // M].requires_grad_(True)

    def one_mb():
        stage(mb).sum().backward()

    out["T_mb"] = _time(one_mb, steps * 4, warmup, dist)

    # 2. Each schedule driven directly.
    for name, v in SCHEDULES:
        sched_cls = get_schedule(name).torch_class
        n_stages = 2 * v
        placement = get_schedule(name).placement
        layers = _layers(torch)
        ranges = layer_ranges(LAYERS, n_stages)
        stages = [tpp.PipelineStage(torch.nn.Sequential(*layers[a:b]), s, n_stages, torch.device("cpu"))
                  for s in stages_of_rank(rank, 2, n_stages, placement) for a, b in [ranges[s]]]
        sched = sched_cls(stages[0] if v == 1 else stages, M, loss_fn=F.mse_loss, scale_grads=False)
        params = [p for st in stages for p in st.submod.parameters()]

        def step():
            for p in params:
                p.grad = None
            sched.step(x, target=y, losses=[])

        # The machine's speed drifts (shared cores): T_mb is re-measured around each schedule.
        t_before = _time(one_mb, steps * 2, 1, dist)
        t = _time(step, steps, warmup, dist)
        t_local = (t_before + _time(one_mb, steps * 2, 1, dist)) / 2
        ideal = t_local * (M + 2 - 1)
        out[name] = {"step_s": t, "T_mb_s": t_local, "vs_ideal": t / ideal,
                     # each rank computes m x T_mb of work per step, whatever its number of stages
                     "measured_bubble": 1 - M * t_local / t,
                     "planner_bubble": timeline_for(name, 2, M, v).bubble_fraction}

    # 3. The strategy against torch's 1F1B driven directly, both with an SGD step, in ABBA rounds.
    out["strategy"] = _overhead(rank, rounds, warmup, x, y)
    return out


def _overhead(rank: int, rounds: int, warmup: int, x, y) -> dict:
    import lightning.pytorch as pl
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed import pipelining as tpp
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_parallelctx import ParallelCtxStrategy
    from lightning_parallelctx.pipeline import PipelineSequential, layer_ranges, stage_plan

    layers = _layers(torch)
    ranges = layer_ranges(LAYERS, 2)
    direct_stage = tpp.PipelineStage(torch.nn.Sequential(*layers[slice(*ranges[rank])]), rank, 2, torch.device("cpu"))
    direct = tpp.Schedule1F1B(direct_stage, M, loss_fn=F.mse_loss, scale_grads=False)
    opt = torch.optim.SGD(direct_stage.submod.parameters(), lr=1e-4)

    def direct_step() -> tuple[float, float]:
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad()
        direct.step(x, target=y, losses=[])
        opt.step()
        return _slowest(time.perf_counter() - t0, time.process_time() - c0, dist, torch)

    class Net(pl.LightningModule):
        def configure_model(self):
            if not hasattr(self, "pipe"):
                self.pipe = PipelineSequential(_layers(torch), stage_plan(self))

        def training_step(self, batch, i):
            return self.pipe.loss(batch[0], batch[1], F.mse_loss)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-4)

    class ABBA(pl.Callback):
        """Round k: A (direct) then B (Lightning) when k is even, B then A when k is odd."""

        def __init__(self) -> None:
            self.a: list[tuple[float, float]] = []
            self.b: list[tuple[float, float]] = []
            self.t0 = self.c0 = 0.0

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx % 2 == 0:
                self.a.append(direct_step())
            dist.barrier()
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.b.append(_slowest(time.perf_counter() - self.t0, time.process_time() - self.c0, dist, torch))
            if batch_idx % 2 == 1:
                self.a.append(direct_step())

    total = rounds + warmup
    abba = ABBA()
    data = DataLoader(TensorDataset(x.repeat(total, 1), y.repeat(total, 1)), batch_size=BATCH)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=ParallelCtxStrategy(pipeline_parallel_size=2,
                         num_microbatches=M, print_layout=False), max_steps=total, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[abba], use_distributed_sampler=False)
    trainer.fit(Net(), data)
    a, b = [t for t, _ in abba.a[warmup:]], [t for t, _ in abba.b[warmup:]]
    a_cpu, b_cpu = [c for _, c in abba.a[warmup:]], [c for _, c in abba.b[warmup:]]
    ratios = sorted(tb / ta for ta, tb in zip(a, b))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"rounds": len(ratios), "direct_1f1b_s": statistics.median(a), "strategy_1f1b_s": statistics.median(b),
            "overhead": statistics.median(b) / statistics.median(a) - 1,
            "overhead_paired_median": statistics.median(ratios) - 1, "overhead_q1": q[0] - 1, "overhead_q3": q[2] - 1,
            # CPU seconds of both ranks (process_time, gloo's threads included): the work each path
            # does, which other jobs on a shared machine disturb less than the wall clock.
            "direct_1f1b_cpu_s": statistics.median(a_cpu), "strategy_1f1b_cpu_s": statistics.median(b_cpu),
            "overhead_cpu": statistics.median(b_cpu) / statistics.median(a_cpu) - 1}


def _slowest(seconds: float, cpu_seconds: float, dist, torch) -> tuple[float, float]:
    """(the slower rank's wall time: a step ends when it is done, both ranks' CPU time summed)."""
    t = torch.tensor([seconds])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    c = torch.tensor([cpu_seconds])
    dist.all_reduce(c)
    return float(t), float(c)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="timed steps per schedule (section 2)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=30, help="ABBA rounds of the strategy-overhead measurement")
    p.add_argument("--overhead-only", action="store_true", help="only section 3 (about a minute)")
    p.add_argument("--json", type=str, default=None, help="also write the results to this file")
    args = p.parse_args()
    reexec_with_malloc_env()
    from lightning_parallelctx.testing import spawn

    load_before = os.getloadavg()[0]
    t_start = time.perf_counter()
    res = spawn(_worker, 2, args.steps, args.warmup, args.rounds, args.overhead_only, timeout=1800)[0]
    load_after = os.getloadavg()[0]
    strat = res.pop("strategy")
    print(f"load average (1 min) {load_before:.1f} before, {load_after:.1f} after, on {os.cpu_count()} cores; "
          f"{time.perf_counter() - t_start:.0f} s")
    if not args.overhead_only:
        t_mb = res.pop("T_mb")
        print(f"2 stages x 2 processes, {M} micro-batches; one stage's forward+backward per micro-batch T_mb = "
              f"{t_mb * 1e3:.1f} ms; ideal step (m + p - 1) T_mb = {(M + 1) * t_mb * 1e3:.1f} ms")
        print(f"{'schedule':<26}{'step ms':>9}{'T_mb ms':>9}{'/ ideal':>9}{'bubble':>9}{'planner':>9}")
        for name, r in res.items():
            print(f"{name:<26}{r['step_s'] * 1e3:>9.1f}{r['T_mb_s'] * 1e3:>9.1f}{r['vs_ideal']:>9.3f}"
                  f"{r['measured_bubble']:>9.3f}{r['planner_bubble']:>9.3f}")
    print(f"strategy overhead (Trainer.fit 1F1B vs torch's Schedule1F1B driven directly, {strat['rounds']} ABBA rounds): "
          f"median step {strat['strategy_1f1b_s'] * 1e3:.1f} ms vs {strat['direct_1f1b_s'] * 1e3:.1f} ms -> "
          f"{strat['overhead']:+.1%}; per-round ratios: median {strat['overhead_paired_median']:+.1%}, quartiles "
          f"{strat['overhead_q1']:+.1%} .. {strat['overhead_q3']:+.1%}; CPU time of both ranks {strat['strategy_1f1b_cpu_s'] * 1e3:.1f} "
          f"vs {strat['direct_1f1b_cpu_s'] * 1e3:.1f} ms -> {strat['overhead_cpu']:+.1%} (target: under +3%)")
    result = {"load_before": load_before, "load_after": load_after, **res, "strategy": strat}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
