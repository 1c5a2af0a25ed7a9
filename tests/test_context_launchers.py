"""The context built for real under torchrun, Open MPI's mpirun and srun in an sbatch job."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from conftest import ROOT, run_sbatch

from lightning_parallelctx.rendezvous import find_free_port

SCRIPT = ROOT / "tests/scripts/context_check.py"


def _ok_lines(text: str, launcher: str, world: int) -> None:
    lines = re.findall(r"OK launcher=(\S+) rank=(\d+) world=(\d+) local=(\d+) (ParallelContext\([^)]*\))", text)
    assert sorted(int(r) for _, r, _, _, _ in lines) == list(range(world)), text[-3000:]
    assert {lz for lz, _, _, _, _ in lines} == {launcher}
    assert all(int(w) == world for _, _, w, _, _ in lines)
    # single node: the node-local rank is the global rank
    assert all(int(loc) == int(r) for _, r, _, loc, _ in lines)
    reprs = {int(r): text for _, r, _, _, text in lines}
    assert "tp=2[rank=1]" in reprs[1] and "dp=2[rank=1]" in reprs[2]


def test_torchrun(python):
    out = subprocess.run([python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
                          str(SCRIPT), "--tp", "2"], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    _ok_lines(out.stdout, "torchrun", 4)


def test_openmpi(python, mpirun):
    port = find_free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "LOCAL_"))}
    out = subprocess.run([*mpirun, "-np", "4", "-x", "MASTER_ADDR=127.0.0.1", "-x", f"MASTER_PORT={port}",
                          python, str(SCRIPT), "--tp", "2"], capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    _ok_lines(out.stdout, "openmpi", 4)


def test_slurm_sbatch_srun(python, slurm_env, tmp_path: Path):
    port = find_free_port()
    script = f"""#!/bin/bash
#SBATCH --job-name=pctx-context
#SBATCH --ntasks=4
#SBATCH --ntasks-per-node=4
#SBATCH --time=00:05:00
export MASTER_PORT={port}
srun {python} {SCRIPT} --tp 2
"""
    text = run_sbatch(slurm_env, script, tmp_path)
    _ok_lines(text, "slurm", 4)
