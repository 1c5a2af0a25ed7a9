"""The fault matrix under torchrun (--standalone, 2 workers): rank 1 raises, is SIGKILLed, hangs,
dies inside the gradient all-reduce or never reaches the rendezvous. torchrun's own summary comes
last; its "Root Cause (first observed failure)" must show the failing rank, and our note when that
rank had one (the strategy writes the error file torchrun reads). The jobs that wait for the
timeout start together with the module (tests/fault_jobs.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fault_jobs import LIMIT, TORCHRUN, Job, run_fault, start_fault

pytestmark = [pytest.mark.slow, pytest.mark.launcher]


@pytest.fixture(scope="module")
def waiting(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Job]:
    return {fault: start_fault(tmp_path_factory.mktemp(fault), fault, rank=1, prefix=TORCHRUN)
            for fault in ("hang", "norendezvous")}


def root_cause(out: str) -> str:
    assert "Root Cause (first observed failure)" in out, out[-4000:]
    return out[out.rindex("Root Cause (first observed failure)"):]


@pytest.mark.timeout(LIMIT + 30)
@pytest.mark.parametrize("fault, expected", [
    ("raise", r"ValueError: injected failure at step 2\n\s*\[lightning_parallelctx\] rank 1 of 2 .*failed with this error"),
    ("kill", r"rank\s+: 1 \(local_rank: 1\)\s+exitcode\s+: -9 .*\(SIGKILL\)"),
    ("exit", r"rank\s+: 1 \(local_rank: 1\)\s+exitcode\s+: 3 "),
], ids=["raise", "kill", "exit"])
def test_torchrun(tmp_path: Path, fault: str, expected: str) -> None:
    code, out, _ = run_fault(tmp_path, fault, rank=1, prefix=TORCHRUN)
    assert code != 0
    assert re.search(expected, root_cause(out)), root_cause(out)
    if fault in ("kill", "exit"):  # no Python error of its own: rank 0's lines name it as the silent one
        before = out[:out.rindex("Root Cause")]
        assert re.search(r"ranks that never reported \(hung, killed, or exited without a Python error\): \[1\]",
                         before), before[-4000:]


@pytest.mark.timeout(LIMIT + 30)
def test_torchrun_hang(waiting: dict[str, Job]) -> None:
    code, out, _ = waiting["hang"].finish()
    assert code != 0
    assert re.search(r"\[lightning_parallelctx\] group world\S* \[0, 1\]: ranks \[0\] waited in collective #\d+; "
                     r"never joined: \[1\]", root_cause(out)), root_cause(out)


@pytest.mark.timeout(LIMIT + 30)
def test_torchrun_never_reaches_the_rendezvous(waiting: dict[str, Job]) -> None:
    """torchrun's agent hosts the store; every rank posts its arrival there and waits for the others,
    so rank 0 names the rank that never came, as under the other launchers."""
    code, out, _ = waiting["norendezvous"].finish()
    assert code != 0
    assert re.search(r"rank\s+: 0 .*\n(.*\n)*.*RendezvousError: rank 0: not all 2 processes reached the rendezvous at "
                     r"\S+ within \d+ s: rank\(s\) \[1\] never connected", root_cause(out)), root_cause(out)
