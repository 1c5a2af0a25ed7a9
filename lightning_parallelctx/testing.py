"""Run a function on N local processes as if a launcher had started them. For tests and examples.

Each process gets a launcher's environment (torchrun's by default), one CPU thread, and a hard
deadline: a hang becomes a ``TimeoutError`` naming the ranks that did not finish, and an exception
on any rank is re-raised here with every failing rank's traceback.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from .rendezvous import find_free_port

EnvFn = Callable[[int, int, int], Mapping[str, str]]


def torchrun_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    return {
        "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size), "GROUP_RANK": "0",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
    }


def slurm_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    return {
        "SLURM_PROCID": str(rank), "SLURM_NTASKS": str(world_size), "SLURM_LOCALID": str(rank),
        "SLURM_NTASKS_PER_NODE": str(world_size), "SLURM_NODEID": "0", "SLURM_NNODES": "1",
        "SLURM_NODELIST": "localhost", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "test",
        "MASTER_PORT": str(port),
    }


def openmpi_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    return {
        "OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": str(world_size),
        "OMPI_COMM_WORLD_LOCAL_RANK": str(rank), "OMPI_COMM_WORLD_LOCAL_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
    }


_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                  "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE")


def _child(fn: Callable, rank: int, world_size: int, env: Mapping[str, str], args: tuple, out: Any) -> None:
    for key in list(os.environ):
        if key in _LAUNCHER_VARS or key.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_", "MV2_")):
            del os.environ[key]
    os.environ.update(env)
    import torch

    torch.set_num_threads(1)
    try:
        out.put(("ok", rank, _to_bytes(fn(rank, world_size, *args))))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        out.put(("error", rank, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            # The rank's result is already reported; a teardown failure must not replace it, but
            # it must not vanish either.
            try:
                dist.destroy_process_group()
            except Exception as err:  # noqa: BLE001
                print(f"rank {rank}: destroy_process_group failed during teardown: {err}", file=sys.stderr)


def _to_bytes(obj: Any) -> bytes:
    # A tensor put on a multiprocessing queue travels as a shared-memory handle that dies with the
    # child (the parent then reads "connection reset"); torch.save'd bytes do not.
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(data: bytes) -> Any:
    import io

    import torch

    return torch.load(io.BytesIO(data), weights_only=False)


_CTX = None


def _context() -> Any:
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "torch.distributed", "lightning_parallelctx"])
    return _CTX


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0,
          env: EnvFn = torchrun_env, extra_env: Mapping[str, str] | None = None,
          ranks_to_start: "list[int] | None" = None) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return results by rank
    (anything ``torch.save`` can write, tensors included).

    ``ranks_to_start`` starts only some ranks (to test a rank that never arrives).
    """
    ctx = _context()
    out = ctx.Queue()
    port = find_free_port()
    procs = {}
    for rank in ranks_to_start if ranks_to_start is not None else range(world_size):
        child_env = {**env(rank, world_size, port), **(extra_env or {})}
        p = ctx.Process(target=_child, args=(fn, rank, world_size, child_env, args, out), daemon=True)
        p.start()
        procs[rank] = p
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < len(procs):
        try:
            status, rank, value = out.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
        except queue.Empty:
            dead = [r for r, p in procs.items() if not p.is_alive() and r not in results and r not in errors]
            for r in dead:  # died without reporting (killed, segfault): give its queue item a moment
                procs[r].join(0.5)
                if out.empty():
                    errors[r] = f"rank {r} exited with code {procs[r].exitcode} without reporting"
            if time.monotonic() > deadline:
                break
            continue
        (results if status == "ok" else errors)[rank] = value
    missing = [r for r in procs if r not in results and r not in errors]
    for p in procs.values():
        if p.is_alive():
            p.kill()
        p.join(5)
    if errors:
        detail = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise RankFailure(errors, f"{len(errors)} rank(s) failed{f', {missing} hung' if missing else ''}:\n{detail}")
    if missing:
        raise TimeoutError(f"ranks {missing} did not finish within {timeout:.0f} s (a hang); killed them")
    return [_from_bytes(results[r]) for r in sorted(results)]


class RankFailure(RuntimeError):
    """Raised by :func:`spawn` when ranks fail; ``errors`` maps rank -> traceback text."""

    def __init__(self, errors: dict[int, str], message: str):
        super().__init__(message)
        self.errors = errors
