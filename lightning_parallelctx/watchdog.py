"""A per-process watchdog: a rank that hangs must not outlive the job it belongs to.

A rank stuck in user code (a sleep, a deadlock, a collective no one else will join) never sees the
other ranks' errors. torchrun's agent and mpirun kill the rest of a job when one process exits
non-zero, but srun (without ``--kill-on-bad-exit``) and a user's own process tree do not, and the
hung rank keeps its node (and its GPU) until someone notices. So each rank runs one daemon thread,
armed for the length of a fit, that blocks on the rendezvous store until either

- a failing rank wakes it (:class:`.faults.FaultBoard` wakes every rank when one posts a failure), or
- the store itself goes away (rank 0, which hosts it, died),

and then, if this process is still inside the fit ``grace_s`` later, prints why and its Python stacks
and ends the process with exit code 1. A rank that fails normally reaches its teardown, which
disarms the watchdog, long before that. The thread blocks in the store's ``wait`` (outside the
GIL) over its own connection: nothing is polled and the happy path pays one store ``set`` per fit
(the disarm, which also ends the thread so that none accumulate over many fits).
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import sys
import threading
import weakref
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from .faults import ABORT_KEY, STORE_OP_TIMEOUT_S, TAG, wake_key

#: Seconds a rank may still run after the abort before the watchdog ends it.
DEFAULT_GRACE_S = 10.0
_WAIT_CHUNK = timedelta(seconds=600)
_STOP = "stop"
#: Watchdogs whose thread may still run. Each is stopped and joined before the interpreter shuts
#: down: a daemon thread still inside the store's C++ call when Python finalizes is ended with
#: pthread_exit, whose unwinding through C++ aborts the process ("terminate called without an
#: active exception", exit code -6) after a fit that succeeded.
_RUNNING: "weakref.WeakSet[Watchdog]" = weakref.WeakSet()


class Watchdog:
    """Arm with :meth:`start`, disarm with :meth:`stop`. ``exit_fn`` is ``os._exit`` except in tests."""

    def __init__(self, host: str, port: int, prefix: str, rank: int, grace_s: float = DEFAULT_GRACE_S,
                 exit_fn: Any = os._exit, scope: str = "the fit"):
        self.host, self.port, self.prefix, self.rank = host, port, prefix, rank
        self.grace_s = grace_s
        self.scope = scope  # what the armed span is called in the message: "the fit", "the guarded loop"
        self._exit = exit_fn
        self._disarmed = threading.Event()
        self._thread: threading.Thread | None = None
        #: Why it fired (None while it has not): for tests.
        self.reason: str | None = None

    def _store(self, timeout: float) -> Any:
        client = dist.TCPStore(self.host, self.port, is_master=False, wait_for_workers=False,
                               timeout=timedelta(seconds=timeout))
        return dist.PrefixStore(self.prefix, client)

    def start(self) -> "Watchdog":
        self._thread = threading.Thread(target=self._run, name=f"pctx-watchdog-rank{self.rank}", daemon=True)
        self._thread.start()
        _RUNNING.add(self)
        return self

    def stop(self, join_s: float = STORE_OP_TIMEOUT_S) -> None:
        """Disarm, wake the thread and wait (up to ``join_s``) for it to end (see ``_RUNNING``)."""
        if not self._disarmed.is_set():
            self._disarmed.set()
            try:
                self._store(STORE_OP_TIMEOUT_S).set(wake_key(self.rank), _STOP)
            except Exception:  # noqa: BLE001 - store gone: the thread's wait fails and it ends by itself
                pass
        self.join(join_s)
        _RUNNING.discard(self)

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def armed(self) -> bool:
        return not self._disarmed.is_set()

    def _run(self) -> None:
        try:
            store = self._store(60.0)
        except Exception:  # noqa: BLE001 - no store to watch (already gone): the collectives time out
            return
        reason = None
        while self.armed and reason is None:
            try:
                store.wait([wake_key(self.rank)], _WAIT_CHUNK)
            except Exception as err:  # noqa: BLE001
                text = str(err).lower()
                if "timeout" in text or "timed out" in text:
                    continue  # nothing happened in this chunk
                reason = f"rank 0's rendezvous store ({self.host}:{self.port}) is gone: rank 0 failed or was killed"
                break
            try:
                value = store.get(wake_key(self.rank)).decode()
            except Exception:  # noqa: BLE001
                value = "abort:?"
            if value == _STOP:
                return
            try:
                first = store.get(ABORT_KEY).decode()
            except Exception:  # noqa: BLE001 - the wake key's rank, then
                first = value.partition(":")[2]
            reason = f"rank {first} reported a failure"
        if reason is None or self._disarmed.wait(self.grace_s):
            return  # the fit ended (teardown) within the grace: the normal path of a failure
        self.reason = reason
        self._end(reason)

    def _end(self, reason: str) -> None:
        """Say why, show where this rank hung (every thread's Python stack: the main thread's is the
        user's code that never returned), then end the process."""
        head = f"{TAG} rank {self.rank} (pid {os.getpid()})"
        sys.stderr.write(f"{head}: {reason}, and this rank was still inside {self.scope} {self.grace_s:.0f} s "
                         f"later (hung?). Its Python stacks, to show where it hung:\n")
        sys.stderr.flush()
        try:
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        except (OSError, ValueError, AttributeError):  # stderr without a file descriptor (captured): no stacks
            pass
        sys.stderr.write(f"{head}: {reason}, and this rank was still inside {self.scope} {self.grace_s:.0f} s "
                         f"later (hung?); the watchdog ends it (exit code 1).\n")
        sys.stderr.flush()
        self._exit(1)


@atexit.register
def _stop_all() -> None:
    for dog in list(_RUNNING):
        dog.stop()
