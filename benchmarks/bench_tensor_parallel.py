"""Tensor-parallel MLP and attention block, fwd+bwd: lightning_parallelctx.nn against torch's
``parallelize_module`` with ColwiseParallel / RowwiseParallel (DTensor), same shapes, same ranks.

2 processes, gloo, tp=2. Both variants are built from the same seed and checked to produce the
same output before timing. One step = zero_grad(set_to_none=True) + forward + backward of
``(block(x) * g).sum()``: the output is read, as the next layer of a model reads it (with
``--unread-output``, ``block(x).backward(g)`` instead, which lets DTensor's asynchronous forward
all-reduce overlap the whole backward pass, something no real model allows). Variants run
interleaved round-robin (rotating which goes first), each rank's main thread pinned to its own
core, one torch thread, glibc MALLOC_* thresholds set (docs/benchmarking.md); a step's time is the max
over ranks; ratios of the medians and medians of the per-round ratios ("paired").

    python benchmarks/bench_tensor_parallel.py [--rounds 30] [--warmup 5] [--d-model 512] [--tokens 512]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from _bench import interleaved, pin_to_core, reexec_with_malloc_env, tp_block_args, tp_blocks  # benchmarks/_bench.py


def _build(torch, kind: str, impl: str, d: int, heads: int, ctx):
    """The MLP or attention block (benchmarks/_bench.py), from our layers or DTensor's plan."""
    import lightning_parallelctx.nn as N

    torch.manual_seed(0)
    if impl == "parallelctx":
        return tp_blocks(torch, d, heads, N.ColumnParallelLinear, N.RowParallelLinear)[kind]()
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = tp_blocks(torch, d, heads, torch.nn.Linear, torch.nn.Linear)[kind]()
    plan = ({"fc1": ColwiseParallel(), "fc2": RowwiseParallel()} if kind == "mlp" else
            {"q": ColwiseParallel(), "k": ColwiseParallel(), "v": ColwiseParallel(), "o": RowwiseParallel()})
    return parallelize_module(model, ctx.device_mesh["tp"], plan)


def _worker(rank: int, world_size: int, args: dict) -> dict:
    pin_to_core(rank)  # before the process group: gloo threads inherit it
    import torch
    import torch.distributed as dist

    from lightning_parallelctx import ParallelContext
    from lightning_parallelctx.distributed import set_current_context

    torch.set_num_threads(1)
    ctx = ParallelContext.from_torch(tensor_parallel_size=world_size)
    set_current_context(ctx)
    d, tokens, heads = args["d_model"], args["tokens"], args["heads"]
    batch = args["batch"]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, tokens // batch, d, generator=gen)
    g = torch.randn(batch, tokens // batch, d, generator=gen)

    variants = {}
    check = {}
    for kind in ("mlp", "attention"):
        outs = {}
        for impl in ("parallelctx", "torch-DTensor"):
            model = _build(torch, kind, impl, d, heads, ctx)
            variants[f"{kind}/{impl}"] = model
            outs[impl] = model(x.clone().requires_grad_()).detach()
        check[kind] = float((outs["parallelctx"] - outs["torch-DTensor"]).abs().max())
    names = list(variants)

    def step(name: str) -> float:
        model = variants[name]
        xi = x.clone().requires_grad_()
        dist.barrier()  # both ranks start together
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        # The output is used, as the next layer of a real model would use it: DTensor's collectives
        # are asynchronous, and .backward(g) alone never reads the output, which would let its
        # forward all-reduce overlap the backward pass for free. The loss's gradient is g.
        if args["unread_output"]:
            model(xi).backward(g)
        else:
            (model(xi) * g).sum().backward()
        return time.perf_counter() - t0

    rows = interleaved(step, names, args["rounds"], args["warmup"])
    ctx.destroy()
    return {"times": rows, "check": check}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tp_block_args(parser, rounds=30, warmup=5, d_model=512, tokens=512)
    parser.add_argument("--unread-output", action="store_true", help="step = block(x).backward(g) (see above)")
    args = parser.parse_args()
    reexec_with_malloc_env()
    from lightning_parallelctx.testing import spawn

    started = time.perf_counter()
    res = spawn(_worker, 2, dict(vars(args)), timeout=3600)[0]
    wall = time.perf_counter() - started
    print(f"2 ranks, gloo, tp=2, d_model={args.d_model} (MLP hidden {4 * args.d_model}, {args.heads} heads), "
          f"{args.tokens} tokens (batch {args.batch}); fwd+bwd; {args.rounds} rounds (+{args.warmup} warm-up) "
          f"interleaved; step = max over ranks; wall {wall:.0f} s")
    print(f"{'block':<11}{'parallelctx ms':>16}{'torch TP ms':>13}{'median':>8}{'paired':>8}{'  max |out diff|':>17}")
    rows = {}
    for kind in ("mlp", "attention"):
        ours_t, theirs_t = res["times"][f"{kind}/parallelctx"], res["times"][f"{kind}/torch-DTensor"]
        ours, theirs = statistics.median(ours_t), statistics.median(theirs_t)
        paired = statistics.median(a / b for a, b in zip(ours_t, theirs_t))
        rows[kind] = {"ours_ms": ours * 1e3, "peer_ms": theirs * 1e3, "median": ours / theirs, "paired": paired,
                      "max_diff": res["check"][kind]}
        print(f"{kind:<11}{ours * 1e3:>16.2f}{theirs * 1e3:>13.2f}{ours / theirs:>8.3f}{paired:>8.3f}"
              f"{res['check'][kind]:>17.2e}")
    print("median = ratio of the medians; paired = median of the per-round ratios; below 1 = ours faster")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "wall_s": wall, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
