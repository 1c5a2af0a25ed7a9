"""Random-number streams per parallel mode (Megatron's RNG tracker, on CPU and CUDA).

Dropout inside a tensor-parallel region acts on different slices of the activations on each
TENSOR rank, so its masks must differ across TENSOR ranks - and agree across DATA ranks, which
hold replicas of the same slices. Outside such regions activations are replicated over TENSOR
and the masks must agree there. So:

- :func:`model_parallel_seed` seeds the default generator with ``seed`` on every rank (outside:
  everyone agrees) and creates one named stream per mode whose seed depends only on the ranks
  that must differ: ``"tensor"`` on the TENSOR rank; ``"sequence"`` on the SEQUENCE and TENSOR
  ranks; ``"expert"`` on the EXPERT and TENSOR ranks.
- ``with model_parallel_rng():`` (or ``model_parallel_rng("expert")``) swaps the default CPU
  generator - and the current CUDA device's, when CUDA is in use - for the stream's state, and
  saves the advanced state back on exit, so the default stream continues as if the region had
  drawn nothing.
- :func:`get_rng_state` / :func:`set_rng_state` capture and restore the default generators and
  every stream, for checkpoints. The state differs per rank: save it per rank (rank-qualified
  keys), never de-duplicated across ranks.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from .distributed._state import ContextLike, resolve
from .errors import ParallelCtxError
from .mode import ParallelMode, mode_name

#: stream name -> the modes whose rank makes the stream differ (and nothing else does).
STREAM_MODES: dict[str, tuple[str, ...]] = {
    "tensor": ("tensor",),
    "sequence": ("sequence", "tensor"),
    "expert": ("expert", "tensor"),
}


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _capture() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if _cuda_in_use():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore(state: Mapping[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and _cuda_in_use():
        torch.cuda.set_rng_state(state["cuda"])


def derive_seed(seed: int, name: str, ranks: tuple[int, ...]) -> int:
    """A 63-bit seed from (seed, stream, ranks): distinct streams never share a seed by accident
    (Megatron's ``seed + 2718 + tp_rank`` style offsets collide for large groups)."""
    digest = hashlib.sha256(f"{seed}/{name}/{','.join(map(str, ranks))}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


class RNGStreams:
    """Named generator states that can be forked into the default generators."""

    def __init__(self) -> None:
        self._states: dict[str, dict[str, torch.Tensor]] = {}
        self._active: set[str] = set()

    @property
    def names(self) -> list[str]:
        return list(self._states)

    def reset(self) -> None:
        self._states.clear()

    def add(self, name: str, seed: int) -> None:
        """Create (or re-seed) stream ``name`` from ``seed``, leaving the default generators as they were."""
        outside = _capture()
        try:
            torch.manual_seed(seed)  # seeds CPU and every CUDA device
            self._states[name] = _capture()
        finally:
            _restore(outside)

    @contextlib.contextmanager
    def fork(self, name: str = "tensor") -> Iterator[None]:
        """Run the block with the default generators set to stream ``name``."""
        if name not in self._states:
            raise ParallelCtxError(
                f"RNG stream {name!r} does not exist (streams: {self.names or 'none'}); call "
                f"lightning_parallelctx.random.model_parallel_seed(seed) first, or add it"
            )
        if name in self._active:
            raise ParallelCtxError(f"RNG stream {name!r} is already forked: nesting it would repeat numbers")
        outside = _capture()
        _restore(self._states[name])
        self._active.add(name)
        try:
            yield
        finally:
            self._active.discard(name)
            self._states[name] = _capture()
            _restore(outside)

    def get_state(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: {k: v.clone() for k, v in st.items()} for name, st in self._states.items()}

    def set_state(self, states: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        self._states = {name: {k: v.clone() for k, v in st.items()} for name, st in states.items()}


_TRACKER = RNGStreams()


def get_rng_tracker() -> RNGStreams:
    """The process-wide streams used by :func:`model_parallel_rng`."""
    return _TRACKER


def model_parallel_seed(seed: int, context: ContextLike | None = None) -> None:
    """Seed the default generators with ``seed`` and (re)create the per-mode streams.

    Call with the same ``seed`` on every rank (e.g. from ``configure_model`` or after
    ``seed_everything``). Modes the context lacks count as rank 0.
    """
    ctx = resolve(context)
    torch.manual_seed(seed)
    _TRACKER.reset()
    for name, modes in STREAM_MODES.items():
        ranks = tuple(_rank(ctx, m) for m in modes)
        _TRACKER.add(name, derive_seed(seed, name, ranks))


def _rank(ctx: Any, mode: str) -> int:
    if ctx.get_world_size(mode) == 1:
        return 0
    return ctx.get_local_rank(mode)


def model_parallel_rng(mode: "ParallelMode | str" = ParallelMode.TENSOR) -> "contextlib.AbstractContextManager[None]":
    """Context manager: draws inside differ across ``mode``'s ranks (and TENSOR's), agree across
    DATA ranks. Default: the tensor-parallel stream, for dropout inside TP regions."""
    return _TRACKER.fork(mode_name(mode))


def get_rng_state() -> dict[str, Any]:
    """Everything needed to resume the random streams: ``{"default": ..., "streams": ...}``."""
    return {"default": {k: v.clone() for k, v in _capture().items()}, "streams": _TRACKER.get_state()}


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned (on the same rank)."""
    _restore(state["default"])
    _TRACKER.set_state(state["streams"])
