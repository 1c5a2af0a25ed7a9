"""What the fault handling costs on the happy path (issue #13): nothing per step, a little per fit.

2 processes, gloo. Per step: a small MLP's forward + backward + the gradient hook's all-reduce,
timed with each rank's watchdog armed and disarmed, interleaved round-robin (A B A B ...) in one
process pair; a step's time is the max over the ranks, medians reported as a ratio. The armed
watchdog is one thread blocked in the store's ``wait`` outside the GIL, so the ratio should be
1.00 within noise. Per fit: the time of arming and disarming (a thread, two store connections and
one ``set``), against one all-reduce of the model's gradients for scale.

    python benchmarks/bench_faults.py [--rounds 30] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from _bench import pin_to_core, reexec_with_malloc_env  # benchmarks/_bench.py


def _run(rank: int, world_size: int, rounds: int, steps: int) -> dict:
    import torch
    import torch.distributed as dist

    from lightning_parallelctx import ParallelContext
    from lightning_parallelctx.grad_sync import DataParallelGradientHook
    from lightning_parallelctx.lightning.fault_guard import FitGuard

    pin_to_core(rank)
    ctx = ParallelContext.from_env(timeout=120)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512))
    hook = DataParallelGradientHook(model, ctx)
    x = torch.randn(32, 512)
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()
        hook.finish()

    def timed(armed: bool) -> float:
        guard = FitGuard()
        if armed:
            guard.arm(host, port)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        elapsed = torch.tensor([(time.perf_counter() - start) / steps])
        guard.disarm()
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        return float(elapsed)

    for _ in range(3):
        step()
    times: dict[str, list[float]] = {"disarmed": [], "armed": []}
    for i in range(rounds):
        # ABBA: the order alternates, so a trend in the machine's load favours neither variant.
        for name in (("disarmed", "armed") if i % 2 == 0 else ("armed", "disarmed")):
            times[name].append(timed(name == "armed"))
    arm_costs = []
    for _ in range(10):
        dist.barrier()
        start = time.perf_counter()
        guard = FitGuard()
        guard.arm(host, port)
        guard.disarm()
        arm_costs.append(time.perf_counter() - start)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    dist.barrier()
    start = time.perf_counter()
    for _ in range(10):
        dist.all_reduce(flat)
    allreduce = (time.perf_counter() - start) / 10
    hook.remove()
    ctx.destroy()
    paired = [a / d for a, d in zip(times["armed"], times["disarmed"])]
    return {"step_disarmed": statistics.median(times["disarmed"]), "step_armed": statistics.median(times["armed"]),
            "paired_ratio": statistics.median(paired),
            "arm_disarm": statistics.median(arm_costs), "allreduce": allreduce}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    reexec_with_malloc_env()
    from lightning_parallelctx.testing import spawn

    result = spawn(_run, 2, args.rounds, args.steps, timeout=900)[0]
    print(json.dumps(result, indent=1))
    print(f"per step, watchdog armed / disarmed: {result['step_armed'] / result['step_disarmed']:.3f} (ratio of "
          f"medians), {result['paired_ratio']:.3f} (median of per-round ratios); {args.rounds} ABBA-interleaved rounds "
          f"of {args.steps} steps, step time = max over 2 ranks")
    print(f"per fit, arm + disarm: {result['arm_disarm'] * 1e3:.2f} ms = "
          f"{result['arm_disarm'] / result['step_disarmed']:.2f} training steps of this model")


if __name__ == "__main__":
    main()
