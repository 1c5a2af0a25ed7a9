"""Meeting the other processes: the rendezvous store and the default (WORLD) process group.

Where the store listens: torch's TCPStore listens on every interface of rank 0's host, so a
training job on a shared or public machine exposes an unauthenticated key-value store to the whole
network. Ours listens on the address the rendezvous host names (127.0.0.1 for a local run) and
nowhere else: we bind the socket ourselves and hand it to TCPStore (``master_listen_fd``).
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import socket
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import ParallelConfigError, RendezvousError
from .launchers import LaunchInfo


def as_timedelta(timeout: "float | int | timedelta", name: str = "timeout") -> timedelta:
    if isinstance(timeout, timedelta):
        return timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ParallelConfigError(f"{name}={timeout!r} must be a positive number of seconds or a timedelta")
    return timedelta(seconds=float(timeout))


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def port_is_free(port: int, host: str = "") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As TCPStore does: a recently closed store's TIME_WAIT connections must not count as "in use".
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


#: Stores this process already opened, reused by later builds (each under its own key prefix):
#: a second TCPStore server on the same port would fail, and torchrun's agent store is one anyway.
_STORES: dict[tuple, dist.Store] = {}


def listen_address(host: str, single_node: bool) -> str:
    """The one address rank 0's store listens on: the address ``host`` resolves to here.

    A hostname that resolves to loopback on rank 0's own machine (Debian maps it to 127.0.1.1 in
    /etc/hosts) while other nodes reach it by its network address would leave them unable to
    connect; only then, for a job on several nodes, it listens on every interface, as torch does.
    """
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise RendezvousError(
            f"rendezvous host {host!r} does not resolve on rank 0's machine ({err}). Fix: set MASTER_ADDR (or host=) "
            f"to rank 0's hostname or IP address as every rank can reach it"
        ) from None
    address = str(infos[0][4][0])
    if ipaddress.ip_address(address).is_loopback and not single_node:
        return "0.0.0.0"
    return address


def _listening_socket(info: LaunchInfo) -> socket.socket:
    assert info.host and info.port
    single = info.local_world_size is not None and info.local_world_size == info.world_size
    address = listen_address(info.host, single)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, info.port))
        sock.listen(max(128, info.world_size))
    except OSError as err:
        sock.close()
        raise RendezvousError(
            f"rank 0: the rendezvous store cannot listen on {address}:{info.port} (host {info.host!r}): {err}. "
            f"Fix: MASTER_ADDR (or host=) must name this machine, rank 0's; MASTER_PORT (or port=) a free port"
        ) from None
    return sock


_WORLDS = itertools.count(1)


def rendezvous_store(info: LaunchInfo, timeout: timedelta, join_timeout: timedelta | None = None) -> dist.Store:
    """A store for a new default group of ``info``'s world: rank 0 hosts it (see
    :func:`listen_address`), the others connect (within ``join_timeout``, default ``timeout``);
    torchrun's agent store when torchrun runs one. The store's own operations keep ``timeout``.
    Each call gets a fresh key space: a reused store must not meet old keys."""
    return dist.PrefixStore(f"pctx_world{next(_WORLDS)}/", _make_store(info, timeout, join_timeout))


def _make_store(info: LaunchInfo, timeout: timedelta, join_timeout: timedelta | None = None) -> dist.Store:
    if info.world_size == 1:
        return dist.HashStore()
    key = (info.host, info.port, info.rank, info.world_size, info.agent_store)
    if key not in _STORES:
        _STORES[key] = _open_store(info, timeout, join_timeout or timeout)
    return _STORES[key]


# Named in every rendezvous error: the knob that lets slow starts through.
_RAISE = "Raise the limit with rendezvous_timeout=..."


def _open_store(info: LaunchInfo, timeout: timedelta, join: timedelta) -> dist.Store:
    if not info.host or not info.port:
        missing = " and ".join(n for n, v in (("host", info.host), ("port", info.port)) if not v)
        raise RendezvousError(
            f"rank {info.rank}: no rendezvous {missing} for {info.world_size} {info.launcher} processes. "
            f"{info.launcher} does not say where rank 0 listens; pass host=/port= "
            f"(e.g. ParallelContext.from_openmpi(host='node01', port=29500)) or export MASTER_ADDR "
            f"and MASTER_PORT on every rank (mpirun -x MASTER_ADDR -x MASTER_PORT)."
        )
    is_master = info.rank == 0 and not info.agent_store
    if is_master and not port_is_free(info.port):
        raise RendezvousError(
            f"rank 0: port {info.port} is already in use on this host, so the rendezvous store cannot "
            f"listen there. Fix: pick a free port (port=... or MASTER_PORT=...), or stop the process "
            f"holding it (`ss -ltnp | grep {info.port}`)."
        )
    # The store owns (and closes) the descriptor from here on, also when it fails.
    listen_fd = _listening_socket(info).detach() if is_master else None
    seconds = int(join.total_seconds())
    store: dist.Store | None = None
    try:
        if is_master:
            # Not torch's wait_for_workers: it counts clients, and on a timeout says "1/2 clients
            # joined" but not which ranks are missing. Each rank posts its own key instead.
            store = dist.TCPStore(info.host, info.port, info.world_size, True, timeout=timeout,
                                  wait_for_workers=False, master_listen_fd=listen_fd)
        else:
            store = _bounded_client(info, join)
            # Joining may take long (a slow start); the store's later waits (group creation) keep
            # the collectives' timeout, so a hang there is reported when the user asked for.
            store.set_timeout(timeout)
        store.set(_arrived_key(info.rank), "1")
        # Every rank waits for all, within the join limit: a rank that went on alone would wait for
        # the late one in the group's creation, bounded by the collectives' timeout instead.
        missing = _wait_for_ranks(store, info.rank, info.world_size, join.total_seconds())
        if not missing:
            return store
    except (RuntimeError, OSError) as err:
        if store is not None and not is_master:
            # Connected, then the store went away: rank 0 ended (often: it gave up on a missing rank).
            raise RendezvousError(
                f"rank {info.rank}: lost the rendezvous store of rank 0 at {info.host}:{info.port} while waiting "
                f"for the other ranks ({err}). Rank 0 failed or gave up first: its own output says why (often, "
                f"a rank that never connected)."
            ) from err
        if is_master:
            raise RendezvousError(
                f"rank 0: not all {info.world_size} processes reached the rendezvous at "
                f"{info.host}:{info.port} within {seconds} s ({err}). Some ranks never started or "
                f"crashed before connecting, or they were told another host/port. {_RAISE} "
                f"if they are just slow."
            ) from err
        raise RendezvousError(
            f"rank {info.rank}: could not reach the rendezvous store of rank 0 at "
            f"{info.host}:{info.port} within {seconds} s ({err}). Rank 0 may have failed (see its "
            f"log: a port in use?), or host/port differ between ranks. {_RAISE} "
            f"if rank 0 is just slow to start."
        ) from err
    raise RendezvousError(
        f"rank {info.rank}: not all {info.world_size} processes reached the rendezvous at {info.host}:{info.port} within "
        f"{seconds} s: rank(s) {missing} never connected. They never started, crashed or hang before creating "
        f"their Trainer/context (their own output says why), or they were told another host/port. {_RAISE} "
        f"if they are just slow."
        # srun leaves the other tasks running when one fails, and none of our code runs in a rank
        # stuck before its rendezvous: only srun can end it.
        + (" Under srun, --kill-on-bad-exit=1 ends those ranks when this one fails; without it they keep running."
           if info.launcher == "slurm" or "SLURM_STEP_ID" in os.environ else "")
    )


def _arrived_key(rank: int) -> str:
    # torchrun's agent store outlives a restart of its workers: keys of an earlier attempt must not count.
    return f"pctx_arrived/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{rank}"


def _wait_for_ranks(store: dist.Store, rank: int, world_size: int, timeout_s: float) -> list[int]:
    """Wait (one blocking ``wait``) until every other rank has posted its arrival key; on a
    timeout, the ranks still missing (empty when all came)."""
    others = [r for r in range(world_size) if r != rank]
    keys = [_arrived_key(r) for r in others]
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
        return []
    except RuntimeError as err:  # torch's DistStoreError (a RuntimeError) on timeout
        if "timeout" not in str(err).lower() and "timed out" not in str(err).lower():
            raise
    return [r for r, key in zip(others, keys) if not store.check([key])]


def _bounded_client(info: LaunchInfo, timeout: timedelta) -> dist.Store:
    """A TCPStore client that gives up after ``timeout``.

    torch's client waits forever for the store's handshake when the port is held by a program
    that accepts connections but is not a store (another job's server on rank 0's port). The
    constructor releases the GIL, so a daemon thread bounds it; a thread still blocked is left to
    die with the process, which is about to fail anyway.
    """
    box: dict[str, object] = {}

    def connect() -> None:
        try:
            box["store"] = dist.TCPStore(info.host, info.port, info.world_size, False, timeout=timeout,
                                         wait_for_workers=True)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = err

    thread = threading.Thread(target=connect, name="pctx-store-connect", daemon=True)
    thread.start()
    thread.join(timeout.total_seconds() + 5.0)
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    if "store" not in box:
        raise RendezvousError(
            f"rank {info.rank}: connected to {info.host}:{info.port}, but no rendezvous store answered "
            f"within {int(timeout.total_seconds())} s: could not reach the rendezvous store of rank 0. "
            f"Another program probably holds that port on rank 0's host (rank 0's log says so). "
            f"Fix: pick a free port (port=... or MASTER_PORT=...)."
        )
    return box["store"]  # type: ignore[return-value]


def init_world(info: LaunchInfo, backend: str | None, timeout: timedelta, namespace: str,
               join_timeout: timedelta | None = None) -> None:
    """Create the default process group; ``namespace`` keeps each build's store keys apart."""
    store = _make_store(info, timeout, join_timeout)
    try:
        dist.init_process_group(
            backend or default_backend(),
            store=dist.PrefixStore(namespace, store),
            rank=info.rank,
            world_size=info.world_size,
            timeout=timeout,
        )
    except (RuntimeError, ValueError) as err:
        raise RendezvousError(
            f"rank {info.rank}: creating the {backend or default_backend()} process group of "
            f"{info.world_size} processes failed: {err}"
        ) from err
