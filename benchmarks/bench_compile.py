"""torch.compile on a tensor-parallel block built from lightning_parallelctx.nn: compiled against
eager, same module, same ranks (2 processes, gloo, tp=2).

The block: attention (column q, k, v -> causal SDPA -> row o) and an MLP (column -> gelu -> row,
hidden 4 d), each with a residual. The whole forward compiles to one graph (``fullgraph=True``;
tests/test_compile.py checks outputs and gradients). Both variants are checked to give the same
output (within fp32 round-off: inductor fuses) before timing; compile time is reported apart.
One step = zero_grad(set_to_none=True) + forward + backward of ``(block(x) * g).sum()``.
Method (docs/benchmarking.md): interleaved round-robin, ranks pinned to cores, one torch thread,
glibc MALLOC_* thresholds, step = max over ranks; ratio of medians and median of per-round ratios.

    python benchmarks/bench_compile.py [--rounds 30] [--d-model 256] [--tokens 64] [--backend inductor]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from _bench import interleaved, pin_to_core, reexec_with_malloc_env, tp_block_args, tp_blocks  # benchmarks/_bench.py


def _block(torch, d: int, heads: int):
    import lightning_parallelctx.nn as N

    torch.manual_seed(0)
    return tp_blocks(torch, d, heads, N.ColumnParallelLinear, N.RowParallelLinear)["block"]()


def _worker(rank: int, world_size: int, args: dict) -> dict:
    pin_to_core(rank)  # before the process group: gloo threads inherit it
    import copy

    import torch
    import torch.distributed as dist

    from lightning_parallelctx import ParallelContext

    torch.set_num_threads(1)
    ctx = ParallelContext.from_torch(tensor_parallel_size=world_size)
    d, tokens, batch = args["d_model"], args["tokens"], args["batch"]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, tokens // batch, d, generator=gen)
    g = torch.randn(batch, tokens // batch, d, generator=gen)
    eager = _block(torch, d, args["heads"])
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, backend=args["backend"], fullgraph=True)
    variants = {"eager": (eager, eager), "compiled": (compiled, compiled_module)}

    def step(name: str) -> float:
        fn, module = variants[name]
        xi = x.clone().requires_grad_()
        dist.barrier()
        t0 = time.perf_counter()
        module.zero_grad(set_to_none=True)
        (fn(xi) * g).sum().backward()
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    step("compiled")  # compiles forward and backward
    compile_s = time.perf_counter() - t0
    diff = float((eager(x) - compiled(x)).detach().abs().max())
    out = interleaved(step, list(variants), args["rounds"], args["warmup"])
    ctx.destroy()
    return {"times": out, "compile_s": compile_s, "diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tp_block_args(parser, rounds=30, warmup=3, d_model=256, tokens=64)
    parser.add_argument("--backend", default="inductor")
    args = parser.parse_args()
    reexec_with_malloc_env()
    from lightning_parallelctx.testing import spawn

    started = time.perf_counter()
    res = spawn(_worker, 2, dict(vars(args)), timeout=3600)[0]
    wall = time.perf_counter() - started
    eager_t, comp_t = res["times"]["eager"], res["times"]["compiled"]
    row = {"eager_ms": statistics.median(eager_t) * 1e3, "compiled_ms": statistics.median(comp_t) * 1e3,
           "median": statistics.median(comp_t) / statistics.median(eager_t),
           "paired": statistics.median(c / e for c, e in zip(comp_t, eager_t)),
           "compile_s": res["compile_s"], "max_diff": res["diff"]}
    print(f"2 ranks, gloo, tp=2, TP attention + MLP block, d_model={args.d_model}, {args.tokens} tokens, "
          f"backend {args.backend}; fwd+bwd; {args.rounds} rounds (+{args.warmup}) interleaved; wall {wall:.0f} s")
    print(f"eager {row['eager_ms']:.2f} ms, compiled {row['compiled_ms']:.2f} ms: compiled / eager = "
          f"{row['median']:.3f} (paired {row['paired']:.3f}); first compiled step (compilation) "
          f"{row['compile_s']:.1f} s; max |out diff| {row['max_diff']:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "wall_s": wall, "results": row}, f, indent=1)


if __name__ == "__main__":
    main()
