"""Checkpoint save/load time and bytes of the GPT example at tp2-dp2 (4 processes, gloo, CPU).

Variants, interleaved round-robin, medians of the max over ranks (docs/benchmarking.md):

- ``dcp``: torch.distributed.checkpoint used directly (``dcp.save`` / ``dcp.load``) on the same
  state the library writes (model and AdamW moments as DTensors): the floor.
- ``ours``: the library's save (``CheckpointSaver``: the same DCP write plus meta.pt, each rank's
  RNG state, fsync, the COMPLETE marker and the rename) and load (re-created targets, conversion
  back to Lightning's index-keyed optimizer state).
- ``ours-async``: the stall of an asynchronous save (the time ``save`` blocks the training loop:
  the in-memory copy and DCP's planning), and its total time until the checkpoint is visible.

Prints times and ratios to ``dcp`` measured in this run. Run: ``python benchmarks/bench_checkpoint.py``
(``--d-model 512 --layers 4 --rounds 5``).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _bench import pin_to_core, reexec_with_malloc_env  # noqa: E402


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _worker(rank: int, world_size: int, args: dict, tmp: str) -> dict[str, Any]:
    pin_to_core(rank)
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from examples.gpt.model import GPTLightning
    from lightning_parallelctx import ParallelContext
    from lightning_parallelctx.lightning import checkpoint as ck
    from lightning_parallelctx.lightning.dtensor_state import optimizer_to_named, present, splits_by_name

    ctx = ParallelContext(sizes={"tensor": 2, "data": 2})
    module = GPTLightning(vocab_size=args["vocab"], seq_len=64, d_model=args["d_model"], n_heads=8,
                          n_layers=args["layers"])
    module.parallel_context = ctx
    module.configure_model()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    ids = torch.randint(args["vocab"], (2, 64))
    module._loss((ids, ids)).backward()
    opt.step()
    params = sum(p.numel() for p in module.parameters())

    def lightning_dict() -> dict[str, Any]:
        return {"state_dict": module.state_dict(), "optimizer_states": [opt.state_dict()], "epoch": 0,
                "global_step": 1, "loops": {}, "callbacks": {}, "lr_schedulers": []}

    def timed(fn: Any) -> float:
        dist.barrier()
        t = time.perf_counter()
        fn()
        t = torch.tensor(time.perf_counter() - t)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def fresh(name: str) -> Path:
        p = Path(tmp) / name
        if rank == 0 and p.exists():
            shutil.rmtree(p)
        dist.barrier()
        return p

    saver, async_saver = ck.CheckpointSaver(), ck.CheckpointSaver(async_save=True)
    splits = splits_by_name(module)
    times: dict[str, list[float]] = {k: [] for k in ("dcp save", "ours save", "dcp load", "ours load",
                                                     "async stall", "async total")}
    for _ in range(args["rounds"]):
        path = fresh("dcp")
        state = {"state_dict": present(module.state_dict(), splits, ctx),
                 "optimizer_0": optimizer_to_named(opt.state_dict(), opt, module, ctx)}
        times["dcp save"].append(timed(lambda: dcp.save(state, checkpoint_id=path)))
        target = {"state_dict": present({k: torch.zeros_like(v) for k, v in module.state_dict().items()}, splits, ctx),
                  "optimizer_0": {"state": optimizer_to_named(opt.state_dict(), opt, module, ctx)["state"]}}
        times["dcp load"].append(timed(lambda: dcp.load(target, checkpoint_id=path)))
        dcp_bytes = _size(path)

        path = fresh("ours")
        times["ours save"].append(timed(lambda: saver.save(lightning_dict(), path, module, [opt], ctx)))
        times["ours load"].append(timed(lambda: ck.load_sharded_checkpoint(path, module, ctx, False, [opt])))
        ours_bytes = _size(path)

        path = fresh("async")
        start = time.perf_counter()
        times["async stall"].append(timed(lambda: async_saver.save(lightning_dict(), path, module, [opt], ctx)))
        async_saver.wait()
        total = torch.tensor(time.perf_counter() - start)
        dist.all_reduce(total, op=dist.ReduceOp.MAX)
        times["async total"].append(float(total))
    return {"times": {k: statistics.median(v) for k, v in times.items()}, "params": params,
            "bytes": {"dcp": dcp_bytes, "ours": ours_bytes}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    a = parser.parse_args()
    reexec_with_malloc_env()
    from lightning_parallelctx.testing import spawn

    with tempfile.TemporaryDirectory() as tmp:
        out = spawn(_worker, 4, {"d_model": a.d_model, "layers": a.layers, "vocab": a.vocab, "rounds": a.rounds},
                    tmp, timeout=1200)[0]
    t = out["times"]
    print(f"GPT d_model={a.d_model} layers={a.layers} vocab={a.vocab}: {out['params'] / 1e6:.2f}M parameters per "
          f"rank, tp2-dp2, AdamW; medians of {a.rounds} rounds, max over ranks")
    print(f"bytes on disk: dcp {out['bytes']['dcp'] / 1e6:.2f} MB, ours {out['bytes']['ours'] / 1e6:.2f} MB "
          f"(ratio {out['bytes']['ours'] / out['bytes']['dcp']:.3f})")
    for what in ("save", "load"):
        print(f"{what}: dcp {t[f'dcp {what}'] * 1e3:.1f} ms, ours {t[f'ours {what}'] * 1e3:.1f} ms "
              f"(ratio {t[f'ours {what}'] / t[f'dcp {what}']:.2f})")
    print(f"async save: training blocked {t['async stall'] * 1e3:.1f} ms (ratio to our sync save "
          f"{t['async stall'] / t['ours save']:.2f}), visible after {t['async total'] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
