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


def sbatch_and_wait(args: list[str], env: dict[str, str], output: Path, timeout: float = 240,
                    cwd: Path | None = None) -> str:
    """Submit ``sbatch args``, poll squeue twice a second (``sbatch --wait`` polls far less often),
    return the job's output; a job still running at ``timeout`` is cancelled and fails the test."""
    out = subprocess.run(["sbatch", "--parsable", f"--output={output}", *args], env=env, capture_output=True,
                         text=True, timeout=60, cwd=cwd)
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip().split(";")[0]
    deadline = time.monotonic() + timeout
    while subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True, text=True,
                         timeout=30).stdout.strip():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job], env=env, timeout=30)
            raise AssertionError(f"Slurm job {job} still running after {timeout} s (cancelled):\n"
                                 + (output.read_text(errors="replace") if output.exists() else ""))
        time.sleep(0.5)
    return output.read_text(errors="replace") if output.exists() else ""


def run_sbatch(env: dict[str, str], script: str, workdir: Path, timeout: float = 240) -> str:
    """Submit ``script`` (a whole sbatch file) from ``workdir`` and return its output."""
    path = workdir / "job.sbatch"
    path.write_text(script)
    return sbatch_and_wait([str(path)], env, workdir / "job.out", timeout, cwd=workdir)


@pytest.fixture(scope="session")
def mpirun() -> list[str]:
    _require("mpirun", "the Open MPI launcher tests")
    return ["mpirun", "--allow-run-as-root", "--oversubscribe"]


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable
