"""Each rank's random generators in a checkpoint, and which saved ones a rank continues on load.

Saved: every rank's default generator and per-mode streams (``random.get_rng_state``) under
``rng.rank<r>`` in the DCP files, and in ``meta.pt`` the axes each stream varies over, found by
comparing every rank's states at save time (one small all-gather of digests). Loaded: at the same
layout each rank its own; at another layout the streams that have a counterpart, by the rule of
``rng_map.py`` (a stream identical on every rank everywhere, a per-tensor-rank stream where the
tensor size is unchanged); the others are left as the resumed run seeded them.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from .. import random as pctx_random
from ..context import ParallelContext
from ..layout import RankLayout
from ..rng_map import source_rank, varying_axes

DEFAULT = "default"


def entry_key(rank: int) -> str:
    return f"rng.rank{rank}"


def _digest(state: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for device in sorted(state):
        h.update(device.encode())
        h.update(state[device].cpu().numpy().tobytes())
    return h.hexdigest()


def save(ctx: ParallelContext) -> tuple[io.BytesIO, dict[str, Any]]:
    """This rank's generators as bytes for DCP, and the axes each stream varies over (collective
    over every rank)."""
    state = pctx_random.get_rng_state()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    mine = {DEFAULT: _digest(state["default"]), **{f"stream.{n}": _digest(s) for n, s in state["streams"].items()}}
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    names = sorted({name for d in everyone for name in d})
    return buf, {name: list(varying_axes([d.get(name) for d in everyone], ctx.layout)) for name in names}


def plan(info: Mapping[str, Any], ctx: ParallelContext, same_layout: bool) -> dict[str, int]:
    """Stream name -> the saved global rank it continues, for this rank (streams without a
    counterpart left out). Checkpoints saved before the axes were recorded: same layout only."""
    rank = ctx.get_global_rank()
    axes = info.get("rng_axes")
    if same_layout:
        return {"*": rank}  # each rank its own generators, all of them
    if not axes:
        return {}
    saved = RankLayout(dict(info["sizes"]), tuple(info["order"]))
    found = {name: source_rank(a, saved, ctx.layout, rank) for name, a in axes.items()}
    return {name: src for name, src in found.items() if src is not None}


def assemble(chosen: Mapping[str, int], loaded: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """The state to apply: ``{"default"?: ..., "streams": {...}}`` from each stream's source rank."""
    if "*" in chosen:  # the same layout, an older checkpoint: everything of this rank's
        return dict(loaded[chosen["*"]])
    out: dict[str, Any] = {"streams": {}}
    for name, src in chosen.items():
        if name == DEFAULT:
            out["default"] = loaded[src]["default"]
        elif (stream := name.removeprefix("stream.")) in loaded[src]["streams"]:
            out["streams"][stream] = loaded[src]["streams"][stream]
    return out


def apply(state: Mapping[str, Any]) -> None:
    """Set what :func:`assemble` chose; every generator it has no state for keeps its own."""
    live = pctx_random.get_rng_state()
    if DEFAULT in state:
        live["default"] = state["default"]
    live["streams"].update(state.get("streams", {}))
    pctx_random.set_rng_state(live)
