"""Column layers that read the same input enter the tensor-parallel region once (nn/_region.py).

q, k, v projections over one input: one backward all-reduce (or, with sequence parallelism, one
all-gather forward and one reduce-scatter backward) instead of three, with the outputs and every
gradient equal (float64, 1e-12) to the same layers fed separate copies of the input, on every
rank. An input modified in place between two layers is entered again.
"""

from __future__ import annotations

import torch

import lightning_parallelctx.nn as N
from lightning_parallelctx import ParallelContext
from lightning_parallelctx.distributed import _comm
from lightning_parallelctx.testing import spawn

F64 = torch.float64


class _Counter:
    """Counts the buffer-level collectives the autograd functions call."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.saved = {name: getattr(_comm, name) for name in ("all_reduce", "all_gather", "reduce_scatter")}

    def __enter__(self) -> "_Counter":
        for name, fn in self.saved.items():
            def counted(*a, _fn=fn, _name=name, **k):
                self.calls[_name] = self.calls.get(_name, 0) + 1
                return _fn(*a, **k)
            setattr(_comm, name, counted)
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self.saved.items():
            setattr(_comm, name, fn)


def _qkv(sequence_parallel: bool, seed: int) -> torch.nn.ModuleList:
    torch.manual_seed(seed)
    return torch.nn.ModuleList(N.ColumnParallelLinear(8, 8, sequence_parallel=sequence_parallel, dtype=F64)
                               for _ in range(3))


def _run(layers, inp: torch.Tensor, shared: bool, g: torch.Tensor, sizes) -> tuple:
    leaf = inp.clone().requires_grad_()
    x = leaf * 1.0  # a non-leaf, as inside a model
    kw = {"sequence_sizes": sizes} if sizes is not None else {}
    with _Counter() as count:
        outs = [layer(x if shared else x.clone(), **kw) for layer in layers]
        sum((o * g).sum() for o in outs).backward()
    return outs, leaf.grad, [p.grad.clone() for p in layers.parameters()], count.calls


def _worker(rank: int, world_size: int) -> list[str]:
    ctx = ParallelContext.from_torch(tensor_parallel_size=world_size)
    failures = []
    try:
        gen = torch.Generator().manual_seed(3)
        for sp in (False, True):
            inp = torch.randn(4 // world_size if sp else 4, 2, 8, generator=gen, dtype=F64)  # (seq, batch, d)
            g = torch.randn(4, 2, 8 // world_size, generator=gen, dtype=F64)
            sizes = 4 if sp else None
            outs = {}
            for shared in (True, False):
                layers = _qkv(sp, seed=11)
                outs[shared] = _run(layers, inp, shared, g, sizes)
            (ys, gx, gp, calls), (ys2, gx2, gp2, calls2) = outs[True], outs[False]
            for a, b, what in [*zip(ys, ys2, ["q", "k", "v"]), (gx, gx2, "input grad"),
                               *zip(gp, gp2, [f"param {i}" for i in range(6)])]:
                if not torch.allclose(a, b, atol=1e-12, rtol=0):
                    failures.append(f"sp={sp}: {what} differs by {(a - b).abs().max():.3g}")
            want = {"all_gather": 1, "reduce_scatter": 1} if sp else {"all_reduce": 1}
            want_separate = {k: 3 for k in want}
            if calls != want or calls2 != want_separate:
                failures.append(f"sp={sp}: collectives shared {calls} (want {want}), separate {calls2} "
                                f"(want {want_separate})")
        # An input changed in place between two layers must be entered again (sequence parallel:
        # the all-gather saves nothing, so autograd allows the change; copy's view forbids it).
        layers = _qkv(True, seed=5)
        x = torch.randn(4 // world_size, 2, 8, dtype=F64).requires_grad_() * 1.0
        with _Counter() as count:
            a = layers[0](x, sequence_sizes=4)
            with torch.no_grad():
                x.mul_(2)
            b = layers[1](x, sequence_sizes=4)
            (a.sum() + b.sum()).backward()
        fresh = layers[1](x.detach().clone(), sequence_sizes=4)
        if count.calls.get("all_gather") != 2 or not torch.allclose(b, fresh, atol=1e-12, rtol=0):
            failures.append(f"in-place change between layers: collectives {count.calls} (want 2 all-gathers), "
                            f"output off by {(b - fresh).abs().max():.3g}")
        # The same leaf input over two steps (the cached entry is reused across a finished backward).
        layers = _qkv(False, seed=6)
        x0 = torch.randn(3, 8, dtype=F64, requires_grad=True)
        grads, counts = [], []
        for _ in range(2):
            with _Counter() as count:
                (layers[0](x0).sum() + layers[1](x0).sum()).backward()
            grads.append(x0.grad.clone())
            counts.append(count.calls)
        if counts != [{"all_reduce": 1}] * 2 or not torch.allclose(grads[1], 2 * grads[0], atol=1e-12, rtol=0):
            failures.append(f"two steps on one leaf: collectives {counts}, grads off by "
                            f"{(grads[1] - 2 * grads[0]).abs().max():.3g}")
        return failures
    finally:
        ctx.destroy()


def test_column_layers_reading_one_input_share_one_collective() -> None:
    for rank, failures in enumerate(spawn(_worker, 2, timeout=120)):
        assert not failures, f"rank {rank}: " + "; ".join(failures)
