"""Per-rank cost of building the process groups at 1,024 - 65,536 ranks, on torch's fake backend.

One process plays one rank of a huge job at a time (``FakeStore`` + backend ``"fake"``), so what is
measured is the rank's own work: how many ``new_group`` calls it makes and how long the build takes.

Variants, built the same way for the same sizes:
- parallelctx: ``ParallelContext.from_torch`` (a rank creates only its own groups);
- init_device_mesh: torch's ``init_device_mesh`` over the same five dims;
- every-rank-every-group: Megatron-core / OSLO style, each rank calls ``new_group`` for every group
  of every mode (the same 9 modes' groups), as their ``initialize_model_parallel`` does.

    python benchmarks/bench_context_scale.py [--worlds 1024 4096 16384 65536] [--baseline-max 16384]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch.distributed as dist
import torch.distributed.device_mesh as dm_module
import torch.distributed.distributed_c10d as c10d
from torch.distributed.device_mesh import init_device_mesh
from torch.testing._internal.distributed.fake_pg import FakeStore

from lightning_parallelctx import ParallelContext
from lightning_parallelctx.initializers import compute_mode_groups, initializers_for
from lightning_parallelctx.layout import RankLayout

SIZES = dict(tensor=8, pipeline=4, sequence=2, expert=2)


class CountGroupCreation:
    """Counts group-creation calls, whichever API makes them: ``new_group`` (which every path,
    DeviceMesh's included, funnels into ``_new_group_with_tag``) and DeviceMesh's ``split_group``.
    A rank that is not a member still pays for the call: that is the O(world) cost."""

    def __enter__(self) -> "CountGroupCreation":
        self.calls = 0
        self._patched = [(c10d, "_new_group_with_tag"), (dm_module, "split_group")]
        self._saved = [getattr(mod, name) for mod, name in self._patched]
        for (mod, name), orig in zip(self._patched, self._saved):
            setattr(mod, name, self._counting(orig))
        return self

    def _counting(self, orig):
        def counted(*args, **kwargs):
            self.calls += 1
            return orig(*args, **kwargs)

        return counted

    def __exit__(self, *exc) -> None:
        for (mod, name), orig in zip(self._patched, self._saved):
            setattr(mod, name, orig)


def ours(world: int) -> Callable[[], None]:
    def run() -> None:
        ParallelContext.from_torch(tensor_parallel_size=SIZES["tensor"], pipeline_parallel_size=SIZES["pipeline"],
                                   sequence_parallel_size=SIZES["sequence"], expert_parallel_size=SIZES["expert"])

    return run


def device_mesh(world: int) -> Callable[[], None]:
    layout = RankLayout.build(world, **SIZES)
    shape = tuple(layout.sizes[a] for a in reversed(layout.order))

    def run() -> None:
        init_device_mesh("cpu", shape, mesh_dim_names=("pp", "dp", "ep", "sp", "tp"))

    return run


def every_group(world: int) -> Callable[[], None]:
    layout = RankLayout.build(world, **SIZES)
    modes = [compute_mode_groups(i, layout) for i in initializers_for()]

    def run() -> None:
        for m in modes:
            if max(m.sizes()) in (1, world):
                continue
            for g in m:
                dist.new_group(list(g))

    return run


def measure(world: int, rank: int, make: Callable[[int], Callable[[], None]]) -> tuple[float, int]:
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        run = make(world)
        with CountGroupCreation() as counter:
            start = time.perf_counter()
            run()
            seconds = time.perf_counter() - start
        return seconds, counter.calls
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--baseline-max", type=int, default=16384,
                        help="largest world for the O(world) every-rank-every-group baseline")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the results here (benchmarks/run_all.py reads them)")
    args = parser.parse_args()
    results = {}
    variants = {"parallelctx": ours, "init_device_mesh": device_mesh, "every-rank-every-group": every_group}
    print(f"sizes {SIZES}, data derived; per rank: median build ms over ranks/repeats, group-creation calls")
    print(f"{'world':>7} | " + " | ".join(f"{v:>28}" for v in variants) + " | speed-up vs device mesh")
    for world in args.worlds:
        cells, times = [], {}
        for name, make in variants.items():
            if name == "every-rank-every-group" and world > args.baseline_max:
                cells.append(f"{'(not run: O(world))':>28}")
                continue
            samples, calls = [], set()
            for rep in range(args.repeats):  # round-robin would mix global state; ranks vary instead
                for rank in (0, world // 2 + 3, world - 1):
                    seconds, n = measure(world, rank, make)
                    samples.append(seconds)
                    calls.add(n)
            times[name] = statistics.median(samples)
            results.setdefault(str(world), {})[name] = {"ms": times[name] * 1e3, "calls": sorted(calls)}
            cells.append(f"{times[name] * 1e3:>12.1f} ms {'/'.join(map(str, sorted(calls))):>8} calls")
        ratio = times["init_device_mesh"] / times["parallelctx"]
        print(f"{world:>7} | " + " | ".join(cells) + f" | {ratio:.1f}x")
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "sizes": SIZES, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
