"""Shared fixtures: real launchers (torchrun, Open MPI's mpirun, a local Slurm cluster)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _require(binary: str, why: str) -> None:
    if shutil.which(binary) is None:
        if IN_CI:  # CI installs everything: a missing launcher there is a failure, never a skip
            pytest.fail(f"{binary} is not installed but CI must run {why}; scripts/test.sh installs it")
        pytest.skip(f"{binary} not installed (run scripts/test.sh to install it)")


@pytest.fixture(scope="session")
def slurm_env() -> dict[str, str]:
    """A running local Slurm cluster (scripts/local_cluster.sh); returns the environment to reach it."""
    _require("sbatch", "the Slurm launcher tests")
    directory = os.environ.get("PCTX_SLURM_DIR", "/tmp/pctx-slurm")
    out = subprocess.run(["bash", str(ROOT / "scripts/local_cluster.sh"), "start", directory],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, f"local Slurm cluster did not start:\n{out.stdout}\n{out.stderr}"
    return {**os.environ, "SLURM_CONF": f"{directory}/slurm.conf"}


def run_sbatch(env: dict[str, str], script: str, workdir: Path, timeout: float = 240) -> str:
    """Submit ``script`` (a full sbatch file), wait for it by polling, return its output file's text."""
    path = workdir / "job.sbatch"
    path.write_text(script)
    out = subprocess.run(["sbatch", "--parsable", "-o", str(workdir / "slurm-%j.out"), str(path)],
                         env=env, capture_output=True, text=True, timeout=60, cwd=workdir)
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip().split(";")[0]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        q = subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True, text=True, timeout=30)
        if not q.stdout.strip():
            break
        time.sleep(0.5)
    else:
        subprocess.run(["scancel", job], env=env, timeout=30)
        raise AssertionError(f"Slurm job {job} still running after {timeout} s; cancelled it. Output so far:\n"
                             + (workdir / f"slurm-{job}.out").read_text(errors="replace"))
    state = subprocess.run(["sacct", "-n", "-X", "-j", job, "-o", "State"], env=env, capture_output=True, text=True,
                           timeout=30)
    text = (workdir / f"slurm-{job}.out").read_text(errors="replace")
    return text + (f"\n[sacct state: {state.stdout.strip()}]" if state.returncode == 0 else "")


@pytest.fixture(scope="session")
def mpirun() -> list[str]:
    _require("mpirun", "the Open MPI launcher tests")
    return ["mpirun", "--allow-run-as-root", "--oversubscribe"]


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable
