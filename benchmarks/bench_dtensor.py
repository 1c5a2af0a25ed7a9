"""DTensor/FSDP2 code under ParallelCtxStrategy against ModelParallelStrategy, and what the
library's sharding and meta-device init save in memory per rank.

1. ``dtensor``: the same model in the style of Lightning's tensor-parallel example (SwiGLU blocks,
   ``parallelize_module`` + ``fully_shard`` in configure_model, AdamW, gradient clipping), trained by
   ``Trainer.fit`` under both strategies, tp2 x dp2 on 4 processes. Fits alternate (A B A B ...);
   a step's time is the max over ranks of the time between batch start and batch end; the median
   per variant is reported as a ratio ours / ModelParallelStrategy. Peak RSS per rank is the
   growth of ru_maxrss during the fit (each variant in fresh processes, so the maxima are its own),
   as a mean over ranks and rounds and as a max, and its growth over the second half of the steps
   (a steady state adds nothing there).
2. ``fsdp``: the GPT example (library layers) at tp2 x dp2, bytes per rank held in parameters,
   gradients and AdamW state, without and with ``ParallelCtxStrategy(fsdp=True)`` (exact, counted
   from the local tensors).
2b. ``zero1``: the GPT example at tp2 x dp2 with nothing sharded, with torch's ZeroRedundancyOptimizer
   (ZeRO-1) in configure_optimizers, and with ``fsdp=True`` (ZeRO-3): bytes per rank, step time, and
   the final weights against the unsharded run's.
3. ``gpt``: the GPT example (library layers) under ``ParallelCtxStrategy(fsdp=True)`` against the
   same architecture written with nn modules + ``parallelize_module`` + ``fully_shard`` under
   ModelParallelStrategy, tp2 x dp2: step time ratio, bytes held, peak RSS growth.
4. ``init``: peak RSS growth per rank while the GPT example builds its model (configure_model), at
   tp1 (1 process) and tp4 (4 processes), with the meta-device init it uses now against the old
   way (build the full model, initialise, cut the shard).

    python benchmarks/bench_dtensor.py [--part dtensor,gpt,fsdp,zero1,init] [--steps 12] [--rounds 2]

Machines here are small and shared: read ratios, not absolute times (docs/benchmarking.md).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _bench import pin_to_core, reexec_with_malloc_env, step_timer  # benchmarks/_bench.py

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
            self.cpu_times: list[float] = []  # process CPU time per step: what load on the shared cores cannot inflate

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
            self._t, self._c = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, outputs, batch, batch_idx):
            self.times.append(time.perf_counter() - self._t)
            self.cpu_times.append(time.process_time() - self._c)
            if batch_idx == steps // 2 - 1:
                self.rss_mid = _rss_mb()

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
    return {"times": model.times[2:], "cpu": model.cpu_times[2:], "rss_growth_mb": _rss_mb() - before, "rss_setup_mb": model.rss_at_start - before,
            "rss_second_half_mb": _rss_mb() - model.rss_mid}


def part_dtensor(steps: int, rounds: int) -> None:
    from lightning_parallelctx.testing import spawn

    times: dict[str, list[float]] = {"model_parallel": [], "parallelctx": []}
    cpu: dict[str, list[float]] = {"model_parallel": [], "parallelctx": []}
    rss: dict[str, list[float]] = {"model_parallel": [], "parallelctx": []}
    setup: dict[str, list[float]] = {"model_parallel": [], "parallelctx": []}
    late: dict[str, list[float]] = {"model_parallel": [], "parallelctx": []}
    for r in range(rounds):
        order = ["model_parallel", "parallelctx"] if r % 2 == 0 else ["parallelctx", "model_parallel"]
        for variant in order:
            out = spawn(_dtensor_fit, 4, *(variant, steps), timeout=600)
            times[variant] += [max(step) for step in zip(*(o["times"] for o in out))]
            cpu[variant] += [sum(step) for step in zip(*(o["cpu"] for o in out))]
            rss[variant] += [o["rss_growth_mb"] for o in out]
            setup[variant].append(max(o["rss_setup_mb"] for o in out))
            late[variant] += [o["rss_second_half_mb"] for o in out]
    med = {v: statistics.median(t) for v, t in times.items()}
    peak = {v: max(m) for v, m in rss.items()}
    mean = {v: statistics.mean(m) for v, m in rss.items()}
    print(f"[dtensor] tp2 x dp2, {BLOCKS} SwiGLU blocks {DIM}->{HIDDEN}, batch {BATCH}/rank, AdamW + clipping")
    print(f"  step median: ModelParallelStrategy {med['model_parallel'] * 1e3:.1f} ms, "
          f"ParallelCtxStrategy {med['parallelctx'] * 1e3:.1f} ms, ratio {med['parallelctx'] / med['model_parallel']:.3f}")
    cmed = {v: statistics.median(t) for v, t in cpu.items()}
    print(f"  CPU time per step, all 4 ranks together (median): ModelParallelStrategy {cmed['model_parallel'] * 1e3:.1f} ms, "
          f"ParallelCtxStrategy {cmed['parallelctx'] * 1e3:.1f} ms, ratio {cmed['parallelctx'] / cmed['model_parallel']:.3f}")
    print(f"  peak RSS growth during fit, mean over {len(rss['parallelctx'])} rank-runs: ModelParallelStrategy "
          f"{mean['model_parallel']:.1f} MB, ParallelCtxStrategy {mean['parallelctx']:.1f} MB, ratio "
          f"{mean['parallelctx'] / max(mean['model_parallel'], 1e-9):.3f}; max: {peak['model_parallel']:.1f} vs "
          f"{peak['parallelctx']:.1f} MB, ratio {peak['parallelctx'] / max(peak['model_parallel'], 1e-9):.3f} "
          f"(glibc heap placement varies by +-5% between identical runs)")
    print(f"  peak RSS growth over the second half of the steps (a steady state adds ~0; long process-group names "
          f"once added ~2 MB per step, process_groups.py): ModelParallelStrategy {max(late['model_parallel']):.1f} MB, "
          f"ParallelCtxStrategy {max(late['parallelctx']):.1f} MB (max over ranks and rounds)")
    print(f"  of which before the first step (process groups, model, setup): ModelParallelStrategy "
          f"{max(setup['model_parallel']):.1f} MB, ParallelCtxStrategy {max(setup['parallelctx']):.1f} MB")


# ------------------------------------------------------------------------------ 1b. GPT vs DTensor GPT
def dtensor_gpt(h: dict = GPT) -> "Any":
    """The GPT example's architecture written with plain nn modules, tensor-parallel by
    ``parallelize_module`` and sharded by ``fully_shard`` on ModelParallelStrategy's device mesh (the
    peer of the library's GPT; bench_checkpoint.py uses it too)."""
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Attention(nn.Module):
        def __init__(self, tp: int) -> None:
            super().__init__()
            d = h["d_model"]
            self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))
            self.local_heads, self.head_dim = h["n_heads"] // tp, d // h["n_heads"]

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = (p(x).view(b, t, self.local_heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.out(y.transpose(1, 2).reshape(b, t, -1))

    class Block(nn.Module):
        def __init__(self, tp: int) -> None:
            super().__init__()
            d = h["d_model"]
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.attn = Attention(tp)
            self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            x = x + self.attn(self.ln1(x))
            return x + self.proj(F.gelu(self.fc(self.ln2(x))))

    class DTensorGPT(pl.LightningModule):
        def configure_model(self) -> None:
            from torch.distributed.fsdp import fully_shard
            from torch.distributed.tensor import Replicate
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            tp_mesh, dp_mesh = self.device_mesh["tensor_parallel"], self.device_mesh["data_parallel"]
            d = h["d_model"]
            self.tok, self.pos = nn.Embedding(h["vocab_size"], d), nn.Embedding(h["seq_len"], d)
            self.blocks = nn.ModuleList(Block(tp_mesh.size()) for _ in range(h["n_layers"]))
            self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, h["vocab_size"], bias=False)
            plan = {"attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(), "attn.v": ColwiseParallel(),
                    "attn.out": RowwiseParallel(), "fc": ColwiseParallel(), "proj": RowwiseParallel()}
            for block in self.blocks:
                parallelize_module(block, tp_mesh, plan)
                fully_shard(block, mesh=dp_mesh)
            parallelize_module(self, tp_mesh, {"tok": RowwiseParallel(input_layouts=Replicate()),
                                               "head": ColwiseParallel(output_layouts=Replicate())})
            for m in (self.tok, self.pos, self.ln_f, self.head):
                fully_shard(m, mesh=dp_mesh)

        def training_step(self, batch, batch_idx):
            ids, targets = batch
            x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
            for block in self.blocks:
                x = block(x)
            logits = self.head(self.ln_f(x))
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    return DTensorGPT()


def _gpt_fit(rank: int, world: int, variant: str, steps: int) -> dict:
    """The GPT example (library layers, ParallelCtxStrategy(fsdp=True)) or the same architecture in
    plain nn modules with parallelize_module + fully_shard (ModelParallelStrategy), tp2 x dp2."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy

    from examples.gpt.data import GPTDataModule
    from examples.gpt.model import GPTLightning
    from lightning_parallelctx import ParallelCtxStrategy
    from lightning_parallelctx.dtensor import local

    pin_to_core(rank)
    h = GPT

    if variant == "model_parallel":
        model, strategy = dtensor_gpt(h), ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=2)
    else:
        model = GPTLightning(**h, lr=1e-3)
        strategy = ParallelCtxStrategy(tensor_parallel_size=2, fsdp=True, print_layout=False)
    data = GPTDataModule(vocab_size=h["vocab_size"], seq_len=h["seq_len"], num_samples=16 * steps, num_val_samples=8,
                         global_batch_size=16)
    timed = step_timer()
    pl.seed_everything(0, verbose=False)
    # No clipping: under ModelParallelStrategy torch's clip_grad_norm_ fails on this model ("All operands
    # in aten.stack.default must have the same mesh": LayerNorms are 1-D data-mesh DTensors, the
    # linears 2-D); ParallelCtxStrategy clips it, but the comparison must do the same work.
    trainer = pl.Trainer(accelerator="cpu", devices=4, strategy=strategy, max_steps=steps,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timed])
    before = _rss_mb()
    trainer.fit(model, data)
    held = sum(local(t).numel() * local(t).element_size()
               for t in [*model.parameters(), *(p.grad for p in model.parameters() if p.grad is not None),
                         *(v for s in trainer.optimizers[0].state.values() for v in s.values())]
               if isinstance(t, torch.Tensor) and t.dim() > 0)
    return {"times": timed.times[2:], "rss_growth_mb": _rss_mb() - before, "held_mb": held / 2**20}


def part_gpt(steps: int, rounds: int) -> None:
    from lightning_parallelctx.testing import spawn

    times: dict[str, list[float]] = {"model_parallel": [], "parallelctx": []}
    rss: dict[str, list[float]] = {"model_parallel": [], "parallelctx": []}
    held: dict[str, float] = {}
    for r in range(rounds):
        for variant in (["model_parallel", "parallelctx"] if r % 2 == 0 else ["parallelctx", "model_parallel"]):
            out = spawn(_gpt_fit, 4, variant, steps, timeout=600)
            times[variant] += [max(step) for step in zip(*(o["times"] for o in out))]
            rss[variant].append(max(o["rss_growth_mb"] for o in out))
            held[variant] = max(o["held_mb"] for o in out)
    med = {v: statistics.median(t) for v, t in times.items()}
    print(f"[gpt] GPT {GPT}, tp2 x dp2, FSDP2 on both: library layers under ParallelCtxStrategy(fsdp=True) vs the "
          f"same architecture in DTensor (parallelize_module + fully_shard) under ModelParallelStrategy")
    print(f"  step median: ModelParallelStrategy {med['model_parallel'] * 1e3:.1f} ms, ParallelCtxStrategy "
          f"{med['parallelctx'] * 1e3:.1f} ms, ratio {med['parallelctx'] / med['model_parallel']:.3f}")
    print(f"  params+grads+optimizer per rank: {held['model_parallel']:.2f} MB vs {held['parallelctx']:.2f} MB; peak RSS "
          f"growth during fit: {max(rss['model_parallel']):.1f} MB vs {max(rss['parallelctx']):.1f} MB, ratio "
          f"{max(rss['parallelctx']) / max(rss['model_parallel']):.3f}")


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


# ------------------------------------------------------------------------------ 2b. ZeRO-1 vs none vs FSDP2
def _gpt_sharding(rank: int, world: int, option: str, steps: int) -> dict:
    """The GPT example at tp2 x dp2 with AdamW, optimizer state unsharded ("none"), sharded over the
    dense replicas by torch's ZeroRedundancyOptimizer ("zero1", in configure_optimizers), or
    everything sharded by FSDP2 ("fsdp": ParallelCtxStrategy(fsdp=True))."""
    import lightning.pytorch as pl
    import torch
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from examples.gpt.data import GPTDataModule
    from examples.gpt.model import GPTLightning
    from lightning_parallelctx import ParallelCtxStrategy
    from lightning_parallelctx.dtensor import local

    pin_to_core(rank)

    class Zero1GPT(GPTLightning):
        def configure_optimizers(self):
            h = self.hparams
            return ZeroRedundancyOptimizer(self.parameters(), optimizer_class=torch.optim.AdamW, lr=h.lr,
                                           weight_decay=h.weight_decay,
                                           process_group=self.parallel_context.get_group("dense_replica"))

    pl.seed_everything(0, verbose=False)
    model = (Zero1GPT if option == "zero1" else GPTLightning)(**GPT, lr=1e-3)
    data = GPTDataModule(vocab_size=GPT["vocab_size"], seq_len=GPT["seq_len"], num_samples=8 * steps,
                         num_val_samples=8, global_batch_size=8)
    timed = step_timer()
    trainer = pl.Trainer(accelerator="cpu", devices=4, max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, gradient_clip_val=1.0, callbacks=[timed],
                         strategy=ParallelCtxStrategy(tensor_parallel_size=2, fsdp=option == "fsdp",
                                                      print_layout=False))
    trainer.fit(model, data)

    def size(ts) -> int:
        return sum(local(t).numel() * local(t).element_size() for t in ts if isinstance(t, torch.Tensor) and t.dim() > 0)

    opt = trainer.optimizers[0]
    inner = opt.optim if isinstance(opt, ZeroRedundancyOptimizer) else opt  # ZeRO keeps this rank's part there
    state = [v for s in inner.state.values() for v in s.values()]
    # The full weights (FSDP2 shards gathered) to compare the options' training.
    weights = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
               for n, p in model.named_parameters()}
    return {"params": size(model.parameters()), "grads": size(p.grad for p in model.parameters()),
            "optimizer": size(state), "times": timed.times[2:], "weights": weights}


def part_zero1(steps: int) -> None:
    from lightning_parallelctx.testing import spawn

    print(f"[zero1] GPT example {GPT}, tp2 x dp2, AdamW, clipping, {steps} steps: MB per rank (max over ranks), "
          f"step median (max over ranks), final weights against 'none'")
    out = {opt: spawn(_gpt_sharding, 4, opt, steps, timeout=600) for opt in ("none", "zero1", "fsdp")}
    med = {opt: statistics.median(max(s) for s in zip(*(o["times"] for o in res))) for opt, res in out.items()}
    for opt, res in out.items():
        mb = {k: max(o[k] for o in res) / 2**20 for k in ("params", "grads", "optimizer")}
        diff = max((a - b).abs().max().item() for o, ref in zip(res, out["none"])
                   for a, b in zip(o["weights"].values(), ref["weights"].values()))
        print(f"  {opt:5}: params {mb['params']:.2f}, grads {mb['grads']:.2f}, optimizer {mb['optimizer']:.2f}, "
              f"total {sum(mb.values()):.2f} MB; step {med[opt] * 1e3:.1f} ms ({med[opt] / med['none']:.2f} of none); "
              f"max |weight - none's| {diff:.2e}")


# ------------------------------------------------------------------------------ 3. meta init
def _gpt_init(rank: int, world: int, way: str) -> float:
    import torch

    from examples.gpt.model import GPTLightning, gpt_layers
    from lightning_parallelctx import ParallelContext
    from lightning_parallelctx.distributed import LocalContext
    from lightning_parallelctx.nn import shard_state_dict
    from lightning_parallelctx.pipeline import PipelineSequential, StagePlan

    ctx = ParallelContext.from_torch(tensor_parallel_size=world)
    before = _rss_mb()
    if way == "meta":  # what GPTLightning.configure_model does now: meta layers, each one initialised and cut
        model = GPTLightning(**GPT)
        model.parallel_context = ctx
        model.configure_model()
    else:  # the old way: the full model on every rank, initialised, then cut
        args = (GPT["vocab_size"], GPT["seq_len"], GPT["d_model"], GPT["n_heads"], GPT["n_layers"])
        full = PipelineSequential(gpt_layers(*args, LocalContext()), StagePlan())
        with torch.no_grad():
            for p in full.parameters():
                p.normal_(0, 0.02)
        model = PipelineSequential(gpt_layers(*args, ctx), StagePlan())
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
    parser.add_argument("--part", default="dtensor,gpt,fsdp,zero1,init")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    parts = args.part.split(",")
    # Timings on a loaded machine are not comparable with another run's: say how loaded it was.
    print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    if "init" in parts:
        part_init()
    if "fsdp" in parts:
        part_fsdp()
    if "zero1" in parts:
        part_zero1(args.steps)
    if "dtensor" in parts:
        part_dtensor(args.steps, args.rounds)
    if "gpt" in parts:
        part_gpt(args.steps, args.rounds)
    print(f"load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
