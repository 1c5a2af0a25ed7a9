"""When one rank fails, every rank's last lines say which rank failed first and why.

In a distributed job the first error is buried under the others' secondary ones: the ranks that
were waiting in a collective for the failed rank raise "Connection closed by peer" or a timeout,
and whichever rank prints last decides what the user reads. torchelastic answers with error files,
NCCL with its desync report; this is the same idea over the rendezvous store, which every launcher
already gives us:

- the rank that fails posts one record (rank, pid, host, its exception, and how many collectives it
  issued on each of its process groups) under a per-fit key prefix, and sets the ``abort`` key that
  the :mod:`.watchdog` of every rank waits on;
- a rank whose error is a communication error (its peer went away, or the collective timed out)
  also reads the others' records, briefly waiting for the ranks of its world to report, and adds a
  note to its own exception naming the rank that failed first, or, when nobody raised, the ranks
  that never reported (hung or dead) and where in which group they stopped.

Nothing here runs on the happy path: it costs one store round trip per rank, on failure only.
Every store operation is bounded by a short timeout and never raises: a report must never become
a new error that hides the first one.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import torch.distributed as dist

#: Every line we add to someone else's output starts with this, so it can be grepped in a log of hundreds of ranks.
TAG = "[lightning_parallelctx]"
#: How long a rank with a communication error waits for the other ranks' reports.
REPORT_WAIT_S = 3.0
#: Bound on each store operation of the report (the store may be gone with its rank).
STORE_OP_TIMEOUT_S = 3.0
#: The rank of a fit's first failure: the first post sets it, later ones leave it (compare_set).
ABORT_KEY = "abort"


def wake_key(rank: int) -> str:
    """The key rank ``rank``'s watchdog waits on: set by a failing rank (to every rank) or by the rank
    itself when its fit ends (so that its thread ends too, and none accumulate over many fits)."""
    return f"wake{rank}"

# gloo/NCCL/store errors that mean "a peer went away or did not come": never a root cause by themselves.
_COMM_MARKERS = ("connection closed by peer", "connection reset", "timed out", "timeout", "broken pipe",
                 "connection refused", "gloo", "nccl", "socket", "peer", "aborted")


def describe(exc: BaseException, limit: int = 400) -> str:
    """``Type: first line of the message`` (shortened): what a user needs to recognise the error."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > limit:
        first = first[:limit] + " ..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def is_comm_error(exc: BaseException) -> bool:
    """True for the errors a rank gets because ANOTHER rank failed or stalled."""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    if type(exc) is RuntimeError or isinstance(exc, (ConnectionError, TimeoutError)):
        message = str(exc).lower()
        return any(marker in message for marker in _COMM_MARKERS)
    return False


@dataclass
class FaultRecord:
    """One rank's account of its failure."""

    rank: int
    pid: int
    host: str
    error: str
    comm: bool  # a communication error: probably a consequence of another rank's failure
    order: int = 0  # 1 for the first rank to report, 2 for the next, ...
    time: float = 0.0  # when it failed (seconds since the epoch)
    #: "mode(s) ranks" -> number of collectives this rank had issued on that group when it failed
    positions: dict[str, int] = field(default_factory=dict)


def group_positions(groups: Iterable[tuple[str, tuple[int, ...], Any]]) -> dict[str, int]:
    """How many collectives this rank has issued on each group (torch's per-group sequence number).

    ``groups`` yields ``(label, ranks, process_group)``. Ranks of one group that stopped at
    different numbers are out of step: the ones behind never joined the others' collective.
    """
    out: dict[str, int] = {}
    for label, ranks, group in groups:
        try:
            seq = int(group._get_sequence_number_for_group())
        except Exception:  # noqa: BLE001 - a backend without sequence numbers: no position, still a report
            continue
        out[f"{label} {list(ranks)}"] = seq
    return out


def context_groups(ctx: Any) -> list[tuple[str, tuple[int, ...], Any]]:
    """``(modes, ranks, group)`` for each distinct multi-rank group of ``ctx`` this rank is in, plus WORLD."""
    by_ranks: dict[tuple[int, ...], list[str]] = {}
    if ctx is not None and not ctx.is_destroyed:
        for mode in ctx.modes:
            if ctx.is_member(mode) and ctx.get_world_size(mode) > 1:
                by_ranks.setdefault(tuple(ctx.get_ranks_in_group(mode)), []).append(mode)
    world = tuple(range(dist.get_world_size())) if dist.is_initialized() else ()
    out = []
    if len(world) > 1:
        out.append(("/".join(["world", *by_ranks.get(world, [])]), world, dist.group.WORLD))
    for ranks, modes in by_ranks.items():
        if ranks != world:
            out.append(("/".join(modes), ranks, ctx.get_group(modes[0])))
    return out


class FaultBoard:
    """The per-fit records in the rendezvous store, read and written with short, bounded operations.

    It opens its own store client, with its own short timeout, so that nothing here waits on (or
    changes the timeout of) the store the process groups use.
    """

    def __init__(self, host: str, port: int, prefix: str, world_size: int):
        self.host, self.port, self.prefix, self.world_size = host, port, prefix, world_size
        self._store: Any = None

    def _client(self) -> Any:
        if self._store is None:
            client = dist.TCPStore(self.host, self.port, is_master=False, wait_for_workers=False,
                                   timeout=timedelta(seconds=STORE_OP_TIMEOUT_S))
            self._store = dist.PrefixStore(self.prefix, client)
        return self._store

    def post(self, record: FaultRecord) -> FaultRecord:
        """Publish this rank's record and raise the abort flag; returns it with its order filled."""
        try:
            store = self._client()
            record.order = int(store.add("count", 1))
            store.set(f"rank{record.rank}", json.dumps(asdict(record)))
            # The first failure keeps the abort flag: a watchdog that wakes after a later post (which
            # overwrites its wake key) still names the first cause, not a consequence.
            store.compare_set(ABORT_KEY, "", str(record.rank))
            # Wake every rank's watchdog (one round trip, whatever the world size).
            store.multi_set([wake_key(r) for r in range(self.world_size)], [f"abort:{record.rank}"] * self.world_size)
        except Exception:  # noqa: BLE001 - the store went with its rank: nothing to tell anyone
            pass
        return record

    def read(self, wait_s: float = 0.0, until: "Iterable[int] | None" = None,
             stop_at_root: bool = True) -> dict[int, FaultRecord]:
        """The records posted so far, waiting up to ``wait_s`` for the ranks in ``until`` to report
        (or, with ``stop_at_root``, for one record that is not a communication error)."""
        wanted = set(range(self.world_size) if until is None else until)
        deadline = time.monotonic() + wait_s
        records: dict[int, FaultRecord] = {}
        try:
            store = self._client()
            while True:
                for rank in sorted(wanted - set(records)):
                    key = f"rank{rank}"
                    if store.check([key]):
                        records[rank] = FaultRecord(**json.loads(store.get(key)))
                done = wanted <= set(records) or (stop_at_root and any(not r.comm for r in records.values()))
                if done or time.monotonic() >= deadline:
                    return records
                time.sleep(0.1)
        except Exception:  # noqa: BLE001 - what we have is still worth reporting
            return records


def make_record(rank: int, exc: BaseException, positions: Mapping[str, int]) -> FaultRecord:
    return FaultRecord(rank=rank, pid=os.getpid(), host=socket.gethostname(), error=describe(exc),
                       comm=is_comm_error(exc), time=time.time(), positions=dict(positions))


def first_failure(records: Mapping[int, FaultRecord]) -> FaultRecord | None:
    """The record of the rank that failed first with an error of its own, if any."""
    roots = sorted((r for r in records.values() if not r.comm), key=lambda r: r.order)
    return roots[0] if roots else None


def explain(me: FaultRecord, world_size: int, records: Mapping[int, FaultRecord], store_reachable: bool = True) -> str:
    """The note a failing rank adds to its exception: who failed first, and who never answered."""
    head = f"{TAG} rank {me.rank} of {world_size} (pid {me.pid} on {me.host})"
    first = first_failure(records)
    if not me.comm:
        return f"{head} failed with this error; the other ranks stop because of it."
    if first is not None:
        return (f"{head} stopped because rank {first.rank} (pid {first.pid} on {first.host}) failed first with "
                f"{first.error}. Look there for the cause; this rank's error is a consequence.")
    if not store_reachable:
        return (f"{head} stopped because a peer stopped answering, and rank 0's rendezvous store is gone too: "
                f"rank 0 failed, was killed or exited. Look at rank 0's output for the cause.")
    silent = [r for r in range(world_size) if r not in records]
    lines = [f"{head} stopped because a collective could not complete: no rank raised an error of its own."]
    if silent:
        lines.append(f"{TAG} ranks that never reported (hung, killed, or exited without a Python error): {silent}")
    lines.extend(_desync(records, silent))
    return "\n".join(lines)


def _desync(records: Mapping[int, FaultRecord], silent: list[int]) -> list[str]:
    """Per group: which ranks were waiting at which collective, and which of its ranks never joined."""
    lines = []
    groups: dict[str, dict[int, int]] = {}
    for rec in records.values():
        for label, seq in rec.positions.items():
            groups.setdefault(label, {})[rec.rank] = seq
    for label, seqs in sorted(groups.items()):
        ranks = json.loads(label[label.index("["):])
        ahead = max(seqs.values())
        waiting = sorted(r for r, s in seqs.items() if s == ahead)
        behind = {r: s for r, s in seqs.items() if s < ahead}
        missing = sorted(set(silent) & set(ranks))
        if not behind and not missing:
            continue
        never = sorted(missing + list(behind))
        detail = ", ".join(f"rank {r} at #{s}" for r, s in sorted(behind.items()))
        lines.append(f"{TAG} group {label}: ranks {waiting} waited in collective #{ahead}; "
                     f"never joined: {never}{f' ({detail})' if detail else ''}")
    return lines
