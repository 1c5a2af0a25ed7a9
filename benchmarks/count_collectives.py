"""Instructions per call of each bench_collectives case, ours and the peer, counted by callgrind.

What the library adds around a collective is CPU work in the calling thread; on the no-op "fake"
backend that is all a call does. Counted in instructions (``valgrind --tool=callgrind``, with
instrumentation switched on only around each batch of calls) it does not depend on the machine's
load: repeated runs agree to about 1k instructions per call, so a change of a few hundred is
visible on a shared 2-core machine where thread CPU time swings by +-10 us. Instructions are not
time: cache misses and page faults are not counted, so confirm a change with a timed run
(``bench_collectives.py --fake``) on a quiet machine.

    python benchmarks/count_collectives.py [--calls 100] [--kib 64] [--only gather all_to_all]

Needs valgrind and its ``valgrind/callgrind.h`` header and a C compiler (for a 4-line helper that
issues callgrind's client requests); about 90 s, most of it importing torch under valgrind.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
_HELPER = """#include <valgrind/callgrind.h>
void cg_start(void) { CALLGRIND_START_INSTRUMENTATION; }
void cg_zero(void) { CALLGRIND_ZERO_STATS; }
void cg_dump(const char *name) { CALLGRIND_DUMP_STATS_AT(name); }
"""


def _child(args: argparse.Namespace) -> None:
    """Runs under valgrind: every case's ours and peer, warm, then ``--calls`` calls per dump."""
    import ctypes

    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    sys.path.insert(0, str(HERE))
    import bench_collectives as B

    import lightning_parallelctx.distributed as D
    from lightning_parallelctx import ParallelContext

    lib = ctypes.CDLL(os.environ["PCTX_CG_HELPER"])
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    torch.set_num_threads(1)
    ctx = ParallelContext.from_torch(tensor_parallel_size=2)
    D.set_current_context(ctx)
    cols = 256
    rows = max(8, args.kib * 1024 // 4 // cols)
    rows -= rows % 2
    cases = B._cases(torch, dist, D, ctx.get_group("tensor"), 2, 0, rows, cols)
    names = [" / ".join(key) for key in cases]
    Path(os.environ["PCTX_CG_NAMES"]).write_text("\n".join(names))  # dump labels carry no spaces: an index
    lib.cg_start()
    for i, (name, pair) in enumerate(zip(names, cases.values())):
        if args.only and not any(s in name for s in args.only):
            continue
        for side, fn in zip(("ours", "peer"), pair):
            for _ in range(20):
                fn()
            lib.cg_zero()
            for _ in range(args.calls):
                fn()
            lib.cg_dump(f"{side}-{i}".encode())
    ctx.destroy()
    dist.destroy_process_group()


def _read(path: str) -> tuple[str, int] | None:
    name, total = None, None
    with open(path) as f:
        for line in f:
            if line.startswith("desc: Trigger: Client Request: "):
                name = line.split("Client Request: ", 1)[1].rstrip("\n")
            elif line.startswith(("summary:", "totals:")) and total is None:
                total = int(line.split()[1])
    return (name, total) if name and total is not None else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=100, help="calls counted per case and side")
    parser.add_argument("--kib", type=int, default=64, help="size of the full tensor")
    parser.add_argument("--only", nargs="*", help="only cases whose name contains one of these")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    valgrind, cc = shutil.which("valgrind"), shutil.which("cc") or shutil.which("gcc")
    if valgrind is None or cc is None:
        sys.exit("count_collectives.py needs valgrind (with valgrind/callgrind.h) and a C compiler on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "cg.c").write_text(_HELPER)
        helper = str(Path(tmp) / "libcg.so")
        subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", helper, str(Path(tmp) / "cg.c")], check=True)
        env = {**os.environ, "PCTX_CG_HELPER": helper, "PCTX_CG_NAMES": f"{tmp}/names.txt", "PYTHONHASHSEED": "0",
               "MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "17179869184"}
        cmd = [valgrind, "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={tmp}/out.%p",
               sys.executable, __file__, "--child", "--calls", str(args.calls), "--kib", str(args.kib)]
        if args.only:
            cmd += ["--only", *args.only]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"valgrind run failed ({run.returncode}):\n{run.stderr[-3000:]}")
        names = (Path(tmp) / "names.txt").read_text().split("\n")
        counts: dict[str, dict[str, float]] = {}
        parts = [p for p in glob.glob(f"{tmp}/out.*.*") if p.rsplit(".", 1)[1].isdigit()]
        for path in sorted(parts, key=lambda p: int(p.rsplit(".", 1)[1])):  # dump order = case order
            got = _read(path)
            if got is not None and "-" in got[0]:
                side, i = got[0].split("-", 1)
                counts.setdefault(names[int(i)], {})[side] = got[1] / args.calls
    print(f"instructions per call (callgrind), no-op fake backend, 1 process as rank 0 of 2, {args.kib} KiB full "
          f"tensor, {args.calls} calls per case and side; added = ours - peer")
    print(f"{'case':<64}{'ours':>10}{'peer':>10}{'added':>10}{'ratio':>8}")
    for name, c in counts.items():
        if "ours" in c and "peer" in c:
            print(f"{name:<64}{c['ours'] / 1e3:>9.1f}k{c['peer'] / 1e3:>9.1f}k{(c['ours'] - c['peer']) / 1e3:>+9.1f}k"
                  f"{c['ours'] / c['peer']:>8.3f}")


if __name__ == "__main__":
    main()
