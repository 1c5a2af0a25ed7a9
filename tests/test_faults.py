"""One rank fails, for real, under the strategy's own launcher (Lightning's subprocess launcher):
it raises, is SIGKILLed, hangs, dies inside a collective or never reaches the rendezvous. Every
time, every process of the job must be gone within the timeout + 30 s, the exit code must be
non-zero, and the last lines of the output must name the failing rank (and its exception, when
it had one). tests/scripts/fault_fit.py is the job; it writes each process's pid to a directory.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "fault_fit.py"
TIMEOUT = 30  # the strategy's timeout= (rendezvous and collectives); 30 s: a busy 2-core machine needs ~20 s to start the children
STARTUP = 60  # importing torch + Lightning in every process, on a busy 2-core machine
LIMIT = STARTUP + TIMEOUT + 30  # the bound: timeout + 30 s, plus the start
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
               "MASTER_ADDR", "MASTER_PORT", "PCTX_LAUNCHER", "PCTX_LAUNCHER_PID")

pytestmark = pytest.mark.slow


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARS and not k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_", "MV2_", "TORCHELASTIC_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    return env


def alive(pid: int) -> bool:
    """Running, or stopped: a zombie (dead, not yet reaped by init) does not count."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def run_fault(tmp_path: Path, fault: str, rank: int, devices: int = 2, step: int = 2,
              prefix: list[str] | None = None, extra: list[str] | None = None) -> tuple[int, str, float]:
    pids = tmp_path / "pids"
    cmd = [*(prefix or [sys.executable]), str(SCRIPT), "--fault", fault, "--rank", str(rank), "--step", str(step),
           "--devices", str(devices), "--timeout", str(TIMEOUT), "--pids", str(pids), *(extra or [])]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=LIMIT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        left = _kill_left(pids)
        raise AssertionError(f"the job did not end within {LIMIT} s (left: {left}):\n{out[-5000:]}") from None
    elapsed = time.monotonic() - start
    time.sleep(0.5)  # a SIGKILLed process needs a moment to be gone from /proc
    left = _kill_left(pids)
    assert not left, f"processes of the job outlived it: {left}\n{out[-5000:]}"
    return proc.returncode, out, elapsed


def _kill_left(pids: Path) -> list[int]:
    left = [int(p.stem) for p in pids.glob("*.pid") if alive(int(p.stem))] if pids.exists() else []
    for pid in left:
        os.kill(pid, 9)
    return left


def last_lines(out: str, n: int = 6) -> str:
    return "\n".join(out.strip().splitlines()[-n:])


@pytest.mark.timeout(LIMIT + 30)
def test_child_raises_in_training_step(tmp_path: Path) -> None:
    code, out, _ = run_fault(tmp_path, "raise", rank=1)
    assert code != 0
    tail = last_lines(out)
    assert re.search(r"rank 1 .*failed first with ValueError: injected failure at step 2", tail), tail
    # The teardown (gradient hook removal) must not add a later error over the first one.
    assert "remove" not in tail, tail


@pytest.mark.timeout(LIMIT + 30)
def test_main_process_raises_and_children_end(tmp_path: Path) -> None:
    code, out, _ = run_fault(tmp_path, "raise", rank=0)
    assert code != 0
    tail = last_lines(out, 4)
    assert "ValueError: injected failure at step 2" in tail and "rank 0 of 2" in tail, tail


@pytest.mark.timeout(LIMIT + 30)
def test_child_sigkilled(tmp_path: Path) -> None:
    code, out, _ = run_fault(tmp_path, "kill", rank=1)
    assert code != 0
    tail = last_lines(out, 8)
    assert re.search(r"never reported .*: \[1\]|rank 1 \(pid \d+\) exited with signal SIGKILL", tail), tail


@pytest.mark.timeout(LIMIT + 30)
def test_child_hangs_in_training_step(tmp_path: Path) -> None:
    code, out, _ = run_fault(tmp_path, "hang", rank=1)
    assert code != 0
    tail = last_lines(out, 4)
    assert re.search(r"group world\S* \[0, 1\]: ranks \[0\] waited in collective #\d+; never joined: \[1\]", tail), tail


@pytest.mark.timeout(LIMIT + 30)
def test_main_process_hangs(tmp_path: Path) -> None:
    code, out, _ = run_fault(tmp_path, "hang", rank=0)
    assert code != 0
    tail = last_lines(out, 8)
    assert re.search(r"rank 1 of 2 .*no rank raised|never joined: \[0\]|rank 1 \(pid \d+\) exited", tail), tail


@pytest.mark.timeout(LIMIT + 30)
def test_child_dies_inside_the_gradient_all_reduce(tmp_path: Path) -> None:
    code, out, _ = run_fault(tmp_path, "exit", rank=1)
    assert code != 0
    tail = last_lines(out, 8)
    assert re.search(r"never reported .*: \[1\]|rank 1 \(pid \d+\) exited with exit code 3", tail), tail


@pytest.mark.timeout(LIMIT + 30)
def test_child_never_reaches_the_rendezvous(tmp_path: Path) -> None:
    code, out, _ = run_fault(tmp_path, "norendezvous", rank=1)
    assert code != 0
    tail = last_lines(out, 4)
    assert "not every rank reached the rendezvous" in tail and "1/2 clients joined" in out, tail
