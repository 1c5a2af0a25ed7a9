"""Plug-in parallel modes through Lightning: from YAML only (CLI), and registered from Python."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.custom_mode.monitor import GroupLossMonitor
from examples.gpt.data import GPTDataModule
from examples.gpt.model import GPTLightning
from lightning_parallelctx import ParallelCtxStrategy, ParallelConfigError, ProcessGroupInitializer, register_mode
from lightning_parallelctx.initializers import unregister_mode
from lightning_parallelctx.testing import spawn


def test_mode_added_from_yaml_only(tmp_path: Path):
    out = subprocess.run(
        [sys.executable, "-m", "lightning_parallelctx", "fit", "--config", "configs/cpu-dp4-custom-mode.yaml",
         "--trainer.max_steps", "6", "--trainer.log_every_n_steps", "2",
         "--trainer.logger.init_args.save_dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=400,
        env={**os.environ, "COLUMNS": "200"},  # rich wraps table cells at 80 columns otherwise
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    groups = {int(r): g for r, g in re.findall(r"mode data_interleaved: rank (\d) group (\[[\d, ]+\])", out.stdout)}
    # dp4 data group [0, 1, 2, 3] interleaved in 2 parts: [0, 2] and [1, 3]
    assert groups == {0: "[0, 2]", 1: "[1, 3]", 2: "[0, 2]", 3: "[1, 3]"}, out.stdout[-2000:]
    assert re.search(r"^final loss: [\d.]+ \(step 6\)$", out.stdout, re.M)
    # rank 0 printed the process-group table once, the plug-in mode in it
    assert out.stdout.count("Process groups per mode") == 1
    assert re.search(r"data_interleaved\s+│\s+DATA interleaved", out.stdout), out.stdout[:3000]
    (metrics,) = tmp_path.glob("*/version_*/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    assert any(row.get("loss_data_interleaved") for row in rows), rows[:3]


class EvenOdd(ProcessGroupInitializer):
    name = "even_odd"

    def groups(self, layout):
        return [list(range(0, layout.world_size, 2)), list(range(1, layout.world_size, 2))]


def _fit_with_registered_mode(rank: int, world: int, root: str) -> list[int]:
    register_mode(EvenOdd)
    try:
        monitor = GroupLossMonitor("even_odd")
        trainer = pl.Trainer(
            accelerator="cpu", devices=world, strategy=ParallelCtxStrategy(tensor_parallel_size=2), max_steps=3,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[monitor], default_root_dir=root,
        )
        model = GPTLightning(vocab_size=32, seq_len=8, d_model=16, n_heads=2, n_layers=1)
        trainer.fit(model, GPTDataModule(vocab_size=32, seq_len=8, num_samples=64, global_batch_size=4))
        ctx = model.parallel_context
        # tp2 x dp2 with rank = 2 * dp + tp: even/odd ranks are the data groups, so the loss averaged
        # over the plug-in group is the global batch's loss, i.e. the sync_dist train_loss.
        return ctx.get_ranks_in_group("even_odd"), float(trainer.callback_metrics["loss_even_odd"]), \
            float(trainer.callback_metrics["train_loss"])
    finally:
        unregister_mode("even_odd")


def test_mode_registered_from_python_through_fit(tmp_path: Path):
    results = spawn(_fit_with_registered_mode, 4, str(tmp_path), timeout=300)
    assert [groups for groups, _, _ in results] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    for rank, (_, group_loss, train_loss) in enumerate(results):
        assert abs(group_loss - train_loss) < 1e-6, (rank, group_loss, train_loss)
    assert len({round(loss, 6) for _, loss, _ in results}) == 1  # the same on every rank


class Overlapping(ProcessGroupInitializer):
    name = "overlapping"

    def groups(self, layout):
        return [[0, 1], [1, 2, 3]]


def test_bad_modes_fail_when_the_trainer_is_built():
    with pytest.raises(ParallelConfigError, match="no mode named 'nope'"):
        ParallelCtxStrategy(modes=["nope"])
    with pytest.raises(ParallelConfigError, match="cannot be imported"):
        ParallelCtxStrategy(modes=[{"class_path": "examples.custom_mode.modes.Missing"}])
    strategy = ParallelCtxStrategy(modes=[{"class_path": "test_custom_modes_fit.Overlapping"}])
    with pytest.raises(ParallelConfigError, match="does not partition its ranks: rank 1"):
        pl.Trainer(accelerator="cpu", devices=4, strategy=strategy, logger=False)
    with pytest.raises(ParallelConfigError, match="q x q"):
        pl.Trainer(accelerator="cpu", devices=4, strategy=ParallelCtxStrategy(tensor_parallel_size=2,
                                                                               modes=["tensor_2d_row"]), logger=False)
