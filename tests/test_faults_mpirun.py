"""The fault matrix under Open MPI's mpirun (2 processes): rank 1 raises, is SIGKILLed, hangs, dies
inside the gradient all-reduce or never reaches the rendezvous. mpirun's closing blocks come last;
the ranks' last lines before them must name the failing or silent rank. The jobs that wait for the
timeout start together with the module (tests/fault_jobs.py)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from fault_jobs import LIMIT, Job, run_fault, start_fault

pytestmark = [pytest.mark.slow, pytest.mark.launcher]


def prefix(mpirun: list[str]) -> list[str]:
    return [*mpirun, "-x", "PYTHONPATH", "-np", "2", sys.executable]


@pytest.fixture(scope="module")
def waiting(tmp_path_factory: pytest.TempPathFactory, mpirun: list[str]) -> dict[str, Job]:
    return {fault: start_fault(tmp_path_factory.mktemp(fault), fault, rank=1, prefix=prefix(mpirun))
            for fault in ("hang", "norendezvous")}


def before_mpirun_trailer(out: str, n: int = 3, ranks_only: bool = True) -> str:
    """The ranks' last lines: without mpirun's dashed blocks, Lightning's "Received SIGTERM" (mpirun
    terminating the others once one exited) and, with ``ranks_only``, anything but the lines torch
    prefixes with ``[rankN]:`` (a hung rank's watchdog may print its stacks after mpirun's first block)."""
    lines, inside = [], False
    for line in out.strip().splitlines():
        if set(line.strip()) == {"-"}:
            inside = not inside
        elif not inside and "Received SIGTERM" not in line and (line.startswith("[rank") or not ranks_only):
            lines.append(line)
    return "\n".join(lines[-n:])


@pytest.mark.timeout(LIMIT + 30)
@pytest.mark.parametrize("fault, expected", [
    ("raise", r"rank 0 of 2 .* stopped because rank 1 .*failed first with ValueError: injected failure at step 2"),
    ("kill", r"ranks that never reported \(hung, killed, or exited without a Python error\): \[1\]"),
    ("exit", r"ranks that never reported .*: \[1\]\n.*never joined: \[1\]"),
], ids=["raise", "kill", "exit"])
def test_mpirun(tmp_path: Path, mpirun: list[str], fault: str, expected: str) -> None:
    code, out, _ = run_fault(tmp_path, fault, rank=1, prefix=prefix(mpirun))
    assert code != 0
    assert re.search(expected, before_mpirun_trailer(out)), out[-4000:]


@pytest.mark.timeout(LIMIT + 30)
def test_mpirun_hang(waiting: dict[str, Job]) -> None:
    code, out, _ = waiting["hang"].finish()
    assert code != 0
    assert re.search(r"group world\S* \[0, 1\]: ranks \[0\] waited in collective #\d+; never joined: \[1\]",
                     before_mpirun_trailer(out)), out[-4000:]


@pytest.mark.timeout(LIMIT + 30)
def test_mpirun_never_reaches_the_rendezvous(waiting: dict[str, Job]) -> None:
    code, out, _ = waiting["norendezvous"].finish()
    assert code != 0
    assert re.search(r"RendezvousError: rank 0: not all 2 processes reached the rendezvous at \S+ within \d+ s: "
                     r"rank\(s\) \[1\] never connected", before_mpirun_trailer(out, 1, ranks_only=False)), out[-4000:]
