"""``fault_guard`` around a user's own loop over a ParallelContext (no Lightning): 3 plain processes
with torchrun's variables and no launcher to kill anyone (tests/scripts/fault_loop.py). One rank
raises, or hangs: every rank must exit non-zero within the timeout + 30 s, none may be left (by
pid), and each rank's last lines must name the failing rank, or the one that never joined; the hung
rank's own output must show where it hung (its Python stack) before its watchdog ends it. A loop
without a fault must end normally (exit code 0, no abort from the watchdog thread at exit).

The three jobs start together with the module: two of them mostly wait for a timeout."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from fault_jobs import LIMIT, ROOT, TIMEOUT, clean_env, kill_left, last_lines

from lightning_parallelctx.rendezvous import find_free_port

pytestmark = pytest.mark.slow

SCRIPT = ROOT / "tests" / "scripts" / "fault_loop.py"
WORLD = 3
GRACE = 5


@dataclass
class Loop:
    procs: list[subprocess.Popen]
    logs: list[Path]
    pids: Path
    start: float

    def finish(self) -> tuple[list[int], list[str]]:
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=max(1.0, LIMIT - (time.monotonic() - self.start))))
            except subprocess.TimeoutExpired:
                for p in self.procs:
                    p.kill()
                left = kill_left(self.pids)
                raise AssertionError(f"rank still running after {LIMIT} s (left: {left}):\n"
                                     + "\n".join(log.read_text()[-2000:] for log in self.logs)) from None
        assert not kill_left(self.pids), "processes of the loop outlived it"
        return codes, [log.read_text(errors="replace") for log in self.logs]


def start_loop(workdir: Path, fault: str, rank: int) -> Loop:
    workdir.mkdir(parents=True, exist_ok=True)
    port = find_free_port()
    procs, logs = [], []
    for r in range(WORLD):
        env = {**clean_env(), "RANK": str(r), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(r),
               "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        log = workdir / f"rank{r}.log"
        with open(log, "w") as out:
            procs.append(subprocess.Popen(
                [sys.executable, str(SCRIPT), "--fault", fault, "--rank", str(rank), "--timeout", str(TIMEOUT),
                 "--grace", str(GRACE), "--pids", str(workdir / "pids")],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        logs.append(log)
    return Loop(procs, logs, workdir / "pids", time.monotonic())


@pytest.fixture(scope="module")
def loops(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Loop]:
    return {fault: start_loop(tmp_path_factory.mktemp(fault), fault, rank)
            for fault, rank in (("raise", 2), ("hang", 1), ("none", 0))}


@pytest.mark.timeout(LIMIT + 30)
def test_a_rank_raises(loops: dict[str, Loop]) -> None:
    codes, outs = loops["raise"].finish()
    assert all(code != 0 for code in codes), codes
    assert re.search(r"ValueError: injected failure at step 2\n(\[rank2\]: )?\[lightning_parallelctx\] rank 2 of 3 .*failed with "
                     r"this error", last_lines(outs[2], 2)), outs[2][-3000:]
    for r in (0, 1):
        assert re.search(r"rank %d of 3 .*stopped because rank 2 .*failed first with ValueError: injected failure "
                         r"at step 2" % r, last_lines(outs[r], 2)), outs[r][-3000:]


@pytest.mark.timeout(LIMIT + 30)
def test_a_rank_hangs(loops: dict[str, Loop]) -> None:
    codes, outs = loops["hang"].finish()
    assert all(code != 0 for code in codes), codes
    for r in (0, 2):
        assert re.search(r"group world\S* \[0, 1, 2\]: ranks \[[02], ?[02]?\] waited in collective #\d+; "
                         r"never joined: \[1\]", last_lines(outs[r], 2)), outs[r][-3000:]
    hung = outs[1]
    # Its stacks first (the main thread inside the loop's sleep), then the watchdog's last word.
    stacks = hung[hung.index("Its Python stacks, to show where it hung"):]
    assert re.search(r'File ".*fault_loop.py", line \d+ in <module>', stacks), hung[-3000:]
    assert re.search(r"rank 1 \(pid \d+\): rank [02] reported a failure, and this rank was still inside the guarded "
                     r"loop 5 s later \(hung\?\); the watchdog ends it \(exit code 1\)", last_lines(hung, 1)), hung[-3000:]


@pytest.mark.timeout(LIMIT + 30)
def test_a_loop_without_fault_ends_normally(loops: dict[str, Loop]) -> None:
    codes, outs = loops["none"].finish()
    assert codes == [0] * WORLD, (codes, [o[-2000:] for o in outs])
    weights = [re.search(r"rank \d: done weights=(\[.*\])", out).group(1) for out in outs]  # type: ignore[union-attr]
    assert len(set(weights)) == 1, weights  # the gradients were averaged: every rank holds the same model
