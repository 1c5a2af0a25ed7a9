"""Tensor and pipeline peers given different batches: a clear error on every rank, never silent garbage.

The library's sampler gives TENSOR and PIPELINE peers the same batches. A loader the strategy does
not rebuild (here: ``use_distributed_sampler=False`` and a shuffle drawn per rank) trains each tensor
shard / pipeline stage on other samples, and nothing else notices.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.gpt.data import GPTDataModule
from examples.gpt.model import GPTLightning
from lightning_parallelctx import ParallelCtxStrategy
from lightning_parallelctx.lightning.batch_check import BatchMismatchError, fingerprint
from lightning_parallelctx.testing import spawn


def test_fingerprint_tells_permutations_and_values_apart() -> None:
    x = torch.arange(24.0).reshape(6, 4)
    batch = (x, x.long())
    assert torch.equal(fingerprint(batch), fingerprint((x.clone(), x.long().clone())))
    assert not torch.equal(fingerprint(batch), fingerprint((x[[1, 0, 2, 3, 4, 5]], x.long())))
    assert not torch.equal(fingerprint(batch), fingerprint((x, x.long()[[1, 0, 2, 3, 4, 5]])))
    assert not torch.equal(fingerprint(batch), fingerprint((x + 1, x.long())))
    assert not torch.equal(fingerprint(batch), fingerprint(x))
    assert fingerprint({"a": [x], "note": "text"}).shape == (4,)


class _PerRankShuffle(GPTDataModule):
    """Each rank shuffles with its own seed: what an unseeded shuffle does under use_distributed_sampler=False."""

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(1000 + self.trainer.global_rank)
        return DataLoader(self.train_set, batch_size=self._batch_size(), drop_last=True, shuffle=True, generator=g)


def _fit(rank: int, world: int, root: str, sizes: dict, mismatch: bool) -> dict:
    model = GPTLightning(vocab_size=32, seq_len=8, d_model=16, n_heads=2, n_layers=2)
    data = (_PerRankShuffle if mismatch else GPTDataModule)(vocab_size=32, seq_len=8, num_samples=32,
                                                              global_batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", devices=world, max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                         use_distributed_sampler=not mismatch,
                         strategy=ParallelCtxStrategy(print_layout=False, timeout=60, **sizes))
    try:
        trainer.fit(model, data)
    except BatchMismatchError as e:
        return {"error": str(e), "step": trainer.global_step}
    return {"error": None, "step": trainer.global_step}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sizes, group", [({"tensor_parallel_size": 2}, "tensor"),
                                          ({"pipeline_parallel_size": 2, "num_microbatches": 2}, "pipeline")],
                         ids=["tp2", "pp2"])
def test_peers_with_different_batches_raise_on_every_rank(tmp_path: Path, sizes: dict, group: str) -> None:
    out = spawn(_fit, 2, str(tmp_path), sizes, True, timeout=240)
    for rank, o in enumerate(out):
        assert o["error"] is not None, (rank, o)
        assert o["step"] == 0, o  # caught before the first optimizer step
        msg = o["error"]
        assert f"Ranks of one {group} group received different batches at the first step of epoch 0" in msg
        assert f"This rank's {group} group [0, 1]" in msg
        assert "use_distributed_sampler=True" in msg and "Fix:" in msg


@pytest.mark.timeout(300)
def test_peers_with_the_same_batches_train(tmp_path: Path) -> None:
    out = spawn(_fit, 2, str(tmp_path), {"tensor_parallel_size": 2}, False, timeout=240)
    assert [o["error"] for o in out] == [None, None], out
    assert [o["step"] for o in out] == [3, 3]
