"""The first-failure report and the watchdog for any span of distributed code: the strategy's fit,
or a user's own training loop over a :class:`~lightning_parallelctx.ParallelContext`::

    ctx = ParallelContext.from_torch(tensor_parallel_size=2)
    with fault_guard(ctx):
        for batch in data:
            ...

While the span runs, each rank has a :class:`~.watchdog.Watchdog` (a hung rank is ended, with its
Python stacks, once another rank has failed); when an exception leaves the span, this rank posts
its record to the rendezvous store (:mod:`.faults`) and, for a communication error, adds a note
naming the rank that failed first or the ranks that never answered. The exception is re-raised
unchanged otherwise: the guard never swallows or replaces an error.

The store is the default process group's (rank 0's, or torchrun's agent's), found through torch;
a world of one process has nothing to report to and the guard does nothing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist

from .faults import REPORT_WAIT_S, TAG, FaultBoard, FaultRecord, context_groups, explain, group_positions, make_record
from .watchdog import DEFAULT_GRACE_S, Watchdog


def store_address(fallback_host: str | None = None, fallback_port: int | None = None) -> tuple[str, int] | None:
    """Host and port of the default group's TCPStore (rank 0's, or torchrun's agent's), else the
    fallback (else MASTER_ADDR/MASTER_PORT); None when there is none to be found."""
    try:
        store: Any = dist.distributed_c10d._get_default_store()
        while store is not None and not hasattr(store, "port"):
            store = getattr(store, "underlying_store", None)
        if store is not None:
            return str(store.host), int(store.port)
    except Exception:  # noqa: BLE001 - no default store we can see: fall back to what the launcher said
        pass
    host = fallback_host or os.environ.get("MASTER_ADDR")
    port = fallback_port or int(os.environ.get("MASTER_PORT", "0") or 0)
    return (host, port) if host and port else None


class FaultGuard:
    """One guarded span at a time: :meth:`arm` at its start, :meth:`report` on an exception,
    :meth:`disarm` at its end. ``kind`` names the spans in the store keys and messages ("fit",
    "loop"); ranks must arm their spans in the same order (they do: every rank runs the same code)."""

    def __init__(self, kind: str = "loop") -> None:
        self.kind = kind
        self._spans = 0
        self._board: FaultBoard | None = None
        self._watchdog: Watchdog | None = None
        self.failed = False

    def arm(self, host: str | None = None, port: int | None = None, grace_s: float = DEFAULT_GRACE_S) -> None:
        self.disarm()
        self.failed = False
        self._spans += 1
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return
        address = store_address(host, port)
        if address is None:
            return
        # Per span, and per torchelastic restart (the agent's store outlives the workers).
        prefix = f"pctx_faults/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{self.kind}{self._spans}/"
        self._board = FaultBoard(*address, prefix, dist.get_world_size())
        scope = "the fit" if self.kind == "fit" else f"the guarded {self.kind}"
        self._watchdog = Watchdog(*address, prefix, dist.get_rank(), grace_s, scope=scope).start()

    def disarm(self) -> None:
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        self._board = None

    def report(self, exc: BaseException, ctx: Any, records: dict[int, FaultRecord] | None = None) -> str | None:
        """Post this rank's record; for a communication error gather the others'. Returns the note
        (also added to ``exc``), or None when there is nothing to say. Never raises."""
        self.failed = True
        records = {} if records is None else records
        try:
            note = self._note(exc, ctx, records)
        except Exception as err:  # noqa: BLE001 - the report must never replace the error
            note = f"{TAG} (could not gather the other ranks' reports: {err})"
        if note:
            exc.add_note(note)
        return note

    def _note(self, exc: BaseException, ctx: Any, records: dict[int, FaultRecord]) -> str | None:
        if self._board is None or not dist.is_initialized():
            return None
        rank, world = dist.get_rank(), dist.get_world_size()
        me = self._board.post(make_record(rank, exc, group_positions(context_groups(ctx))))
        records[rank] = me
        if me.comm:
            records.update(self._board.read(wait_s=REPORT_WAIT_S))
        return explain(me, world, records, store_reachable=me.order > 0)


@contextlib.contextmanager
def fault_guard(ctx: Any = None, grace_s: float = DEFAULT_GRACE_S) -> Iterator[FaultGuard]:
    """Guard a user's own loop (see the module doc). ``ctx``: the :class:`ParallelContext` whose
    groups the report describes (None: the default group only). ``grace_s``: how long a rank may
    still run after another rank failed before its watchdog ends it (exit code 1)."""
    guard = FaultGuard("loop")
    guard.arm(grace_s=grace_s)
    try:
        yield guard
    except BaseException as exc:
        if isinstance(exc, Exception):  # not KeyboardInterrupt/SystemExit: the user stopped it
            guard.report(exc, ctx)
        raise
    finally:
        guard.disarm()
