"""The strategy's own launcher, the faults that end only when the timeout strikes: a rank hangs in
``training_step`` (the child, or the main process) or never reaches the rendezvous; and a rank that
reaches it late, which rendezvous_timeout= lets through. Their jobs
start together when the module starts (each mostly waits), see tests/fault_jobs.py."""

from __future__ import annotations

import re

import pytest
from fault_jobs import LIMIT, TIMEOUT, Job, last_lines, start_fault, weights

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Job]:
    cases = {"child hangs": ("hang", 1), "main hangs": ("hang", 0), "no rendezvous": ("norendezvous", 1),
             "slow start": ("slowstart", 1)}
    return {name: start_fault(tmp_path_factory.mktemp(fault), fault, rank) for name, (fault, rank) in cases.items()}


@pytest.mark.timeout(LIMIT + 30)
def test_child_hangs_in_training_step(jobs: dict[str, Job]) -> None:
    code, out, _ = jobs["child hangs"].finish()
    assert code != 0
    tail = last_lines(out, 4)
    assert re.search(r"group world\S* \[0, 1\]: ranks \[0\] waited in collective #\d+; never joined: \[1\]", tail), tail


@pytest.mark.timeout(LIMIT + 30)
def test_main_process_hangs(jobs: dict[str, Job]) -> None:
    """Rank 1 times out and names rank 0; the hung main process is then ended by its own watchdog,
    which prints its Python stacks (where it hung) and, last, why it ended it."""
    code, out, _ = jobs["main hangs"].finish()
    assert code != 0
    assert re.search(r"rank 1 of 2 .*no rank raised|never joined: \[0\]", out), last_lines(out, 20)
    tail = last_lines(out, 2)
    assert re.search(r"rank 0 \(pid \d+\): rank 1 reported a failure, and this rank was still inside the fit \d+ s "
                     r"later \(hung\?\); the watchdog ends it|rank 1 \(pid \d+\) exited", tail), tail
    if "the watchdog ends it" in tail:
        stacks = out[out.rindex("Its Python stacks, to show where it hung"):]
        assert re.search(r'File ".*fault_fit.py", line \d+ in training_step', stacks), stacks[-3000:]


@pytest.mark.timeout(LIMIT + 30)
def test_child_never_reaches_the_rendezvous(jobs: dict[str, Job]) -> None:
    code, out, _ = jobs["no rendezvous"].finish()
    assert code != 0
    tail = last_lines(out, 4)
    assert re.search(rf"RendezvousError: rank 0: not all 2 processes reached the rendezvous at 127.0.0.1:\d+ within "
                     rf"{TIMEOUT} s: rank\(s\) \[1\] never connected", tail), tail


@pytest.mark.timeout(LIMIT + 30)
def test_a_start_slower_than_timeout_is_let_through_by_rendezvous_timeout(jobs: dict[str, Job]) -> None:
    """Rank 1 reaches the rendezvous 35 s late: later than timeout= (30 s, for collectives) but within
    rendezvous_timeout= (120 s); the fit trains to its end on both ranks."""
    code, out, seconds = jobs["slow start"].finish()
    assert code == 0, last_lines(out, 30)
    assert seconds > TIMEOUT
    assert len(weights(out)) == 2, last_lines(out, 10)
