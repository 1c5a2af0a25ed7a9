"""DTensor/FSDP2 code under ParallelCtxStrategy against ModelParallelStrategy, and what the
library's sharding and meta-device init save in memory per rank.

1. ``dtensor``: the same model in the style of Lightning's tensor-parallel example (SwiGLU blocks,
   ``parallelize_module`` + ``fully_shard`` in configure_model, AdamW, gradient clipping), trained by
   ``Trainer.fit`` under both strategies, tp2 x dp2 on 4 processes. Fits alternate (A B A B ...);
   a step's time is the max over ranks of the time between batch start and batch end; the median
   per variant is reported as a ratio ours / ModelParallelStrategy. Peak RSS per rank is the
   growth of ru_maxrss during the fit (each variant in fresh processes, so the maxima are its own).
2. ``fsdp``: the GPT example (library layers) at tp2 x dp2, bytes per rank held in parameters,
   gradients and AdamW state, without and with ``ParallelCtxStrategy(fsdp=True)`` (exact, counted
   from the local tensors).
3. ``init``: peak RSS growth per rank while the GPT example builds its model (configure_model), at
   tp1 (1 process) and tp4 (4 processes), with the meta-device init it uses now against the old
   way (build the full model, initialise, cut the shard).

    python benchmarks/bench_dtensor.py [--part dtensor,fsdp,init] [--steps 12] [--rounds 2]

Machines here are small and shared: read ratios, not absolute times (BENCHMARKING.md).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

from _bench import pin_to_core, reexec_with_malloc_env  # benchmarks/_bench.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIM, HIDDEN, BLOCKS, BATCH = 256, 1024, 4, 32
GPT = {"vocab_size": 4096, "seq_len": 64, "d_model": 256, "n_heads": 8, "n_layers": 6}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------ 1. DTensor model
def _dtensor_fit(rank: int, world: int, variant: str, steps: int) -> dict:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_parallelctx import ParallelCtxStrategy

    pin_to_core(rank)

    class FeedForward(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w1 = torch.nn.Linear(DIM, HIDDEN, bias=False)
            self.w2 = torch.nn.Linear(HIDDEN, DIM, bias=False)
            self.w3 = torch.nn.Linear(DIM, HIDDEN, bias=False)

        def forward(self, x):
            return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = None
            self.times: list[float] = []

        def configure_model(self) -> None:
            from torch.distributed.fsdp import fully_shard
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            self.blocks = torch.nn.Sequential(*(FeedForward() for _ in range(BLOCKS)))
            plan = {"w1": ColwiseParallel(), "w2": RowwiseParallel(), "w3": ColwiseParallel()}
            for block in self.blocks:
                parallelize_module(block, self.device_mesh["tensor_parallel"], plan)
                fully_shard(block, mesh=self.device_mesh["data_parallel"])
            fully_shard(self.blocks, mesh=self.device_mesh["data_parallel"])

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.blocks(x), y)

        def on_train_start(self):
            self.rss_at_start = _rss_mb()

        def on_train_batch_start(self, batch, batch_idx):
            self._t = time.perf_counter()

        def on_train_batch_end(self, outputs, batch, batch_idx):
            self.times.append(time.perf_counter() - self._t)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    strategy = (ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=2) if variant == "model_parallel"
                else ParallelCtxStrategy(tensor_parallel_size=2, print_layout=False))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH * 2 * steps, DIM, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.tanh(x)), batch_size=BATCH)
    pl.seed_everything(0, verbose=False)
    model = Model()
    trainer = pl.Trainer(accelerator="cpu", devices=4, strategy=strategy, max_steps=steps, gradient_clip_val=1.0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    before = _rss_mb()
    trainer.fit(model, loader)
    return {"times": model.times[2:], "rss_growth_mb": _rss_mb() - before, "rss_setup_mb": model.rss_at_start - before}


def part_dtensor(steps: int, rounds: int) -> None:
    from lightning_parallelctx.testing import spawn

    times: dict[str, list[float]] = {"model_parallel": [], "parallelctx": []}
    rss: dict[str, list[float]] = {"model_parallel": [], "parallelctx": []}
    setup: dict[str, list[float]] = {"model_parallel": [], "parallelctx": []}
    for r in range(rounds):
        order = ["model_parallel", "parallelctx"] if r % 2 == 0 else ["parallelctx", "model_parallel"]
        for variant in order:
            out = spawn(_dtensor_fit, 4, *(variant, steps), timeout=600)
            times[variant] += [max(step) for step in zip(*(o["times"] for o in out))]
            rss[variant].append(max(o["rss_growth_mb"] for o in out))
            setup[variant].append(max(o["rss_setup_mb"] for o in out))
    med = {v: statistics.median(t) for v, t in times.items()}
    peak = {v: max(m) for v, m in rss.items()}
    print(f"[dtensor] tp2 x dp2, {BLOCKS} SwiGLU blocks {DIM}->{HIDDEN}, batch {BATCH}/rank, AdamW + clipping")
    print(f"  step median: ModelParallelStrategy {med['model_parallel'] * 1e3:.1f} ms, "
          f"ParallelCtxStrategy {med['parallelctx'] * 1e3:.1f} ms, ratio {med['parallelctx'] / med['model_parallel']:.3f}")
    print(f"  peak RSS growth during fit (max over ranks): ModelParallelStrategy {peak['model_parallel']:.1f} MB, "
          f"ParallelCtxStrategy {peak['parallelctx']:.1f} MB, ratio {peak['parallelctx'] / max(peak['model_parallel'], 1e-9):.3f}")
    print(f"  of which before the first step (process groups, model, setup): ModelParallelStrategy "
          f"{max(setup['model_parallel']):.1f} MB, ParallelCtxStrategy {max(setup['parallelctx']):.1f} MB")


# ------------------------------------------------------------------------------ 2. FSDP option
def _gpt_bytes(rank: int, world: int, fsdp: bool) -> dict:
    import lightning.pytorch as pl
    import torch

    from examples.gpt.data import GPTDataModule
    from examples.gpt.model import GPTLightning
    from lightning_parallelctx import ParallelCtxStrategy
    from lightning_parallelctx.dtensor import local

    model = GPTLightning(**GPT, lr=1e-3)
    data = GPTDataModule(vocab_size=GPT["vocab_size"], seq_len=GPT["seq_len"], num_samples=64, num_val_samples=8,
                         global_batch_size=8)
    trainer = pl.Trainer(accelerator="cpu", devices=4, max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0,
                         strategy=ParallelCtxStrategy(tensor_parallel_size=2, fsdp=fsdp, print_layout=False))
    trainer.fit(model, data)

    def size(ts) -> int:
        return sum(local(t).numel() * local(t).element_size() for t in ts if isinstance(t, torch.Tensor) and t.dim() > 0)

    state = [v for s in trainer.optimizers[0].state.values() for v in s.values()]
    return {"params": size(model.parameters()), "grads": size(p.grad for p in model.parameters()),
            "optimizer": size(state)}


def part_fsdp() -> None:
    from lightning_parallelctx.testing import spawn

    print(f"[fsdp] GPT example {GPT}, tp2 x dp2, AdamW: MB per rank (max over ranks)")
    rows = {}
    for fsdp in (False, True):
        out = spawn(_gpt_bytes, 4, *(fsdp,), timeout=600)
        rows[fsdp] = {k: max(o[k] for o in out) / 2**20 for k in out[0]}
        r = rows[fsdp]
        print(f"  fsdp={fsdp!s:5}: params {r['params']:.2f}, grads {r['grads']:.2f}, optimizer {r['optimizer']:.2f}, "
              f"total {sum(r.values()):.2f}")
    print(f"  ratio fsdp=True / fsdp=False (total): {sum(rows[True].values()) / sum(rows[False].values()):.3f}")


# ------------------------------------------------------------------------------ 3. meta init
def _gpt_init(rank: int, world: int, way: str) -> float:
    import torch

    from examples.gpt.model import GPT as Net
    from lightning_parallelctx import ParallelContext
    from lightning_parallelctx.distributed import LocalContext
    from lightning_parallelctx.nn import shard_state_dict

    ctx = ParallelContext.from_torch(tensor_parallel_size=world)
    before = _rss_mb()
    args = (GPT["vocab_size"], GPT["seq_len"], GPT["d_model"], GPT["n_heads"], GPT["n_layers"])
    if way == "meta":  # what GPTLightning.configure_model does now
        with torch.device("meta"):
            model = Net(*args, ctx)
        model.init_weights(0)
    else:  # the old way: the full model on every rank, initialised, then cut
        full = Net(*args, LocalContext())
        with torch.no_grad():
            for p in full.parameters():
                p.normal_(0, 0.02)
        model = Net(*args, ctx)
        model.load_state_dict(shard_state_dict(full.state_dict(), model, ctx))
        del full
    return _rss_mb() - before


def part_init() -> None:
    from lightning_parallelctx.testing import spawn

    n_params = 12 * GPT["d_model"] ** 2 * GPT["n_layers"] + 2 * GPT["vocab_size"] * GPT["d_model"]
    print(f"[init] GPT example {GPT} (~{n_params / 1e6:.1f}M parameters, {n_params * 4 / 2**20:.0f} MB fp32): "
          f"peak RSS growth per rank while building it, MB (max over ranks)")
    for tp in (1, 4):
        for way in ("full_then_cut", "meta"):
            out = spawn(_gpt_init, tp, *(way,), timeout=600)
            print(f"  tp{tp} {way:13}: {max(out):.1f}")


def main() -> None:
    reexec_with_malloc_env()
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", default="dtensor,fsdp,init")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    parts = args.part.split(",")
    if "init" in parts:
        part_init()
    if "fsdp" in parts:
        part_fsdp()
    if "dtensor" in parts:
        part_dtensor(args.steps, args.rounds)


if __name__ == "__main__":
    main()
