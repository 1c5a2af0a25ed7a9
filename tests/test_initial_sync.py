"""At the start of fit the strategy copies the first replica's weights to the other replicas of the
same shard (as DDP does), and never across shards: tensor-parallel and expert shards stay distinct."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.gpt.data import GPTDataModule
from examples.gpt.model import GPTLightning
from lightning_parallelctx import ParallelCtxStrategy
from lightning_parallelctx.markers import is_expert, is_tensor_parallel
from lightning_parallelctx.testing import spawn


class Diverged(GPTLightning):
    """Every rank perturbs its weights differently after building them: only the start-of-fit
    broadcast can make replicas equal again."""

    def configure_model(self) -> None:
        super().configure_model()
        g = torch.Generator().manual_seed(1000 + self.parallel_context.global_rank)
        with torch.no_grad():
            for p in self.parameters():
                p.add_(torch.randn(p.shape, generator=g))


class WeightsAtFitStart(pl.Callback):
    """Gathers every rank's dense, expert and tensor-replicated weights as training is about to start."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.weights = {}
        for kind, keep in (("dense", lambda p: not is_expert(p)), ("expert", is_expert),
                           ("replicated", lambda p: not is_tensor_parallel(p))):
            params = [p.detach().reshape(-1) for p in pl_module.parameters() if keep(p)]
            flat = torch.cat(params) if params else torch.zeros(0)
            everyone = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
            dist.all_gather(everyone, flat)
            self.weights[kind] = everyone


def _weights_at_fit_start(rank: int, world: int, root: str, sizes: dict, experts: int) -> dict:
    stop = WeightsAtFitStart()
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy=ParallelCtxStrategy(print_layout=False, **sizes),
                         max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[stop], default_root_dir=root)
    model = Diverged(vocab_size=32, seq_len=8, d_model=16, n_heads=2, n_layers=1, num_experts=experts)
    trainer.fit(model, GPTDataModule(vocab_size=32, seq_len=8, num_samples=32, global_batch_size=4))
    return stop.weights


def test_tensor_parallel_replicas_synced_shards_kept(tmp_path: Path) -> None:
    # tp2-dp2: ranks 0/1 hold different shards; 0/2 and 1/3 are replicas of one shard.
    got = spawn(_weights_at_fit_start, 4, str(tmp_path), {"tensor_parallel_size": 2}, 0, timeout=300)[0]
    w = got["dense"]
    assert torch.equal(w[0], w[2]) and torch.equal(w[1], w[3])
    # Shards stay shards (a broadcast over TENSOR would have made them equal).
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[2], w[3])
    # LayerNorms, row-parallel biases, ...: replicated over TENSOR too, so equal on all 4 ranks,
    # although every rank perturbed them differently (they get no gradient reduction over TENSOR).
    r = got["replicated"]
    assert r[0].numel() > 0 and all(torch.equal(r[0], r[k]) for k in (1, 2, 3))


def test_expert_replicas_synced_experts_kept(tmp_path: Path) -> None:
    # ep2-dp2: dense weights are replicated on all 4 ranks; ranks 0/1 hold different experts,
    # 0/2 and 1/3 are replicas of the same experts.
    w = spawn(_weights_at_fit_start, 4, str(tmp_path), {"expert_parallel_size": 2, "data_parallel_size": 2}, 4,
              timeout=300)[0]
    assert all(torch.equal(w["dense"][0], w["dense"][r]) for r in (1, 2, 3))
    assert torch.equal(w["expert"][0], w["expert"][2]) and torch.equal(w["expert"][1], w["expert"][3])
    assert not torch.equal(w["expert"][0], w["expert"][1])
