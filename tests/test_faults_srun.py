"""The fault matrix under srun (a batch job on the local Slurm cluster, one step of 2 tasks): rank 1
raises, is SIGKILLed, dies inside the gradient all-reduce, hangs, or never reaches the rendezvous.

srun does not end the other tasks when one fails (``--kill-on-bad-exit=0``, Slurm's default), so
these run without the flag: the ranks must end by themselves (the report, the watchdog). The one
exception is a rank that never reaches the rendezvous: none of our code runs in it, so only
``--kill-on-bad-exit=1`` ends it, and rank 0's error says so (docs/faults.md).

All the module's jobs are submitted when it starts and run side by side (tests/fault_jobs.py).
"""

from __future__ import annotations

import re

import pytest
from fault_jobs import LIMIT, SlurmJob, submit_srun

pytestmark = [pytest.mark.slow, pytest.mark.launcher]

CASES = {"raise": "", "kill": "", "exit": "", "hang": "--kill-on-bad-exit=0", "norendezvous": "--kill-on-bad-exit=1"}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory, slurm_env: dict[str, str]) -> dict[str, SlurmJob]:
    return {fault: submit_srun(tmp_path_factory.mktemp(fault), slurm_env, fault, 1, flags)
            for fault, flags in CASES.items()}


def ranks_tail(text: str, n: int = 4) -> str:
    """The job's last lines without srun's and slurmstepd's own."""
    lines = [line for line in text.strip().splitlines()
             if not line.startswith(("srun", "slurmstepd")) and "Received SIGTERM" not in line]
    return "\n".join(lines[-n:])


def ended(job: SlurmJob) -> str:
    """srun returned non-zero within the bound, no process left (by pid); the job's output."""
    code, seconds = job.srun_result()
    assert code != 0 and seconds <= LIMIT, job.finish()[-3000:]
    return job.finish()


@pytest.mark.timeout(LIMIT + 120)
def test_srun_raise(jobs: dict[str, SlurmJob]) -> None:
    text = ended(jobs["raise"])
    assert re.search(r"rank 0 of 2 .*stopped because rank 1 .*failed first with ValueError: injected failure at step 2",
                     ranks_tail(text)), text[-3000:]


@pytest.mark.timeout(LIMIT + 120)
@pytest.mark.parametrize("fault", ["kill", "exit"])
def test_srun_rank_dies(jobs: dict[str, SlurmJob], fault: str) -> None:
    """SIGKILLed, or dead inside the gradient all-reduce: rank 0 names it as the rank that never reported."""
    text = ended(jobs[fault])
    tail = ranks_tail(text, 3)
    assert re.search(r"ranks that never reported \(hung, killed, or exited without a Python error\): \[1\]\n"
                     r".*never joined: \[1\]", tail), text[-3000:]


@pytest.mark.timeout(LIMIT + 120)
def test_srun_hang_without_kill_on_bad_exit(jobs: dict[str, SlurmJob]) -> None:
    """Rank 0 times out and reports; the hung rank 1's watchdog ends it."""
    text = ended(jobs["hang"])
    assert re.search(r"never joined: \[1\]", text), text[-3000:]
    assert re.search(r"rank 1 \(pid \d+\): rank 0 reported a failure, .* the watchdog ends it", text), text[-3000:]
    # ... after its Python stacks, which show where it hung.
    stacks = text[text.index("Its Python stacks, to show where it hung"):]
    assert re.search(r'File ".*fault_fit.py", line \d+ in training_step', stacks), stacks[-3000:]


@pytest.mark.timeout(LIMIT + 120)
def test_srun_never_reaches_the_rendezvous(jobs: dict[str, SlurmJob]) -> None:
    text = ended(jobs["norendezvous"])
    assert re.search(r"RendezvousError: rank 0: not all 2 processes reached the rendezvous at \S+ within \d+ s: "
                     r"rank\(s\) \[1\] never connected.* Under srun, --kill-on-bad-exit=1 ends those ranks",
                     ranks_tail(text, 1)), text[-3000:]
