"""RNG streams: dropout inside a tensor-parallel region differs across TENSOR ranks and agrees
across DATA ranks; outside it agrees across TENSOR ranks; states round-trip through a checkpoint."""

from __future__ import annotations

import io

import pytest
import torch

import lightning_parallelctx.distributed as D
from lightning_parallelctx import ParallelContext
from lightning_parallelctx.distributed import LocalContext
from lightning_parallelctx.errors import ParallelCtxError
from lightning_parallelctx.random import (
    derive_seed,
    get_rng_state,
    get_rng_tracker,
    model_parallel_rng,
    model_parallel_seed,
    set_rng_state,
)
from lightning_parallelctx.testing import spawn


def _mask(n: int = 4096) -> torch.Tensor:
    return torch.nn.functional.dropout(torch.ones(n), p=0.5, training=True) > 0


def _worker(rank: int, world_size: int, sizes: dict) -> dict:
    ctx = ParallelContext.from_torch(**sizes)
    D.set_current_context(ctx)
    model_parallel_seed(1234)
    drop = torch.nn.Dropout(0.5)
    out = {"tp": ctx.tp_rank, "dp": ctx.dp_rank}
    out["outside1"] = _mask()
    with model_parallel_rng():
        out["inside"] = drop(torch.ones(4096)) > 0
    with model_parallel_rng("expert"):
        out["expert"] = _mask()
    out["outside2"] = _mask()
    # The region did not advance the default stream: same as drawing twice without it.
    torch.manual_seed(1234)
    _mask()
    out["default_continues"] = torch.equal(_mask(), out["outside2"])

    # Checkpoint round trip (through torch.save, as a checkpoint would carry it).
    buf = io.BytesIO()
    torch.save(get_rng_state(), buf)
    first = [_mask()]
    with model_parallel_rng():
        first.append(_mask())
    first.append(_mask())
    buf.seek(0)
    set_rng_state(torch.load(buf, weights_only=True))
    second = [_mask()]
    with model_parallel_rng():
        second.append(_mask())
    second.append(_mask())
    out["restored"] = all(torch.equal(a, b) for a, b in zip(first, second))
    out["inside_advances"] = not torch.equal(first[1], out["inside"])  # the stream moved on
    try:
        with model_parallel_rng(), model_parallel_rng():
            pass
        out["nested_refused"] = False
    except ParallelCtxError:
        out["nested_refused"] = True
    ctx.destroy()
    # Plain lists: tensors would travel through shared memory that dies with this process.
    return {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in out.items()}


@pytest.mark.parametrize("world_size,sizes", [(2, {"tensor_parallel_size": 2}),
                                              (4, {"tensor_parallel_size": 2, "data_parallel_size": 2})],
                         ids=["2ranks-tp2", "4ranks-tp2-dp2"])
def test_streams_per_mode(world_size: int, sizes: dict) -> None:
    res = spawn(_worker, world_size, sizes, timeout=120)
    for r in res:
        assert r["default_continues"] and r["restored"] and r["inside_advances"] and r["nested_refused"]
        assert r["outside1"] == res[0]["outside1"] and r["outside2"] == res[0]["outside2"]
        assert r["inside"] != r["outside1"]
    for a in res:
        for b in res:
            same_tp = a["tp"] == b["tp"]
            # inside: equal exactly when the TENSOR rank is equal (whatever the DATA rank)
            assert (a["inside"] == b["inside"]) == same_tp, (a["tp"], a["dp"], b["tp"], b["dp"])
            # expert stream: EXPERT has one rank here, so it varies with the TENSOR rank only
            assert (a["expert"] == b["expert"]) == same_tp
    if world_size == 4:
        assert {(r["tp"], r["dp"]) for r in res} == {(0, 0), (1, 0), (0, 1), (1, 1)}


class _Ranks(LocalContext):
    def __init__(self, **ranks: int) -> None:
        self.ranks = ranks

    def get_world_size(self, mode=None) -> int:
        return 4 if str(mode) in self.ranks else 1

    def get_local_rank(self, mode=None) -> int:
        return self.ranks.get(str(mode), 0)


def test_stream_seeds_depend_on_exactly_their_modes() -> None:
    def streams(**ranks: int) -> dict:
        model_parallel_seed(7, context=_Ranks(**ranks))
        state = get_rng_tracker().get_state()
        return {name: st["cpu"] for name, st in state.items()}

    base = streams()
    for mode, changed in (("tensor", {"tensor", "sequence", "expert"}), ("sequence", {"sequence"}),
                          ("expert", {"expert"}), ("data", set()), ("pipeline", set())):
        other = streams(**{mode: 1})
        assert {n for n in base if not torch.equal(base[n], other[n])} == changed, mode
    assert derive_seed(7, "tensor", (0,)) != derive_seed(7, "expert", (0, 0)) != derive_seed(8, "tensor", (0,))


def test_unknown_stream_is_a_clear_error() -> None:
    get_rng_tracker().reset()
    with pytest.raises(ParallelCtxError, match="model_parallel_seed"):
        with model_parallel_rng():
            pass
