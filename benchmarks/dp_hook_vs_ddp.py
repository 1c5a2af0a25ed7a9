"""Data-parallel gradient sync: the library's bucketed hook against torch DDP (docs/benchmarking.md).

2 processes, gloo, a 25.2M-parameter MLP (6 x Linear(2048, 2048)), batch 64 per rank.
One step = zero_grad(set_to_none=True) + forward + backward + gradient sync. The variants run
interleaved round-robin in one process pair (A B C ... A B C ...), each rank's main thread pinned
to its own core, one torch thread, glibc's MALLOC_* thresholds set; a step's time is the max over
the ranks; medians are reported as ratios to torch DDP with default settings. Next to them, the
median CPU time per step (both ranks, every thread, gloo's included): the work each variant does,
which a loaded machine distorts far less than wall time, though it cannot show overlap.

Then the all-reduce bandwidth of the hook's buckets (launched back to back, async, then waited,
as the hook does) against one raw all-reduce of the same number of bytes.

    python benchmarks/dp_hook_vs_ddp.py [--rounds 40] [--warmup 5] [--hook-variants 25 8 25:1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from _bench import dp_mlp, pin_to_core, reexec_with_malloc_env, spawn_measured  # benchmarks/_bench.py


def _parse_hook_variant(spec: str) -> tuple[str, dict]:
    """``cap[:first_cap[:compress[:in_place_mb[:seed]]]]``, e.g. ``25``, ``25:1``, ``25::bf16``,
    ``25:::none``, ``25::::0`` (seed 0: average_in_backward=False, the hook scales every gradient)."""
    cap, first, compress, in_place, seed = (spec.split(":") + ["", "", "", ""])[:5]
    options = {"bucket_cap_mb": float(cap), "first_bucket_cap_mb": float(first) if first else None,
               "compress": compress or None}
    if in_place:
        options["in_place_mb"] = None if in_place == "none" else float(in_place)
    if seed:
        options["average_in_backward"] = seed != "0"
    return f"hook({spec})", options


def _worker(rank: int, world_size: int, args: dict) -> dict:
    cpu = pin_to_core(rank)  # before the process group: gloo threads inherit it
    import torch
    import torch.distributed as dist

    from lightning_parallelctx import ParallelContext
    from lightning_parallelctx.grad_sync import get_gradient_handler

    torch.set_num_threads(1)
    ctx = ParallelContext.from_torch(data_parallel_size=world_size)
    batch = args["batch"]

    variants: dict[str, tuple[torch.nn.Module, object | None]] = {}
    for name, options in map(_parse_hook_variant, args["hook_variants"]):
        model = dp_mlp(torch)
        handler = get_gradient_handler("bucketed", **options)
        variants[name] = (handler.setup(model, ctx), handler)
    model = dp_mlp(torch)
    handler = get_gradient_handler("ddp")
    variants["ddp"] = (handler.setup(model, ctx), handler)
    model = dp_mlp(torch)
    handler = get_gradient_handler("ddp", gradient_as_bucket_view=True)
    variants["ddp(bucket_view)"] = (handler.setup(model, ctx), handler)
    model = dp_mlp(torch)
    handler = get_gradient_handler("allreduce")
    variants["flat allreduce"] = (handler.setup(model, ctx), handler)
    variants["no sync"] = (dp_mlp(torch), None)
    names = list(variants)

    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(batch, 2048, generator=gen)

    def step(name: str) -> tuple[float, float]:
        model, handler = variants[name]
        dist.barrier()  # both ranks start together: a late start must not count as sync time
        c0, t0 = time.process_time(), time.perf_counter()
        model.zero_grad(set_to_none=True)
        loss = model(x).square().mean()
        if handler is None:
            loss.backward()
        else:  # as ParallelCtxStrategy.backward does (the DDP and flat handlers hand the loss back as it is)
            with handler.scaled_backward(loss) as seeded:
                seeded.backward()
        if handler is not None:
            handler.finish()
        return time.perf_counter() - t0, time.process_time() - c0

    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}  # this process's CPU time, gloo's threads included
    for r in range(args["warmup"] + args["rounds"]):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate: no variant always runs first
        for name in order:
            t, c = step(name)
            if r >= args["warmup"]:
                times[name].append(t)
                cpu[name].append(c)

    # Bandwidth: the hook's buckets all-reduced as the hook does vs one raw all-reduce of the same bytes.
    hook_name = names[0]
    buffers = variants[hook_name][1].hook.communication_buffers()
    total = sum(b.numel() for b in buffers)
    raw = torch.zeros(total, dtype=buffers[0].dtype)
    bw = {"buckets": [], "raw": []}
    for r in range(args["bw_reps"] + 2):
        for kind in ("buckets", "raw"):
            dist.barrier()
            t0 = time.perf_counter()
            if kind == "buckets":
                works = [dist.all_reduce(b, async_op=True) for b in buffers]
                for w in works:
                    w.wait()
            else:
                dist.all_reduce(raw)
            if r >= 2:
                bw[kind].append(time.perf_counter() - t0)

    # A step's time is the slowest rank's.
    rows = []
    for series in [times[n] for n in names] + [bw["buckets"], bw["raw"]]:
        t = torch.tensor(series, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        rows.append(t.tolist())
    cpu_rows = []  # work, not time: summed over the ranks
    for n in names:
        c = torch.tensor(cpu[n], dtype=torch.float64)
        dist.all_reduce(c)
        cpu_rows.append(c.tolist())
    result = {"names": names, "times": rows[: len(names)], "cpu_s": cpu_rows, "bw_buckets": rows[-2], "bw_raw": rows[-1],
              "bytes": total * buffers[0].element_size(), "n_buckets": len(buffers),
              "buckets_mb": [round(b.numel() * b.element_size() / 2**20, 2) for b in buffers],
              "cpu": cpu}
    ctx.destroy()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40, help="measured rounds (each runs every variant once)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--bw-reps", type=int, default=20)
    parser.add_argument("--hook-variants", nargs="+", default=["25"],
                        help="bucket_cap_mb[:first_bucket_cap_mb[:compress[:in_place_mb[:seed]]]] of each hook variant, "
                             "e.g. 25 25:1 25::bf16 25:::none (every parameter through a bucket) 25::::0 (the hook "
                             "scales every gradient instead of the backward's seed); "
                             "the first one's buckets are used for the bandwidth figure")
    parser.add_argument("--json", help="also write the raw figures here")
    args = parser.parse_args()
    reexec_with_malloc_env()

    result, wall, load_before = spawn_measured(_worker, 2, dict(vars(args)))
    med = {n: statistics.median(t) for n, t in zip(result["names"], result["times"])}
    # Other processes on these shared cores only ever add time: the 10th percentile is a second,
    # less load-sensitive view next to the median.
    p10 = {n: statistics.quantiles(t, n=10)[0] for n, t in zip(result["names"], result["times"])}
    base, base10 = med["ddp"], p10["ddp"]
    # Each round runs every variant back to back, so a round's ratio compares steps taken under
    # the same background load: the median of those is the most load-robust figure.
    ddp_times = result["times"][result["names"].index("ddp")]
    paired = {n: statistics.median(a / b for a, b in zip(t, ddp_times)) for n, t in zip(result["names"], result["times"])}
    print(f"2 ranks, gloo, 6 x Linear(2048, 2048) = 25.2M params, batch {args.batch}, "
          f"{args.rounds} rounds (+{args.warmup} warm-up), interleaved; step = max over ranks; wall {wall:.0f} s; "
          f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    # CPU time (both ranks, every thread) counts the work a variant does (copies, reductions, sends),
    # not how well it overlaps: on a loaded machine it still shows a removed copy when wall times are noise.
    cpu_med = {n: statistics.median(c) for n, c in zip(result["names"], result["cpu_s"])}
    cpu_ratio = {n: cpu_med[n] / cpu_med["ddp"] for n in cpu_med}
    print(f"{'variant':<22}{'median ms':>10}{'ratio to DDP':>14}{'paired ratio':>14}{'p10 ms':>9}{'p10 ratio':>11}"
          f"{'CPU ms':>8}{'CPU ratio':>11}")
    for n in result["names"]:
        print(f"{n:<22}{med[n] * 1e3:>10.1f}{med[n] / base:>14.3f}{paired[n]:>14.3f}{p10[n] * 1e3:>9.1f}"
              f"{p10[n] / base10:>11.3f}{cpu_med[n] * 1e3:>8.1f}{cpu_ratio[n]:>11.3f}")
    bb, br = statistics.median(result["bw_buckets"]), statistics.median(result["bw_raw"])
    gb = result["bytes"] / 1e9
    print(f"all-reduce of {result['bytes'] / 2**20:.1f} MiB: hook's {result['n_buckets']} buckets "
          f"{result['buckets_mb']} MiB: {bb * 1e3:.1f} ms = {gb / bb:.2f} GB/s; one raw all-reduce: "
          f"{br * 1e3:.1f} ms = {gb / br:.2f} GB/s (ratio {bb / br:.3f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"median_s": med, "ratio": {n: med[n] / base for n in med}, "p10_s": p10, "paired_ratio": paired,
                       "cpu_ratio": cpu_ratio, **result}, f)


if __name__ == "__main__":
    main()
