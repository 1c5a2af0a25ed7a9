"""Each lightning_parallelctx.distributed collective against its hand-written raw torch.distributed
equivalent, same bytes, same group (2 processes, gloo, fp32).

Two tables per message size:
- forward + backward, ours against a minimal hand-written ``torch.autograd.Function`` over the raw
  calls (group, split and layout hard-coded, nothing checked): the cost of everything the library
  adds (group lookup, argument checks, size handling, layout code) on top of what any
  differentiable collective needs;
- forward only with an input that needs no gradient, ours against the bare raw call(s) (plus
  the allocation and re-layout any caller needs: the library never modifies its input, so the
  raw all-reduce reduces a clone).
Ours and the peer are checked to give the same output and input gradient before timing.

"gather dim 0, sizes=None" is the one case with more communication by design: without ``sizes=``
a rank cannot know the other pieces' sizes, so they are exchanged first (one small all-gather);
pass ``sizes=`` (the layers do) and it is the same single call as the peer.

Method (docs/benchmarking.md): each round times every case as two bursts of ours and two of the
peer in an order shuffled per round (a seed the ranks share), cases in a rotating order; each rank pinned to its own core,
one torch thread, glibc MALLOC_* thresholds set, a call's time is the max over ranks; small
messages are timed in bursts (a barrier's jitter would swamp one call). With ``--fake`` the clock
is the thread's CPU time (everything runs in the calling thread, so time the core spent on other
processes does not count), otherwise wall time, and beside it the CPU time of each rank's whole
process (all threads, gloo's included) summed over the ranks: at 64 KiB the wall time is mostly
thread wake-up latency and swings +-30% between runs, the CPU time is the work. Ratios: "median" =
ratio of the medians, "paired" = median of the per-round ratios (robust to drift) with its 95%
bootstrap interval over the rounds, "min" / "added us" = ratio and difference of the fastest rounds
(the right statistic with ``--fake``, where a call is pure CPU work that neighbours can only slow
down). The "A/A calibration" rows time the same peer as both sides: their ratio is 1 by
construction, so their interval is the method's noise floor, to read next to the 1.05 goal.

    python benchmarks/bench_collectives.py [--rounds 30] [--mib 8] [--small-kib 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from _bench import pin_to_core, reexec_with_malloc_env  # benchmarks/_bench.py


AA_CASE = "A/A calibration: the reduce peer as both sides"


def paired_interval(ours: list[float], peer: list[float], resamples: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of the paired ratio (median of the per-round ratios ours / peer):
    the rounds are resampled with replacement, with a fixed seed so reruns of one result agree."""
    ratios = [a / b for a, b in zip(ours, peer)]
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return meds[int(0.025 * resamples)], meds[int(0.975 * resamples) - 1]


def _hand_written(torch, dist, group, n: int, rank: int):
    """The raw equivalents as minimal autograd functions (even splits, everything hard-coded)."""
    F = torch.autograd.Function

    def ag0(x):  # all-gather along dim 0 into one buffer
        x = x.contiguous()
        out = x.new_empty((n * x.shape[0], *x.shape[1:]))
        dist.all_gather_single(out.view(-1), x.view(-1), group=group)
        return out

    def ag_last(x):
        x = x.contiguous()
        out = x.new_empty((n, *x.shape))
        dist.all_gather_single(out.view(-1), x.view(-1), group=group)
        return out.movedim(0, -2).flatten(-2)

    def rs0(x):
        x = x.contiguous()
        out = x.new_empty((x.shape[0] // n, *x.shape[1:]))
        dist.reduce_scatter_single(out.view(-1), x.view(-1), group=group)
        return out

    def rs_last(x):
        packed = x.unflatten(-1, (n, x.shape[-1] // n)).movedim(-2, 0).contiguous()
        out = x.new_empty(packed.shape[1:])
        dist.reduce_scatter_single(out.view(-1), packed.view(-1), group=group)
        return out

    def all_reduce(x):
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    def a2a(x, sd, gd):
        c = x.shape[sd] // n
        inp = x.unflatten(sd, (n, c)).movedim(sd, 0).contiguous()
        out = torch.empty_like(inp)
        dist.all_to_all_single(out.view(-1), inp.view(-1), group=group)
        return out.movedim(0, gd).flatten(gd, gd + 1)

    def own(x, dim):
        c = x.shape[dim] // n
        return x.narrow(dim, rank * c, c).contiguous()

    class Copy(F):
        @staticmethod
        def forward(ctx, x):
            return x

        @staticmethod
        def backward(ctx, g):
            return all_reduce(g)

    class Reduce(F):
        @staticmethod
        def forward(ctx, x):
            return all_reduce(x)

        @staticmethod
        def backward(ctx, g):
            return g

    class ScatterLast(F):
        @staticmethod
        def forward(ctx, x):
            return own(x, -1)  # a narrow of the last dim is not contiguous: .contiguous() copies

        @staticmethod
        def backward(ctx, g):
            return ag_last(g)

    class Gather0(F):
        @staticmethod
        def forward(ctx, x):
            return ag0(x)

        @staticmethod
        def backward(ctx, g):
            return own(g, 0)

    class GatherLast(F):
        @staticmethod
        def forward(ctx, x):
            return ag_last(x)

        @staticmethod
        def backward(ctx, g):
            return own(g, -1)

    class AllGather0(F):
        @staticmethod
        def forward(ctx, x):
            return ag0(x)

        @staticmethod
        def backward(ctx, g):
            return rs0(g)

    class ReduceScatter0(F):
        @staticmethod
        def forward(ctx, x):
            return rs0(x)

        @staticmethod
        def backward(ctx, g):
            return ag0(g)

    class ReduceScatterLast(F):
        @staticmethod
        def forward(ctx, x):
            return rs_last(x)

        @staticmethod
        def backward(ctx, g):
            return ag_last(g)

    class A2A01(F):
        @staticmethod
        def forward(ctx, x):
            return a2a(x, 0, 1)

        @staticmethod
        def backward(ctx, g):
            return a2a(g, 1, 0)

    class A2A10(F):
        @staticmethod
        def forward(ctx, x):
            return a2a(x, 1, 0)

        @staticmethod
        def backward(ctx, g):
            return a2a(g, 0, 1)

    class TokenA2A(F):  # uneven all-to-all of rows, counts known
        @staticmethod
        def forward(ctx, x, send, recv):
            ctx.counts = (send, recv)
            out = x.new_empty((sum(recv), *x.shape[1:]))
            dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
            return out

        @staticmethod
        def backward(ctx, g):
            send, recv = ctx.counts
            out = g.new_empty((sum(send), *g.shape[1:]))
            dist.all_to_all_single(out, g.contiguous(), send, recv, group=group)
            return out, None, None

    def moe_round_trip(x, idx, num_experts, expert_fn):  # dispatch, expert_fn, combine: 3 all-to-alls
        order = torch.argsort(idx, stable=True)
        counts = torch.bincount(idx, minlength=num_experts)
        got = torch.empty_like(counts)
        dist.all_to_all_single(got, counts, group=group)
        send, recv = counts.view(n, -1).sum(1).tolist(), got.view(n, -1).sum(1).tolist()
        back = TokenA2A.apply(expert_fn(TokenA2A.apply(x.index_select(0, order), send, recv)), recv, send)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel())
        return back.index_select(0, inverse)

    funcs = dict(copy=Copy, reduce=Reduce, scatter_last=ScatterLast, gather0=Gather0, gather_last=GatherLast,
                 all_gather0=AllGather0, rs0=ReduceScatter0, rs_last=ReduceScatterLast, a2a01=A2A01, a2a10=A2A10)
    raw = dict(ag0=ag0, ag_last=ag_last, rs0=rs0, rs_last=rs_last, all_reduce=all_reduce, a2a=a2a, moe=moe_round_trip)
    return {k: f.apply for k, f in funcs.items()}, raw


def _cases(torch, dist, D, group, n: int, rank: int, rows: int, cols: int):
    """name -> (ours, peer): zero-argument callables returning (output, input grad or None)."""
    hw, raw = _hand_written(torch, dist, group, n, rank)
    gen = torch.Generator().manual_seed(rank)
    full = torch.randn(rows, cols, generator=gen)
    piece0 = torch.randn(rows // n, cols, generator=gen)
    piece1 = torch.randn(rows, cols // n, generator=gen)
    g_full = torch.randn(rows, cols, generator=gen)
    g_piece0 = torch.randn(rows // n, cols, generator=gen)
    g_piece1 = torch.randn(rows, cols // n, generator=gen)
    g_a2a01 = torch.randn(rows // n, n * cols, generator=gen)

    def fb(fn, x, g):
        def run():
            leaf = x.detach().requires_grad_()
            y = fn(leaf)
            y.backward(g)
            return y, leaf.grad
        return run

    def fwd(fn, x):
        return lambda: (fn(x), None)

    both = {
        "copy": (D.copy, hw["copy"], full, g_full),
        "reduce": (D.reduce, hw["reduce"], full, g_full),
        "scatter dim -1": (lambda x: D.scatter(x, -1), hw["scatter_last"], full, g_piece1),
        "gather dim 0": (lambda x: D.gather(x, 0, sizes=rows), hw["gather0"], piece0, g_full),
        "gather dim -1": (lambda x: D.gather(x, -1, sizes=cols), hw["gather_last"], piece1, g_full),
        "gather dim 0, sizes=None (+1 size exchange)": (lambda x: D.gather(x, 0), hw["gather0"], piece0, g_full),
        "all_gather dim 0": (lambda x: D.all_gather(x, 0, sizes=rows), hw["all_gather0"], piece0, g_full),
        "reduce_scatter dim 0": (lambda x: D.reduce_scatter(x, 0), hw["rs0"], full, g_piece0),
        "reduce_scatter dim -1": (lambda x: D.reduce_scatter(x, -1), hw["rs_last"], full, g_piece1),
        "all_to_all scatter 0 / gather 1": (lambda x: D.all_to_all(x, 0, 1, gather_sizes=n * cols), hw["a2a01"],
                                            full, g_a2a01),
        "all_to_all scatter 1 / gather 0": (lambda x: D.all_to_all(x, 1, 0, gather_sizes=n * rows), hw["a2a10"],
                                            full, torch.randn(n * rows, cols // n, generator=gen)),
        "sequence_to_heads (Ulysses)": (
            lambda x: D.sequence_to_heads(x.view(1, rows, n * 4, -1), 1, 2, "tensor", seq_sizes=n * rows),
            lambda x: raw_a2a_4d(x.view(1, rows, n * 4, -1)), full, None),
    }

    class _A2A4d(torch.autograd.Function):  # (b, s/n, h, d) -> (b, s, h/n, d) and back
        @staticmethod
        def forward(ctx, x):
            return raw["a2a"](x, 2, 1)

        @staticmethod
        def backward(ctx, g):
            return raw["a2a"](g, 1, 2)

    raw_a2a_4d = _A2A4d.apply
    num_experts = 2 * n
    expert_of_row = torch.randint(0, num_experts, (rows,), generator=gen)

    def ours_moe(x):
        received, _, handle = D.dispatch(x, expert_of_row, num_experts, "tensor")  # the 2-rank group
        return D.combine(received * 2.0, handle)

    both["expert dispatch + combine"] = (ours_moe, lambda x: raw["moe"](x, expert_of_row, num_experts,
                                                                          lambda t: t * 2.0), full, g_full)
    # A/A calibration: both sides are the same peer function (separate closures, separate slots).
    # Its ratio is 1 by construction, so its spread across runs and its interval show the noise
    # floor of the method next to the real ratios.
    both[AA_CASE] = (hw["reduce"], hw["reduce"], full, g_full)
    g_heads = torch.randn(1, n * rows, 4, cols // 4 // n, generator=gen)
    out = {}
    for name, (ours, peer, x, g) in both.items():
        g = g_heads if g is None else g
        out[("fwd+bwd", name)] = (fb(ours, x, g), fb(peer, x, g))
    no_grad = {
        "reduce": (D.reduce, raw["all_reduce"], full),
        "gather dim 0": (lambda x: D.gather(x, 0, sizes=rows), raw["ag0"], piece0),
        "gather dim -1": (lambda x: D.gather(x, -1, sizes=cols), raw["ag_last"], piece1),
        "reduce_scatter dim 0": (lambda x: D.reduce_scatter(x, 0), raw["rs0"], full),
        "all_to_all scatter 1 / gather 0": (lambda x: D.all_to_all(x, 1, 0, gather_sizes=n * rows),
                                            lambda x: raw["a2a"](x, 1, 0), full),
    }
    no_grad[AA_CASE] = (raw["all_reduce"], raw["all_reduce"], full)
    for name, (ours, peer, x) in no_grad.items():
        out[("fwd, no grad", name)] = (fwd(ours, x), fwd(peer, x))
    return out


def _worker(rank: int, world_size: int, args: dict) -> dict:
    if args["fake"]:  # one process plays rank 0 of 2 on torch's no-op backend: only our overhead is timed
        import torch.distributed as dist
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    else:
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
    for label, nbytes, reps in (("8 MiB", args["mib"] * 2**20, 1), ("64 KiB", args["small_kib"] * 2**10, 20)):
        if label == "8 MiB" and args["mib"] != 8:
            label = f"{args['mib']} MiB"
        if label == "64 KiB" and args["small_kib"] != 64:
            label = f"{args['small_kib']} KiB"
        cols = 256
        rows = max(4 * world_size, nbytes // 4 // cols)
        rows -= rows % world_size
        cases = _cases(torch, dist, D, group, world_size, rank, rows, cols)
        if args["fake"]:
            reps = 100 if nbytes < 2**20 else 5  # no communication: calls are short, long bursts steady the minimum
        mismatch = {}
        for key, (ours, peer) in cases.items():  # same results before any timing (not on the no-op backend)
            if args["fake"]:
                mismatch[" / ".join(key)] = float("nan")
                continue
            (yo, go), (yp, gp) = ours(), peer()
            diff = float((yo.detach() - yp.detach()).abs().max())
            if go is not None:
                diff = max(diff, float((go - gp).abs().max()))
            mismatch[" / ".join(key)] = diff
        # The fake backend runs everything in this thread: its CPU time leaves out the time other
        # processes held the core, which is most of the noise on a shared machine. Real
        # communication runs in gloo's threads and waits for the peer: wall time.
        # With real gloo the process's CPU time (all threads: gloo's included) is timed as well:
        # at 64 KiB a call's wall time is mostly waiting for another process's thread to wake up,
        # which varies by +-30% between runs; the CPU time is the work done, summed over ranks.
        clock = time.thread_time if args["fake"] else time.perf_counter
        keys = list(cases)
        times = {(key, i): [] for key in keys for i in range(2)}
        cpu_times = {(key, i): [] for key in keys for i in range(2)}

        def burst(key, i: int) -> tuple[float, float]:
            dist.barrier()
            c0 = time.process_time()
            t0 = clock()
            for _ in range(reps):
                cases[key][i]()
            t1 = clock()
            return (t1 - t0) / reps, (time.process_time() - c0) / reps

        for r in range(args["warmup"] + args["rounds"]):
            for k, key in enumerate(keys[r % len(keys):] + keys[: r % len(keys)]):  # rotate: no case always first
                # Two bursts each of ours (0) and the peer (1) in an order drawn per round from a seed
                # every rank shares. A fixed pattern (A B B A mirrored, or A B | B A) left a position
                # bias at 64 KiB: the same peer call timed in two fixed slots differed by up to 20%,
                # while shuffled slots of identical calls agree to a few per cent.
                slots = [0, 1, 0, 1]
                random.Random(r * 1009 + k).shuffle(slots)
                got: dict[int, list[tuple[float, float]]] = {0: [], 1: []}
                for i in slots:
                    got[i].append(burst(key, i))
                if r >= args["warmup"]:
                    for i in (0, 1):
                        times[(key, i)].append(sum(w for w, _ in got[i]) / 2)
                        cpu_times[(key, i)].append(sum(c for _, c in got[i]) / 2)
        res = {}
        for key in cases:
            t = torch.tensor([times[(key, 0)], times[(key, 1)]], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a call lasts as long as its slowest rank
            ours_t, peer_t = t[0].tolist(), t[1].tolist()
            row = res[" / ".join(key)] = {
                "ours_ms": statistics.median(ours_t) * 1e3, "peer_ms": statistics.median(peer_t) * 1e3,
                "median": statistics.median(ours_t) / statistics.median(peer_t),
                "paired": statistics.median(a / b for a, b in zip(ours_t, peer_t)),
                "paired_ci": paired_interval(ours_t, peer_t),
                # Pure CPU work (the fake backend) only ever gets slower from neighbours: the minimum
                # is its cost, and ours - peer is what the library adds per call.
                "min_ratio": min(ours_t) / min(peer_t), "added_us": (min(ours_t) - min(peer_t)) * 1e6,
            }
            if not args["fake"]:  # the fake backend's clock already is CPU time (of its one thread)
                c = torch.tensor([cpu_times[(key, 0)], cpu_times[(key, 1)]], dtype=torch.float64)
                dist.all_reduce(c)  # work: summed over the ranks
                ours_c, peer_c = c[0].tolist(), c[1].tolist()
                row.update({
                    "ours_cpu_us": statistics.median(ours_c) * 1e6, "peer_cpu_us": statistics.median(peer_c) * 1e6,
                    "cpu_paired": statistics.median(a / b for a, b in zip(ours_c, peer_c)),
                    "cpu_paired_ci": paired_interval(ours_c, peer_c),
                })
        worst = torch.tensor([max(mismatch.values())], dtype=torch.float64)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        out[label] = {"bytes": rows * cols * 4, "reps": reps, "rows": res, "max_diff": float(worst)}
    ctx.destroy()
    if args["fake"]:
        dist.destroy_process_group()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--mib", type=int, default=8, help="size of the full tensor, large case")
    parser.add_argument("--small-kib", type=int, default=64, help="size of the full tensor, small case")
    parser.add_argument("--fake", action="store_true",
                        help="one process on torch's no-op 'fake' backend: times only what runs around the "
                             "communication (ours vs the peer's), free of the network's and the neighbours' noise")
    parser.add_argument("--json", help="also write the results here (benchmarks/run_all.py reads them)")
    args = parser.parse_args()
    reexec_with_malloc_env()
    started = time.perf_counter()
    if args.fake:
        res = _worker(0, 2, dict(vars(args)))
    else:
        from lightning_parallelctx.testing import spawn

        res = spawn(_worker, 2, dict(vars(args)), timeout=3600)[0]
    wall = time.perf_counter() - started
    where = "1 process as rank 0 of 2 on the no-op fake backend (no communication)" if args.fake else "2 ranks, gloo"
    clock = "thread CPU time" if args.fake else "wall time"
    print(f"{where}, fp32; {args.rounds} rounds (+{args.warmup} warm-up) of shuffled bursts (2 ours + 2 peer), {clock}; time = max over "
          f"ranks; ratio = ours / peer (median of medians, and median of per-round ratios); wall {wall:.0f} s")
    for label, block in res.items():
        print(f"\n{label} (full tensor {block['bytes'] / 2**20:.3f} MiB, bursts of {block['reps']}; "
              f"ours vs peer max |diff| {block['max_diff']:.1e})")
        cpu_head = f"{'CPU us ours/peer':>18}{'CPU paired [95% CI]':>24}" if not args.fake else ""
        print(f"{'case':<62}{'ours ms':>9}{'peer ms':>9}{'median':>8}{'paired [95% CI]':>22}{'min':>8}{'added us':>10}"
              + cpu_head)
        for name, row in block["rows"].items():
            lo, hi = row["paired_ci"]
            line = (f"{name:<62}{row['ours_ms']:>9.3f}{row['peer_ms']:>9.3f}{row['median']:>8.3f}"
                    f"{row['paired']:>8.3f} [{lo:.3f}, {hi:.3f}]{row['min_ratio']:>8.3f}{row['added_us']:>10.1f}")
            if "cpu_paired" in row:
                clo, chi = row["cpu_paired_ci"]
                line += (f"{row['ours_cpu_us']:>9.0f}/{row['peer_cpu_us']:<8.0f}"
                         f"{row['cpu_paired']:>10.3f} [{clo:.3f}, {chi:.3f}]")
            print(line)
    print("\npeer: fwd+bwd = a minimal hand-written autograd.Function over the raw torch.distributed calls; "
          "fwd, no grad = the bare raw call(s). [95% CI]: bootstrap interval of the paired ratio over the rounds. "
          f"'{AA_CASE}' is ours = peer: its ratio and interval are the method's noise floor."
          + ("" if args.fake else " CPU: time.process_time per call (all threads, gloo's included), summed over "
             "the ranks: the work done, free of thread wake-up latency."))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "wall_s": wall, "results": res}, f, indent=1)


if __name__ == "__main__":
    main()
