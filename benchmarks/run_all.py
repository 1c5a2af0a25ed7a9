"""Run every benchmark and regenerate the benchmark tables of README.md (one command).

    python benchmarks/run_all.py            # full runs, rewrites README.md's tables in place
    python benchmarks/run_all.py --quick    # fewer rounds (minutes, noisier), same tables
    python benchmarks/run_all.py --out results.md --only collectives tensor_parallel

Each benchmark runs as its own process with ``--json`` (so each keeps its own method: interleaved
rounds, pinned cores, malloc settings, ratios against its peer measured in the same run, see
docs/benchmarking.md) and this script only formats what they report. The tables
go between the ``<!-- benchmarks:begin -->`` / ``<!-- benchmarks:end -->`` markers of README.md,
headed by the machine (CPU, cores, load average before and after), the date and the versions,
because timings only mean something next to where and when they were taken.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"

#: name -> (script, full-run arguments, --quick arguments). Several runs of one script are
#: distinguished by name (the two tensor-parallel sizes the issue tracks).
BENCHMARKS: dict[str, tuple[str, list[str], list[str]]] = {
    "context_scale": ("bench_context_scale.py", ["--repeats", "3"],
                      ["--repeats", "1", "--worlds", "1024", "4096", "16384"]),
    # hook(25::::0): the hook scaling every gradient itself instead of the backward's seed.
    "dp_hook": ("dp_hook_vs_ddp.py", ["--rounds", "40", "--hook-variants", "25", "25::::0"],
                ["--rounds", "12", "--warmup", "3", "--hook-variants", "25", "25::::0"]),
    "dp_lightning": ("dp_lightning_vs_ddp.py", ["--rounds", "6", "--steps", "14"], ["--rounds", "2", "--steps", "10"]),
    "tensor_parallel_256": ("bench_tensor_parallel.py", ["--rounds", "40", "--d-model", "256", "--tokens", "64"],
                            ["--rounds", "20", "--d-model", "256", "--tokens", "64"]),
    "tensor_parallel_1024": ("bench_tensor_parallel.py", ["--rounds", "20", "--d-model", "1024", "--tokens", "256"],
                             ["--rounds", "8", "--warmup", "2", "--d-model", "1024", "--tokens", "256"]),
    # Each collectives round times two bursts of each side in a shuffled order.
    "collectives": ("bench_collectives.py", ["--rounds", "20"], ["--rounds", "6", "--warmup", "1"]),
    "collectives_fake": ("bench_collectives.py", ["--fake", "--rounds", "20"],
                         ["--fake", "--rounds", "5", "--warmup", "1"]),
    "compile": ("bench_compile.py", ["--rounds", "30"], ["--rounds", "12"]),
}
GROUPS = {"collectives": ["collectives", "collectives_fake"],
          "tensor_parallel": ["tensor_parallel_256", "tensor_parallel_1024"]}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return (f"{cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def run(name: str, quick: bool) -> dict:
    script, full, short = BENCHMARKS[name]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(HERE / script), *(short if quick else full), "--json", str(out)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        print(f"[run_all] {name}: {' '.join(cmd[1:])}", flush=True)
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        print(proc.stdout[-4000:], flush=True)
        if proc.returncode != 0 or not out.exists():
            raise SystemExit(f"[run_all] {name} failed (exit {proc.returncode}); its output is above")
        result = json.loads(out.read_text())
    result["_command"] = f"python benchmarks/{script} {' '.join(short if quick else full)}"
    result["_wall_s"] = time.perf_counter() - started
    return result


def _r(x: float) -> str:
    return f"{x:.3f}" if x == x else "-"  # NaN -> "-"


def table_context_scale(res: dict) -> list[str]:
    lines = ["| world | parallelctx | `init_device_mesh` | every rank creates every group (Megatron/OSLO) "
             "| speed-up vs device mesh |", "|---|---|---|---|---|"]
    for world, row in res["results"].items():
        cells = []
        for v in ("parallelctx", "init_device_mesh", "every-rank-every-group"):
            c = row.get(v)
            cells.append(f"{c['ms']:.1f} ms, {'/'.join(map(str, c['calls']))} calls" if c else "(not run)")
        ratio = row["init_device_mesh"]["ms"] / row["parallelctx"]["ms"]
        lines.append(f"| {int(world):,} | " + " | ".join(cells) + f" | {ratio:.0f}x |")
    return lines


def table_dp_hook(res: dict) -> list[str]:
    cpu = res.get("cpu_ratio", {})  # process CPU time per step (both ranks, every thread)
    lines = ["| variant | ratio to DDP default (median) | paired | CPU time ratio |", "|---|---|---|---|"]
    for name, ratio in res["ratio"].items():
        cell = f"{cpu[name]:.3f}" if name in cpu else "-"
        lines.append(f"| {name} | {ratio:.3f} | {res['paired_ratio'][name]:.3f} | {cell} |")
    return lines


def table_dp_lightning(res: dict) -> list[str]:
    lines = ["| strategy | ratio to DDPStrategy (median) | paired | CPU time ratio | step ms |", "|---|---|---|---|---|"]
    for name, row in res["rows"].items():
        lines.append(f"| {name} | {row['ratio']:.3f} | {row['paired']:.3f} | {row['cpu_ratio']:.3f} | "
                     f"{row['median_ms']:.1f} |")
    return lines


def table_tensor_parallel(small: dict | None, large: dict | None) -> list[str]:
    lines = ["| block | d_model 256, 64 tokens: median / paired | d_model 1024, 256 tokens: median / paired |",
             "|---|---|---|"]
    for kind in ("mlp", "attention"):
        cells = []
        for res in (small, large):
            if res is None:
                cells.append("(not run)")
                continue
            row = res["results"][kind]
            cells.append(f"{row['median']:.3f} / {row['paired']:.3f} ({row['ours_ms']:.1f} vs {row['peer_ms']:.1f} ms)")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return lines


def _ci(row: dict, key: str) -> str:
    ci = row.get(key)
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-"  # results from before the interval was recorded


def table_collectives(real: dict | None, fake: dict | None) -> list[str]:
    blocks = [b for b in (real, fake) if b is not None]
    sizes = list(blocks[0]["results"]) if blocks else []
    head = "| case |"
    rule = "|---|"
    for s in sizes:
        if real is not None:
            head += (f" {s}, gloo wall: median / paired | {s}, gloo wall: paired 95% CI |"
                     f" {s}, gloo CPU (all ranks): paired [95% CI] |")
            rule += "---|---|---|"
        if fake is not None:
            head += f" {s}, no-op backend: min ratio, added us |"
            rule += "---|"
        if real is not None and fake is not None:
            head += f" {s}: ours / peer at most (1 + added us / gloo peer wall) |"
            rule += "---|"
    lines = [head, rule]
    for case in (blocks[0]["results"][sizes[0]]["rows"] if blocks else {}):
        cells = []
        for s in sizes:
            if real is not None:
                row = real["results"][s]["rows"][case]
                cells.append(f"{_r(row['median'])} / {_r(row['paired'])}")
                cells.append(_ci(row, "paired_ci"))
                cells.append(f"{_r(row['cpu_paired'])} {_ci(row, 'cpu_paired_ci')}" if "cpu_paired" in row else "-")
            if fake is not None:
                row = fake["results"][s]["rows"][case]
                cells.append(f"{_r(row['min_ratio'])}, {row['added_us']:+.1f}")
            if real is not None and fake is not None:
                # The communication is the same bytes in the same calls on both sides; what the library
                # adds is CPU work around it, which lengthens a call by at most its own duration.
                added = max(fake["results"][s]["rows"][case]["added_us"], 0.0)
                cells.append(_r(1.0 + added / (real["results"][s]["rows"][case]["peer_ms"] * 1e3)))
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return lines


def table_compile(res: dict) -> list[str]:
    r = res["results"]
    a = res["args"]
    return ["| block | eager ms | compiled ms | compiled / eager (median / paired) | compilation s | max abs diff |",
            "|---|---|---|---|---|---|",
            f"| TP attention + MLP, d_model {a['d_model']}, {a['tokens']} tokens, {a['backend']} | "
            f"{r['eager_ms']:.2f} | {r['compiled_ms']:.2f} | {r['median']:.3f} / {r['paired']:.3f} | "
            f"{r['compile_s']:.0f} | {r['max_diff']:.1e} |"]


def render(results: dict, header: str) -> str:
    out = [BEGIN, "", header, ""]

    def section(title: str, names: list[str], body: list[str]) -> None:
        out.extend([title, "", *body, "", "Command(s): " + "; ".join(f"`{results[n]['_command']}`" for n in names
                                                                    if n in results), ""])

    if "context_scale" in results:
        section("**Building the groups, per rank** (torch's fake backend, one process playing one rank; "
                "tp8 x pp4 x sp2 x ep2, dp derived; group-creation calls counted for every API):",
                ["context_scale"], table_context_scale(results["context_scale"]))
    if "dp_hook" in results:
        section("**Data-parallel gradient hook vs torch DDP** (2 processes, gloo, 6 x Linear(2048, 2048) = 25.2M "
                "parameters, batch 64; step = zero_grad + forward + backward + sync; ratio to DDP default, "
                "below 1 = faster):", ["dp_hook"], table_dp_hook(results["dp_hook"]))
    if "dp_lightning" in results:
        section("**Data parallelism at the Lightning level** (`Trainer.fit`, same model and data as above, SGD; "
                "ParallelCtxStrategy's defaults vs `DDPStrategy()`, both fitting in the same 2 processes in mirrored "
                "order; a step = training_step + zero_grad + backward + sync + optimizer step; \"scale pass\" = "
                "`average_in_backward=False`):", ["dp_lightning"], table_dp_lightning(results["dp_lightning"]))
    if "tensor_parallel_256" in results or "tensor_parallel_1024" in results:
        section("**Tensor parallelism vs torch's DTensor `parallelize_module`** (ColwiseParallel/RowwiseParallel, "
                "tp=2, gloo, fwd+bwd, outputs checked equal first; ratio ours / torch, below 1 = ours faster):",
                ["tensor_parallel_256", "tensor_parallel_1024"],
                table_tensor_parallel(results.get("tensor_parallel_256"), results.get("tensor_parallel_1024")))
    if "collectives" in results or "collectives_fake" in results:
        section("**Collectives vs their hand-written raw equivalent** (ratio ours / peer; fwd+bwd peer = a minimal "
                "autograd.Function over the raw `torch.distributed` calls, fwd-no-grad peer = the bare call; outputs "
                "and gradients checked equal first; the no-op backend column times only the CPU work around the "
                "communication, its \"added us\" is what the library adds per call; gloo CPU = process CPU time, "
                "all threads, summed over the ranks: the work, free of thread wake-up latency; [95% CI] = bootstrap "
                "interval of the paired ratio; the A/A rows time the peer as both sides: their interval is the noise "
                "floor; the last column adds the no-op backend's added us to the gloo peer's wall time per call: both "
                "sides make the same calls with the same bytes, so that CPU work is all ours adds, and it lengthens a "
                "call by at most its own duration):",
                ["collectives", "collectives_fake"],
                table_collectives(results.get("collectives"), results.get("collectives_fake")))
    if "compile" in results:
        section("**torch.compile on a tensor-parallel block** (one graph, `fullgraph=True`; 2 processes, gloo):",
                ["compile"], table_compile(results["compile"]))
    out.append(END)
    return "\n".join(out) + "\n"


def write_readme(path: Path, block: str) -> None:
    text = path.read_text()
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END) + r"\n?", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path} has no {BEGIN} ... {END} markers: add them where the tables belong, or use --out")
    path.write_text(pattern.sub(lambda _: block, text, count=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds: minutes instead of tens of minutes")
    parser.add_argument("--only", nargs="+", choices=[*BENCHMARKS, *GROUPS], help="run only these")
    parser.add_argument("--out", help="write the markdown here instead of into README.md")
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    args = parser.parse_args()
    names = list(BENCHMARKS)
    if args.only:
        names = [n for n in names if n in args.only or any(n in GROUPS.get(o, []) for o in args.only)]
    load_before = os.getloadavg()
    started = datetime.datetime.now(datetime.timezone.utc)
    results = {name: run(name, args.quick) for name in names}
    load_after = os.getloadavg()
    header = (f"Measured {started:%Y-%m-%d %H:%M} UTC with `python benchmarks/run_all.py"
              f"{' --quick' if args.quick else ''}` on {machine()}. Load average (1 min) {load_before[0]:.1f} before, "
              f"{load_after[0]:.1f} after: anything well above 2 means other jobs shared the cores, and ratios within "
              f"one run (variants interleaved) are the figures to trust, not the absolute times.")
    block = render(results, header)
    if args.out:
        Path(args.out).write_text(block)
        print(f"[run_all] wrote {args.out}")
    else:
        write_readme(Path(args.readme), block)
        print(f"[run_all] rewrote the tables in {args.readme}")
    print(block)


if __name__ == "__main__":
    main()
