"""Checkpoint save/load time and bytes of the GPT example at tp2-dp2 (4 processes, gloo, CPU).

Variants, interleaved round-robin, medians of the max over ranks (docs/benchmarking.md):

- ``dcp``: torch.distributed.checkpoint used directly (``dcp.save`` / ``dcp.load``) on the same
  state the library writes (model and AdamW moments as DTensors): the floor.
- ``ours``: the library's save (``CheckpointSaver``: the same DCP write plus meta.pt, each rank's
  RNG state, fsync, the COMPLETE marker and the rename) and load (re-created targets, conversion
  back to Lightning's index-keyed optimizer state).
- ``ours-async``: the stall of an asynchronous save (the time ``save`` blocks the training loop:
  the in-memory copy and DCP's planning), and its total time until the checkpoint is visible.

Part 2, against Lightning's ModelParallelStrategy: ``trainer.save_checkpoint(path)`` and loading it
back into the model and AdamW after a one-step fit, tp2-dp2, for

- ``model_parallel``: the same GPT architecture in DTensor (``parallelize_module`` + ``fully_shard``,
  ``bench_dtensor.dtensor_gpt``) under ModelParallelStrategy (its DCP save plus meta.pt);
- ``parallelctx``: the GPT example under ``ParallelCtxStrategy(tensor_parallel_size=2)`` (replicated
  over the data ranks: DCP writes each slice once, from one replica).

Fits alternate per round; medians over rounds of the max over ranks; ratios to ``model_parallel``.

Prints times and ratios measured in this run. Run: ``python benchmarks/bench_checkpoint.py``
(``--d-model 512 --layers 4 --rounds 5 --part dcp,strategies``).
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

from _bench import pin_to_core, reexec_with_malloc_env, timed_max  # noqa: E402


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
        times["dcp save"].append(timed_max(lambda: dcp.save(state, checkpoint_id=path)))
        target = {"state_dict": present({k: torch.zeros_like(v) for k, v in module.state_dict().items()}, splits, ctx),
                  "optimizer_0": {"state": optimizer_to_named(opt.state_dict(), opt, module, ctx)["state"]}}
        times["dcp load"].append(timed_max(lambda: dcp.load(target, checkpoint_id=path)))
        dcp_bytes = _size(path)

        path = fresh("ours")
        times["ours save"].append(timed_max(lambda: saver.save(lightning_dict(), path, module, [opt], ctx)))
        times["ours load"].append(timed_max(lambda: ck.load_sharded_checkpoint(path, module, ctx, False, [opt])))
        ours_bytes = _size(path)

        path = fresh("async")
        start = time.perf_counter()
        times["async stall"].append(timed_max(lambda: async_saver.save(lightning_dict(), path, module, [opt], ctx)))
        async_saver.wait()
        total = torch.tensor(time.perf_counter() - start)
        dist.all_reduce(total, op=dist.ReduceOp.MAX)
        times["async total"].append(float(total))
    return {"times": {k: statistics.median(v) for k, v in times.items()}, "params": params,
            "bytes": {"dcp": dcp_bytes, "ours": ours_bytes}}


STRATEGY_VARIANTS = ("model_parallel", "parallelctx")


def _strategy_worker(rank: int, world_size: int, variant: str, args: dict, tmp: str) -> dict[str, Any]:
    """One fit step under ``variant``, then ``rounds`` x (save, load model and optimizer back)."""
    pin_to_core(rank)
    import lightning.pytorch as pl
    import torch.distributed as dist
    from lightning.pytorch.strategies import ModelParallelStrategy

    from bench_dtensor import dtensor_gpt
    from examples.gpt.data import GPTDataModule
    from examples.gpt.model import GPTLightning
    from lightning_parallelctx import ParallelCtxStrategy

    h = {"vocab_size": args["vocab"], "seq_len": 64, "d_model": args["d_model"], "n_heads": 8, "n_layers": args["layers"]}
    if variant == "model_parallel":
        model, strategy = dtensor_gpt(h), ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=2)
    else:
        model = GPTLightning(**h, lr=1e-3)
        strategy = ParallelCtxStrategy(tensor_parallel_size=2, print_layout=False)
    trainer = pl.Trainer(accelerator="cpu", devices=4, strategy=strategy, max_steps=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, GPTDataModule(vocab_size=h["vocab_size"], seq_len=64, num_samples=64, num_val_samples=8,
                                     global_batch_size=16))
    assert trainer.global_step == 1 and trainer.optimizers[0].state, "the fit must make AdamW's moments"

    def load(path: Path) -> None:
        ckpt = trainer.strategy.load_checkpoint(path)
        if variant != "model_parallel":  # ModelParallelStrategy loads into the model and optimizer itself
            trainer.strategy.load_model_state_dict(ckpt)
            trainer.strategy.load_optimizer_state_dict(ckpt)

    times: dict[str, list[float]] = {"save": [], "load": []}
    size = 0
    for i in range(args["rounds"]):
        path = Path(tmp) / f"{variant}-{i}.ckpt"
        times["save"].append(timed_max(lambda: trainer.save_checkpoint(path)))
        times["load"].append(timed_max(lambda: load(path)))
        size = _size(path)
        dist.barrier()
        if rank == 0:
            shutil.rmtree(path)
    return {"times": {k: statistics.median(v) for k, v in times.items()}, "bytes": size}


def part_strategies(a: argparse.Namespace) -> None:
    from lightning_parallelctx.testing import spawn

    args = {"d_model": a.d_model, "layers": a.layers, "vocab": a.vocab, "rounds": a.rounds}
    out: dict[str, list[dict[str, Any]]] = {v: [] for v in STRATEGY_VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.fits):
            for v in (STRATEGY_VARIANTS if r % 2 == 0 else reversed(STRATEGY_VARIANTS)):
                out[v].append(spawn(_strategy_worker, 4, v, args, tmp, timeout=1200)[0])
    med = {v: {k: statistics.median(o["times"][k] for o in runs) for k in ("save", "load")} for v, runs in out.items()}
    size = {v: runs[-1]["bytes"] for v, runs in out.items()}
    peer = "model_parallel"
    print(f"vs ModelParallelStrategy: GPT d_model={a.d_model} layers={a.layers} vocab={a.vocab}, tp2-dp2, AdamW after one "
          f"step; trainer.save_checkpoint and loading model + optimizer back; {a.fits} fits x {a.rounds} rounds")
    for v in STRATEGY_VARIANTS:
        ratio = "" if v == peer else (f" (ratios to ModelParallelStrategy: save {med[v]['save'] / med[peer]['save']:.2f}, "
                                      f"load {med[v]['load'] / med[peer]['load']:.2f}, bytes {size[v] / size[peer]:.3f})")
        print(f"  {v}: save {med[v]['save'] * 1e3:.1f} ms, load {med[v]['load'] * 1e3:.1f} ms, "
              f"{size[v] / 1e6:.2f} MB{ratio}")


def part_dcp(a: argparse.Namespace) -> None:
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--fits", type=int, default=2, help="fits per variant in part 'strategies'")
    parser.add_argument("--part", default="dcp,strategies")
    a = parser.parse_args()
    reexec_with_malloc_env()
    parts = a.part.split(",")
    if "dcp" in parts:
        part_dcp(a)
    if "strategies" in parts:
        part_strategies(a)


if __name__ == "__main__":
    main()
