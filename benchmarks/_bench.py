"""What every benchmark here does before measuring (docs/benchmarking.md): glibc malloc settings that
stop large buffers from page-faulting on every step, and one core per rank."""

from __future__ import annotations

import os
import sys

MALLOC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "17179869184"}


def reexec_with_malloc_env() -> None:
    """glibc reads these at process start: set them, then restart so this process and every
    process it starts run with them."""
    if all(os.environ.get(k) == v for k, v in MALLOC.items()):
        return
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC})


def pin_to_core(rank: int) -> int:
    """Pin this process to one core (returned); call it before creating a process group, so gloo's
    threads inherit the pinning."""
    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[rank % len(cpus)]
    os.sched_setaffinity(0, {cpu})
    return cpu


def dp_mlp(torch, width: int = 2048, layers: int = 6):
    """The data-parallel benchmarks' model: ``layers`` x Linear(width, width) with ReLU between
    (25.2M parameters at the defaults), the same weights in every process (seed 0)."""
    torch.manual_seed(0)
    mods = []
    for i in range(layers):
        mods.append(torch.nn.Linear(width, width))
        if i < layers - 1:
            mods.append(torch.nn.ReLU())
    return torch.nn.Sequential(*mods)


def spawn_measured(worker, world: int, args: dict) -> tuple[object, float, float]:
    """Run ``worker(rank, world, args)`` in ``world`` spawned processes; return rank 0's result,
    the wall seconds and the 1-minute load average before (what the header line reports)."""
    import time

    from lightning_parallelctx.testing import spawn

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    result = spawn(worker, world, args, timeout=3600)[0]
    return result, time.perf_counter() - started, load_before


def tp_block_args(parser, *, rounds: int, warmup: int, d_model: int, tokens: int) -> None:
    """The arguments both tensor-parallel block benchmarks take (bench_tensor_parallel, bench_compile)."""
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--d-model", type=int, default=d_model)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=tokens, help="batch * sequence")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--json", help="also write the results here (benchmarks/run_all.py reads them)")


def timed_max(fn) -> float:
    """Seconds ``fn()`` took, started together on every rank (a barrier) and ended by the slowest."""
    import time

    import torch
    import torch.distributed as dist

    dist.barrier()
    t = time.perf_counter()
    fn()
    t = torch.tensor(time.perf_counter() - t)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def interleaved(step, names: list[str], rounds: int, warmup: int) -> dict[str, list[float]]:
    """``step(name)`` for every name, round-robin in an order rotated per round (no variant always
    first), ``warmup`` rounds dropped; returns each name's times, a step's time the max over ranks."""
    import torch
    import torch.distributed as dist

    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t = step(name)
            if r >= warmup:
                times[name].append(t)
    out = {}
    for n in names:
        t = torch.tensor(times[n], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
        out[n] = t.tolist()
    return out


def step_timer():
    """A Lightning callback whose ``times`` are the wall seconds of each training step (batch start
    to end) and ``cpu_times`` this process's CPU seconds over the same span (every thread)."""
    import time

    import lightning.pytorch as pl

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.cpu_times: list[float] = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self._t, self._c = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.times.append(time.perf_counter() - self._t)
            self.cpu_times.append(time.process_time() - self._c)

    return StepTimer()


def tp_blocks(torch, d: int, heads: int, col, row) -> dict[str, type]:
    """The tensor-parallel blocks the TP and compile benchmarks time, built from ``col(in, out)`` /
    ``row(in, out)`` (the library's Column/RowParallelLinear, or torch.nn.Linear for DTensor's
    ``parallelize_module``). Returns the classes: ``"mlp"`` (fc1 -> gelu -> fc2, hidden 4 d),
    ``"attention"`` (q, k, v -> causal SDPA -> o, heads split over the ranks) and ``"block"``
    (attention then MLP, each with a residual). torch is passed in: callers import it only after
    :func:`reexec_with_malloc_env`."""
    import torch.nn.functional as F

    class MLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = col(d, 4 * d), row(4 * d, d)

        def forward(self, x):
            return self.fc2(F.gelu(self.fc1(x)))

    class Attention(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v = col(d, d), col(d, d), col(d, d)
            self.o = row(d, d)

        def forward(self, x):
            b, s, _ = x.shape
            q, k, v = (p(x) for p in (self.q, self.k, self.v))
            local, hd = q.shape[-1], d // heads  # d / tp under either implementation
            q, k, v = (t.view(b, s, local // hd, hd).transpose(1, 2) for t in (q, k, v))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.o(a.transpose(1, 2).reshape(b, s, local))

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention, self.mlp = Attention(), MLP()

        def forward(self, x):
            x = x + self.attention(x)
            return x + self.mlp(x)

    return {"mlp": MLP, "attention": Attention, "block": Block}
