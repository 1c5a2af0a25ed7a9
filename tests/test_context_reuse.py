"""A later Trainer with the same layout reuses the live context only when every rank still has it.

Live contexts are held weakly, so whether one survives a fit depends on each process's garbage
collection. Seen in the suite: one rank had lost its context, built a new one (entering the
context's all-reduce) while the others reused theirs (entering Lightning's broadcasts): a hang until
the timeout. The strategy now agrees on the build by one all-reduce.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.gpt.data import GPTDataModule
from examples.gpt.model import GPTLightning
from lightning_parallelctx import ParallelCtxStrategy
from lightning_parallelctx.testing import spawn

import pytest


def _run(rank: int, world: int, root: str) -> dict:
    import lightning_parallelctx.current as current

    def trainer() -> pl.Trainer:
        return pl.Trainer(accelerator="cpu", devices=world, max_steps=2, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                          strategy=ParallelCtxStrategy(tensor_parallel_size=2, print_layout=False))

    def data() -> GPTDataModule:
        return GPTDataModule(vocab_size=32, seq_len=8, num_samples=32, global_batch_size=4)

    model = GPTLightning(vocab_size=32, seq_len=8, d_model=16, n_heads=2, n_layers=1)
    first = trainer()
    first.fit(model, data())
    kept = model.parallel_context
    if rank == 1:  # as if this rank's garbage collector had taken the context
        current.LIVE.discard(kept)
    second = GPTLightning(vocab_size=32, seq_len=8, d_model=16, n_heads=2, n_layers=1)
    trainer().validate(second, data(), verbose=False)
    new = second.parallel_context
    builds = [None] * world
    dist.all_gather_object(builds, new.build_id)
    # Everyone reuses the same build, or everyone builds anew: never a mix.
    return {"reused": new is kept, "builds": builds}


@pytest.mark.timeout(300)
def test_a_context_lost_on_one_rank_is_rebuilt_on_every_rank(tmp_path: Path) -> None:
    out = spawn(_run, 2, str(tmp_path), timeout=240)
    assert [o["reused"] for o in out] == [False, False], out
    assert len(set(out[0]["builds"])) == 1, out


def _same(rank: int, world: int, root: str) -> dict:
    model = GPTLightning(vocab_size=32, seq_len=8, d_model=16, n_heads=2, n_layers=1)
    strategy = ParallelCtxStrategy(tensor_parallel_size=2, print_layout=False)
    kw = dict(accelerator="cpu", devices=world, max_steps=2, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    pl.Trainer(strategy=strategy, **kw).fit(model, GPTDataModule(vocab_size=32, seq_len=8, num_samples=32,
                                                                  global_batch_size=4))
    kept = model.parallel_context
    second = GPTLightning(vocab_size=32, seq_len=8, d_model=16, n_heads=2, n_layers=1)
    pl.Trainer(strategy=ParallelCtxStrategy(tensor_parallel_size=2, print_layout=False), **kw).validate(
        second, GPTDataModule(vocab_size=32, seq_len=8, num_samples=32, global_batch_size=4), verbose=False)
    return {"reused": second.parallel_context is kept}


@pytest.mark.timeout(300)
def test_a_context_every_rank_kept_is_reused(tmp_path: Path) -> None:
    out = spawn(_same, 2, str(tmp_path), timeout=240)
    assert [o["reused"] for o in out] == [True, True], out
