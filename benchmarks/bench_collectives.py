"""Each lightning_parallelctx.distributed collective against the raw torch.distributed call(s) it
wraps, same bytes, same group (2 processes, gloo).

For each pair the wrapper's extra work (autograd node, layout handling, input copies it makes so
that inputs are never modified) shows as a ratio above 1. Where the layout forces work on anyone
(a gather along the last dim), two raw baselines are given: the textbook one (``all_gather`` into
a fresh list + ``torch.cat``, torchshard/Megatron style) and the best hand-written one.

Method (BENCHMARKING.md): variants interleaved round-robin with a rotating start, each rank
pinned to its own core, one torch thread, glibc MALLOC_* thresholds set, a call's time is the max
over ranks, medians; ratios are within one run.

    python benchmarks/bench_collectives.py [--rounds 40] [--mib 8] [--small-kib 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

from _bench import pin_to_core, reexec_with_malloc_env  # benchmarks/_bench.py


def _cases(torch, dist, D, group, n: int, rows: int, cols: int):
    """name -> (ours, raw baselines...) zero-argument callables over tensors of rows x cols fp32."""
    full = torch.randn(rows, cols)
    piece0 = torch.randn(rows // n, cols)  # this rank's piece along dim 0
    piece1 = torch.randn(rows, cols // n)  # ... along the last dim
    grad_full = torch.randn(rows, cols)
    ag_out = torch.empty(rows, cols)
    rs_out = torch.empty(rows // n, cols)
    a2a_out = torch.empty(rows, cols)

    def leaf(t):
        return t.detach().requires_grad_()  # a fresh autograd leaf over the same storage

    def raw_all_reduce():
        buf = full.clone()  # the raw call reduces in place; the wrapper must not touch its input
        dist.all_reduce(buf, group=group)

    def raw_all_reduce_inplace():
        dist.all_reduce(grad_full, group=group)

    def raw_ag_dim0():
        dist.all_gather_single(ag_out.view(-1), piece0.view(-1), group=group)

    def raw_ag_list_cat_last():
        outs = [torch.empty_like(piece1) for _ in range(n)]
        dist.all_gather(outs, piece1.contiguous(), group=group)
        return torch.cat(outs, -1)

    def raw_ag_buffer_last():
        buf = torch.empty(n, rows, cols // n)
        dist.all_gather_single(buf.view(-1), piece1.contiguous().view(-1), group=group)
        return buf.movedim(0, 1).reshape(rows, cols)

    def raw_rs_dim0():
        dist.reduce_scatter_single(rs_out.view(-1), full.view(-1), group=group)

    def raw_rs_list_last():
        out = torch.empty(rows, cols // n)
        dist.reduce_scatter(out, [c.contiguous() for c in full.chunk(n, -1)], group=group)

    def raw_a2a():
        dist.all_to_all_single(a2a_out.view(-1), full.view(-1), group=group)

    def raw_a2a_relayout():  # what a hand-written gather along dim 1 needs after the exchange
        dist.all_to_all_single(a2a_out.view(-1), full.view(-1), group=group)
        return a2a_out.view(n, rows // n, cols).movedim(0, 1).reshape(rows // n, n * cols)

    def raw_a2a_pack():  # a hand-written scatter along dim 1: pack the chunks on dim 0 first
        packed = full.view(rows, n, cols // n).movedim(1, 0).contiguous()
        dist.all_to_all_single(a2a_out.view(-1), packed.view(-1), group=group)

    def ours_copy_bwd():
        x = leaf(full)
        D.copy(x).backward(grad_full)

    def ours_scatter_bwd():
        x = leaf(full)
        D.scatter(x, -1).backward(grad_full.chunk(n, -1)[0].contiguous())

    return {
        "reduce (fwd all-reduce)": (lambda: D.reduce(leaf(full)), raw_all_reduce, raw_all_reduce_inplace),
        "copy (fwd+bwd all-reduce)": (ours_copy_bwd, raw_all_reduce, raw_all_reduce_inplace),
        "gather dim 0, sizes given": (lambda: D.gather(leaf(piece0), 0, sizes=rows), raw_ag_dim0),
        "gather dim 0, sizes exchanged": (lambda: D.gather(leaf(piece0), 0), raw_ag_dim0),
        "gather dim -1, sizes given": (lambda: D.gather(leaf(piece1), -1, sizes=cols), raw_ag_list_cat_last,
                                       raw_ag_buffer_last),
        "all_gather dim 0, sizes given": (lambda: D.all_gather(leaf(piece0), 0, sizes=rows), raw_ag_dim0),
        "scatter dim -1 (fwd+bwd all-gather)": (ours_scatter_bwd, raw_ag_list_cat_last, raw_ag_buffer_last),
        "reduce_scatter dim 0": (lambda: D.reduce_scatter(leaf(full), 0), raw_rs_dim0),
        "reduce_scatter dim -1": (lambda: D.reduce_scatter(leaf(full), -1), raw_rs_list_last),
        "all_to_all scatter 0, gather 1": (lambda: D.all_to_all(leaf(full), 0, 1, gather_sizes=n * cols), raw_a2a,
                                           raw_a2a_relayout),
        "all_to_all scatter 1, gather 0": (lambda: D.all_to_all(leaf(full), 1, 0, gather_sizes=n * rows), raw_a2a,
                                           raw_a2a_pack),
    }


BASELINE_NAMES = ["raw", "raw (best by hand)"]


def _worker(rank: int, world_size: int, args: dict) -> dict:
    pin_to_core(rank)  # before the process group: gloo threads inherit it
    import warnings

    import torch
    import torch.distributed as dist

    import lightning_parallelctx.distributed as D
    from lightning_parallelctx import ParallelContext

    warnings.simplefilter("error")  # a deprecated call on torch 2.13 would show here
    torch.set_num_threads(1)
    ctx = ParallelContext.from_torch(tensor_parallel_size=world_size)
    D.set_current_context(ctx)
    group = ctx.get_group("tensor")
    out = {}
    for label, nbytes, reps in (("large", args["mib"] * 2**20, 1), ("small", args["small_kib"] * 2**10, 20)):
        cols = 256
        rows = max(4 * world_size, nbytes // 4 // cols)
        rows -= rows % world_size
        cases = _cases(torch, dist, D, group, world_size, rows, cols)
        flat = [(name, i) for name, fns in cases.items() for i in range(len(fns))]
        times = {key: [] for key in flat}
        for r in range(args["warmup"] + args["rounds"]):
            order = flat[r % len(flat):] + flat[: r % len(flat)]
            for name, i in order:
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(reps):  # small messages: time a burst, the barrier's jitter would swamp one call
                    cases[name][i]()
                t = (time.perf_counter() - t0) / reps
                if r >= args["warmup"]:
                    times[(name, i)].append(t)
        res = {}
        for (name, _), series in times.items():  # insertion order: ours, raw, best raw
            t = torch.tensor(series, dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            res.setdefault(name, []).append(statistics.median(t.tolist()))
        out[label] = {"bytes": rows * cols * 4, "medians": res, "reps": reps}
    ctx.destroy()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--mib", type=int, default=8, help="size of the full tensor, large case")
    parser.add_argument("--small-kib", type=int, default=64, help="size of the full tensor, small case")
    args = parser.parse_args()
    reexec_with_malloc_env()
    from lightning_parallelctx.testing import spawn

    started = time.perf_counter()
    res = spawn(_worker, 2, dict(vars(args)), timeout=3600)[0]
    wall = time.perf_counter() - started
    print(f"2 ranks, gloo, fp32; {args.rounds} rounds (+{args.warmup} warm-up) interleaved; "
          f"time = max over ranks, medians; wall {wall:.0f} s")
    for label, block in res.items():
        print(f"\n{label}: full tensor {block['bytes'] / 2**20:.3f} MiB (per call; timed in bursts of {block['reps']})")
        print(f"{'collective':<38}{'ours ms':>9}{'raw ms':>9}{'ratio':>7}{'best raw ms':>13}{'ratio':>7}")
        for name, meds in block["medians"].items():
            line = f"{name:<38}{meds[0] * 1e3:>9.3f}{meds[1] * 1e3:>9.3f}{meds[0] / meds[1]:>7.2f}"
            if len(meds) > 2:
                line += f"{meds[2] * 1e3:>13.3f}{meds[0] / meds[2]:>7.2f}"
            print(line)
    print("\nraw: the plain torch.distributed call(s) on the same bytes; reduce/copy raw = clone + all_reduce, "
          "best raw = in-place all_reduce;\ngather/scatter dim -1 raw = all_gather into a fresh list + cat(-1), "
          "best raw = all_gather_single into one buffer + movedim;\nreduce_scatter dim -1 raw = list reduce_scatter "
          "of contiguous chunks;\nall_to_all raw = all_to_all_single on dim 0 (no re-layout), best raw = the same + "
          "the hand-written re-layout the dims need.")


if __name__ == "__main__":
    main()
