"""The planner command and the built-in sub-mode initializers (pure: no processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_parallelctx import ParallelConfigError, RankLayout
from lightning_parallelctx.initializers import mode_groups_for
from lightning_parallelctx.plan import main

ROOT = Path(__file__).resolve().parents[1]


def test_plan_prints_every_mode_and_rank(capsys):
    assert main(["--world-size", "16", "--tp", "2", "--pp", "2", "--mode", "pipeline_embedding"]) == 0
    out = capsys.readouterr().out
    for word in ("tensor", "data", "pipeline", "dense_replica", "pipeline_embedding", "[0, 1]", "[0, 2, 4, 6]",
                 "[0, 8]", "new_group calls per rank: at most"):
        assert word in out, word
    assert out.count("│") > 16 * 6  # the per-rank table: 16 rows


def test_plan_invalid_sizes_list_valid_ones(capsys):
    assert main(["-n", "12", "--tp", "8"]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "not divisible" in out and "1, 2, 3, 4, 6, 12" in out


def test_plan_64_ranks_as_a_command():
    out = subprocess.run([sys.executable, "-m", "lightning_parallelctx", "plan", "--world-size", "64", "--tp", "4",
                          "--pp", "2"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    assert "Layout: 64 ranks" in out.stdout and out.stderr == ""
    assert "[0, 1, 2, 3]  [4, 5, 6, 7]" in out.stdout  # tensor groups
    assert "[0, 4, 8, 12, 16, 20, 24, 28]  [1, 5, 9, 13, 17, 21, 25, 29]" in out.stdout  # data groups
    assert "[0, 32]  [1, 33]" in out.stdout  # pipeline groups


def test_plan_user_mode_by_class_path_json():
    out = subprocess.run(
        [sys.executable, "-m", "lightning_parallelctx", "plan", "-n", "8", "--tp", "2", "--mode",
         '{"class_path": "modes.InterleavedData", "init_args": {"parts": 2}}'],
        capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(ROOT / "examples/custom_mode"), "PATH": "/usr/bin:/bin", "COLUMNS": "200"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "data_interleaved" in out.stdout and "[0, 4]" in out.stdout


def test_two_d_tensor_groups():
    layout = RankLayout.build(16, tensor=4)
    modes = {m.name: m for m in mode_groups_for(layout, ["tensor_2d_row", "tensor_2d_col"])}
    assert list(modes["tensor_2d_row"])[:2] == [(0, 1), (2, 3)]
    assert list(modes["tensor_2d_col"])[:2] == [(0, 2), (1, 3)]
    # every row group meets every column group of its TENSOR group in exactly one rank
    for row in modes["tensor_2d_row"]:
        for col in modes["tensor_2d_col"]:
            if row[0] // 4 == col[0] // 4:
                assert len(set(row) & set(col)) == 1
    with pytest.raises(ParallelConfigError, match="q x q"):
        mode_groups_for(RankLayout.build(8, tensor=2), ["tensor_2d_row"])


def test_pipeline_embedding_covers_first_and_last_stage_only():
    layout = RankLayout.build(12, tensor=2, pipeline=3)
    (emb,) = [m for m in mode_groups_for(layout, ["pipeline_embedding"]) if m.name == "pipeline_embedding"]
    assert list(emb)[:2] == [(0, 8), (1, 9)]
    assert emb.group_of(4) is None  # a middle stage is in no embedding group
