"""One rank fails, for real, under the strategy's own launcher (Lightning's subprocess launcher):
it raises, is SIGKILLed, hangs, dies inside a collective or never reaches the rendezvous. Every
time, every process of the job must be gone within the timeout + 30 s, the exit code must be
non-zero, and the last lines of the output must name the failing rank (and its exception, when
it had one). The cases that wait for the timeout are in test_faults_waits.py, the other launchers
in test_faults_{torchrun,mpirun,srun,nodes}.py: one module per worker of CI's ``pytest -n 3``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fault_jobs import LIMIT, last_lines, run_fault

pytestmark = pytest.mark.slow


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
def test_child_dies_inside_the_gradient_all_reduce(tmp_path: Path) -> None:
    code, out, _ = run_fault(tmp_path, "exit", rank=1)
    assert code != 0
    tail = last_lines(out, 8)
    assert re.search(r"never reported .*: \[1\]|rank 1 \(pid \d+\) exited with exit code 3", tail), tail
