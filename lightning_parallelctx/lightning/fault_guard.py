"""What the strategy does when a rank fails: report, end every process, keep the first error on top.

Three pieces, each small, wired into :class:`ParallelCtxStrategy` by one line each:

- :class:`FitGuard` - the :class:`~lightning_parallelctx.guard.FaultGuard` of each fit: a
  :class:`~lightning_parallelctx.watchdog.Watchdog`, and on an exception the
  :mod:`~lightning_parallelctx.faults` report (post this rank's record; for a
  communication error, name the rank that failed first or the ranks that never answered, as a note
  on the exception, which Python prints as the traceback's last lines).
- :class:`ParallelCtxLauncher` - Lightning's subprocess launcher, plus: each child dies with the
  launching process (``PR_SET_PDEATHSIG``, set by the child itself), the observer names the rank
  that exited and lets the main process report before it kills everyone, and a failing main
  process ends its children instead of leaving a hung one behind.
- :func:`quietly` - teardown after a failure never raises a second error over the first.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator, Mapping
from typing import Any

import torch.distributed as dist
from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

from ..errors import RendezvousError
from ..faults import REPORT_WAIT_S, TAG, FaultRecord, first_failure
from ..guard import FaultGuard

log = logging.getLogger(__name__)

#: Set by the launching process for its children: the pid they must not outlive.
PARENT_PID_VAR = "PCTX_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1


def die_with_launcher() -> None:
    """In a child of :class:`ParallelCtxLauncher` or of torchrun's agent: be SIGKILLed when the
    launching process ends.

    Lightning's launcher starts ``python script.py`` per local rank and nothing ties the children's
    lives to the main process: if it dies (an exception, a SIGKILL), a child stuck in user code
    lives on; so do torchrun's workers when their agent is killed (a node's agent on a multi-node
    job). The kernel's parent-death signal fixes that; set here, in the child, because neither
    launcher lets us pass a ``preexec_fn``. Never for a process started by a shell (a parent-death
    signal would end a ``nohup`` run with the terminal).
    """
    parent = os.environ.get(PARENT_PID_VAR)
    if parent is None and "TORCHELASTIC_RUN_ID" in os.environ:
        parent = str(os.getppid())  # torchrun's agent starts its workers directly
    if parent is None or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not glibc: no guarantee, the observer still kills
        return
    if os.getppid() != int(parent):  # the launcher died before we could ask
        sys.stderr.write(f"{TAG} the process that launched this one (pid {parent}) has already exited; "
                         f"this rank (pid {os.getpid()}) stops too.\n")
        sys.stderr.flush()
        os._exit(1)


class _Observer(_ChildProcessObserver):
    """Lightning's observer, but it names the rank that exited and gives the main process
    ``grace_s`` to report and end by itself before it kills everyone (Lightning kills at once, so the
    main process's own account is never printed)."""

    def __init__(self, main_pid: int, child_processes: list[subprocess.Popen], first_rank: int,
                 grace_s: float = REPORT_WAIT_S + 2.0) -> None:
        super().__init__(main_pid=main_pid, child_processes=child_processes, sleep_period=1)
        self._first_rank = first_rank
        self._grace_s = grace_s
        self._failed_at: float | None = None

    def _run(self) -> bool:
        for proc in self._child_processes:
            proc.poll()
        codes = [proc.returncode for proc in self._child_processes]
        if all(code == 0 for code in codes):
            return True
        failed = [(self._first_rank + i, p) for i, p in enumerate(self._child_processes) if p.returncode]
        if not failed:
            return False
        if self._failed_at is None:
            self._failed_at = time.monotonic()
        if time.monotonic() - self._failed_at < self._grace_s:
            return False
        rank, proc = failed[0]
        sys.stderr.write(f"{TAG} rank {rank} (pid {proc.pid}) exited with {_exit_text(proc.returncode)}; "
                         f"ending the other ranks of this job.\n")
        sys.stderr.flush()
        self._terminate_all()
        return True


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


class ParallelCtxLauncher(_SubprocessScriptLauncher):
    """Lightning's ``_SubprocessScriptLauncher`` whose processes never outlive the job (see module doc)."""

    def launch(self, function: Any, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            os.environ[PARENT_PID_VAR] = str(os.getpid())  # copied into each child's environment
            self._call_children_scripts()
            first = self.cluster_environment.node_rank() * self.num_processes + 1
            _Observer(main_pid=os.getpid(), child_processes=self.procs, first_rank=first).start()
        return function(*args, **kwargs)

    def end_children(self, grace_s: float) -> None:
        """After a failure of the main process: let the children that are exiting finish their own
        report (up to ``grace_s``), then SIGKILL the rest (a hung child would never exit)."""
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.1)
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)


class FitGuard(FaultGuard):
    """The strategy's :class:`~lightning_parallelctx.guard.FaultGuard`: one span per fit, plus what
    only a Lightning job has (torchrun's error file, our launcher's children, the rendezvous note)."""

    def __init__(self) -> None:
        super().__init__("fit")

    def on_exception(self, exc: BaseException, ctx: Any, launcher: Any) -> None:
        """Report ``exc`` (never raises); end our children if we launched them."""
        records: dict[int, FaultRecord] = {}
        if self.report(exc, ctx, records) is None:
            note = _rendezvous_note(exc)  # before the default group exists the store carries no reports
            if note:
                exc.add_note(note)
        write_elastic_error_file(exc, records)
        if isinstance(launcher, ParallelCtxLauncher) and launcher.procs:
            launcher.end_children(REPORT_WAIT_S + 2.0)


def write_elastic_error_file(exc: BaseException, records: Mapping[int, FaultRecord]) -> None:
    """Under torchrun: the error file its agent reads (what ``@record`` would write), so that its final
    summary ("Root Cause (first observed failure)") shows the traceback with our note, not
    "error_file: <N/A>". torchrun picks the smallest timestamp as the root cause; a rank whose error
    is a consequence of another rank's dates itself one second after that rank, so the real first
    failure wins even within the same second."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or os.path.exists(path):  # a user's own @record already wrote it: theirs stands
        return
    first = first_failure(records)
    stamp = int(time.time())
    if first is not None and first.rank != dist.get_rank():
        stamp = max(stamp, int(first.time) + 1)
    data = {"message": {"message": "".join(traceback.format_exception_only(exc)).strip(),
                        "extraInfo": {"py_callstack": "".join(traceback.format_exception(exc)),
                                      "timestamp": str(stamp)}}}
    with contextlib.suppress(OSError):
        with open(path, "w") as f:
            json.dump(data, f)


def _rendezvous_note(exc: BaseException) -> str | None:
    """Before the default group exists the store cannot carry reports: say what torch's message means."""
    if isinstance(exc, RendezvousError):
        return None  # it says all of this itself
    text = str(exc)
    if "clients joined" in text or "waiting for clients" in text:
        return (f"{TAG} not every rank reached the rendezvous within the timeout: some processes never started, "
                f"crashed or hang before creating the Trainer, or were given another MASTER_ADDR/MASTER_PORT. "
                f"Their own output says why; raise rendezvous_timeout= if they are only slow to start.")
    silent = silent_ranks_in_store_wait(text)
    if silent:
        return (f"{TAG} rank(s) {silent} never joined the creation of the process group within the timeout: "
                f"they never started, crashed or hang before creating their Trainer. Their own output says why; "
                f"raise timeout= if they are only slow to start.")
    return None


def silent_ranks_in_store_wait(text: str) -> list[int]:
    """The ranks whose keys a timed-out store wait was waiting for, when the wait was gloo's
    connection of a new group (under torchrun, whose agent hosts the store, that is where a rank
    that never came shows up): ``wait timeout after 15000ms, keys: /prefix//0//cpu//0/1`` - gloo
    waits for one key per peer, named by the peer's rank."""
    match = re.search(r"wait timeout after \d+ms, keys: (.*)", text)
    if match is None:
        return []
    ranks = [re.search(r"/(\d+)$", key.strip(" []'\"")) for key in match.group(1).split(",")]
    return sorted({int(m.group(1)) for m in ranks if m is not None})


@contextlib.contextmanager
def quietly(failed: bool, what: str) -> Iterator[None]:
    """After a failure, an error in ``what`` (typically the peers being gone) is logged, not raised:
    it would replace the exception that explains the failure."""
    if not failed:
        yield
        return
    try:
        yield
    except Exception as err:  # noqa: BLE001
        log.info("%s after a failure also failed (ignored: the first error is what matters): %s", what, err)
