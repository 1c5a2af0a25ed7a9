"""The autograd collectives against single-process reference computations, on 2 and 4 ranks.

Every rank builds all ranks' inputs from one seed, computes what the whole group would compute in
one process (the reference), then runs the collective on its own input and compares forward
output and input gradient (float64, within 1e-6). Many cases run inside one spawned job: process
start-up dominates the cost of each check.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

import lightning_parallelctx.distributed as D
from lightning_parallelctx import ParallelContext
from lightning_parallelctx.distributed import LocalContext
from lightning_parallelctx.errors import ParallelCtxError
from lightning_parallelctx.testing import spawn

TOL = 1e-6


def _pieces(shape: tuple[int, ...], dim: int, sizes: list[int], gen: torch.Generator) -> list[torch.Tensor]:
    out = []
    for s in sizes:
        sh = list(shape)
        sh[dim] = s
        out.append(torch.randn(sh, generator=gen, dtype=torch.float64))
    return out


def _check(ctx: ParallelContext, mode: str, name: str, fn, ref_fn, inputs: list[torch.Tensor],
           replicated_in: bool, replicated_out: bool, seed: int, failures: list[str]) -> int:
    """Run fn on this rank's input; compare output and input grad with the one-process reference.

    replicated_in: every rank holds the same input (copy, scatter); the reference uses one leaf.
    replicated_out: every rank computes the same output (reduce, gather); the reference counts the
    downstream loss once, and every rank uses the same upstream gradient.
    """
    n, r = ctx.get_world_size(mode), ctx.get_local_rank(mode)
    leaves = [inputs[0].clone().requires_grad_()] if replicated_in else [t.clone().requires_grad_() for t in inputs]
    xs = leaves * n if replicated_in else leaves
    ys = ref_fn(xs)
    gen = torch.Generator().manual_seed(seed + 7)
    grads = [torch.randn(y.shape, generator=gen, dtype=y.dtype) for y in ys]
    if replicated_out:
        grads = [grads[0]] * n
        loss = (ys[0] * grads[0]).sum()
    else:
        loss = sum((y * g).sum() for y, g in zip(ys, grads))
    loss.backward()
    ref_out = ys[r].detach()
    ref_grad = leaves[0 if replicated_in else r].grad

    x = inputs[0 if replicated_in else r].clone().requires_grad_()
    before, version = x.detach().clone(), x._version
    upstream = grads[r].clone()
    y = fn(x)
    y.backward(upstream)
    label = f"{name} [{mode}, n={n}, rank {r}]"
    if y.shape != ref_out.shape:
        failures.append(f"{label}: shape {tuple(y.shape)} != {tuple(ref_out.shape)}")
        return 1
    if not torch.allclose(y.detach(), ref_out, atol=TOL, rtol=0):
        failures.append(f"{label}: forward differs by {(y.detach() - ref_out).abs().max():.3g}")
    if x.grad is None or not torch.allclose(x.grad, ref_grad, atol=TOL, rtol=0):
        diff = "None" if x.grad is None else f"{(x.grad - ref_grad).abs().max():.3g}"
        failures.append(f"{label}: input gradient differs ({diff})")
    if x._version != version or not torch.equal(x.detach(), before):
        failures.append(f"{label}: input modified in place")
    if not torch.equal(upstream, grads[r]):
        failures.append(f"{label}: upstream gradient modified in place")
    # The no-grad fast path (no autograd node) must give the very same forward, bit for bit.
    plain = inputs[0 if replicated_in else r].clone()
    with torch.no_grad():
        y_plain = fn(plain)
    if y_plain.requires_grad or not torch.equal(y_plain, y.detach()):
        failures.append(f"{label}: the no-grad forward differs from the autograd forward")
    if not torch.equal(plain, inputs[0 if replicated_in else r]):
        failures.append(f"{label}: the no-grad forward modified its input")
    return 1


def _all_cases(ctx: ParallelContext, mode: str, failures: list[str]) -> int:
    n = ctx.get_world_size(mode)
    r = ctx.get_local_rank(mode)
    checks = 0
    seed = itertools.count(1000)
    shape3 = (5, 6, 7)
    for dim in (0, 1, 2, -1, -2):
        nd = dim % 3
        for total in (4 * n, 4 * n + 1, 2 * n - 1, 1):  # even, uneven, uneven with short/empty pieces
            s = next(seed)
            gen = torch.Generator().manual_seed(s)
            full_shape = list(shape3)
            full_shape[nd] = total
            sizes = D.split_sizes(total, n)
            assert sizes == [p.shape[0] for p in torch.arange(total).tensor_split(n)]
            full = torch.randn(full_shape, generator=gen, dtype=torch.float64)
            pieces = _pieces(tuple(full_shape), nd, sizes, gen)
            distinct_full = [torch.randn(full_shape, generator=gen, dtype=torch.float64) for _ in range(n)]
            tag = f"dim={dim} total={total}"
            checks += _check(ctx, mode, f"scatter {tag}", lambda x: D.scatter(x, dim, mode),
                             lambda xs: [xs[0].tensor_split(n, nd)[j] for j in range(n)],
                             [full], True, False, s, failures)
            for how, arg in (("exchange", None), ("full-size", total), ("list", sizes)):
                checks += _check(ctx, mode, f"gather[{how}] {tag}", lambda x: D.gather(x, dim, mode, sizes=arg),
                                 lambda xs: [torch.cat(xs, nd)] * n, pieces, False, True, s, failures)
            checks += _check(ctx, mode, f"all_gather {tag}", lambda x: D.all_gather(x, dim, mode, sizes=total),
                             lambda xs: [torch.cat(xs, nd)] * n, pieces, False, False, s, failures)
            checks += _check(ctx, mode, f"all_gather[exchange] {tag}", lambda x: D.all_gather(x, dim, mode),
                             lambda xs: [torch.cat(xs, nd)] * n, pieces, False, False, s, failures)
            checks += _check(ctx, mode, f"reduce_scatter {tag}", lambda x: D.reduce_scatter(x, dim, mode),
                             lambda xs: list(sum(xs).tensor_split(n, nd)), distinct_full, False, False, s, failures)
    # docs/traps.md #12: funcol's all_gather_single mishandles a local dim 0 of size 1 with gather_dim != 0.
    for dim in (1, -1):
        s = next(seed)
        gen = torch.Generator().manual_seed(s)
        full_shape = [1, 3 * n, 2]
        nd = dim % 3
        sizes = D.split_sizes(full_shape[nd], n)
        pieces = _pieces(tuple(full_shape), nd, sizes, gen)
        tag = f"local dim 0 of size 1, dim={dim}"
        checks += _check(ctx, mode, f"gather {tag}", lambda x: D.gather(x, dim, mode, sizes=sizes),
                         lambda xs: [torch.cat(xs, nd)] * n, pieces, False, True, s, failures)
        checks += _check(ctx, mode, f"all_gather {tag}", lambda x: D.all_gather(x, dim, mode, sizes=sizes),
                         lambda xs: [torch.cat(xs, nd)] * n, pieces, False, False, s, failures)
    s = next(seed)
    gen = torch.Generator().manual_seed(s)
    distinct = [torch.randn(3, 4, 5, generator=gen, dtype=torch.float64) for _ in range(n)]
    checks += _check(ctx, mode, "copy", lambda x: D.copy(x, mode), lambda xs: list(xs),
                     [distinct[0]], True, False, s, failures)
    checks += _check(ctx, mode, "reduce", lambda x: D.reduce(x, mode), lambda xs: [sum(xs)] * n,
                     distinct, False, True, s, failures)
    # all_to_all: even, uneven scatter dim, uneven gather dim (every rank's own size differs).
    for sd, gd, sc_total, g_sizes in ((0, 1, 2 * n, [3] * n), (2, 1, 2 * n, [3] * n), (1, 2, 2 * n, [3] * n),
                                      (-1, 0, 2 * n + 1, [3] * n), (2, 0, 2 * n, [2 + j % 2 for j in range(n)]),
                                      (0, -1, n + 1, [1 + j for j in range(n)])):
        s = next(seed)
        gen = torch.Generator().manual_seed(s)
        nsd, ngd = sd % 3, gd % 3
        xs_in = []
        for j in range(n):
            sh = [4, 4, 4]
            sh[nsd], sh[ngd] = sc_total, g_sizes[j]
            xs_in.append(torch.randn(sh, generator=gen, dtype=torch.float64))

        def ref(xs, nsd=nsd, ngd=ngd):
            return [torch.cat([x.tensor_split(n, nsd)[dst] for x in xs], ngd) for dst in range(n)]

        for how, arg in (("exchange", None), ("list", g_sizes)):
            checks += _check(ctx, mode, f"all_to_all[{how}] sd={sd} gd={gd} sc={sc_total} g={g_sizes}",
                             lambda x, sd=sd, gd=gd, arg=arg: D.all_to_all(x, sd, gd, mode, gather_sizes=arg),
                             ref, xs_in, False, False, s, failures)
    # float32 path (the buffers keep the dtype) and a non-contiguous input.
    x = torch.arange(24, dtype=torch.float32).view(4, 6).t() + r  # non-contiguous
    got = D.gather(x, 0, mode, sizes=6 * n)
    want = torch.cat([torch.arange(24, dtype=torch.float32).view(4, 6).t() + j for j in range(n)], 0)
    if not torch.equal(got, want):
        failures.append(f"gather float32 non-contiguous [{mode}]: wrong values")
    checks += 1
    return checks


def _worker(rank: int, world_size: int, sizes: dict) -> dict:
    warnings.simplefilter("error")  # docs/traps.md #13: the collectives must not warn on torch 2.13
    ctx = ParallelContext.from_torch(**sizes)
    D.set_current_context(ctx)
    failures: list[str] = []
    checks = 0
    modes = ["tensor", "data", "global"]
    for mode in modes:
        checks += _all_cases(ctx, mode, failures)
    # Queries answer for the context.
    for mode in modes:
        if D.get_rank(mode) != ctx.get_local_rank(mode) or D.get_world_size(mode) != ctx.get_world_size(mode):
            failures.append(f"query mismatch for {mode}")
    if not D.is_initialized() or D.current_context() is not ctx:
        failures.append("current context not found")
    if world_size == 2 and sizes.get("tensor_parallel_size") == 2:
        # torchshard's documented examples.
        if D.scatter(torch.empty(6, 8), dim=0).shape != (3, 8):
            failures.append("torchshard scatter example")
        if D.gather(torch.empty(6, 8), dim=1).shape != (6, 16):
            failures.append("torchshard gather example")
        red = D.reduce(torch.tensor([1.0, 2.0]) if rank == 0 else torch.tensor([3.0, 4.0]))
        if red.tolist() != [4.0, 6.0]:
            failures.append(f"torchshard reduce example gave {red.tolist()}")
        # DATA has one rank here: no communication, the input itself comes back.
        t = torch.randn(3, 4, requires_grad=True)
        if D.copy(t, "data") is not t or D.reduce(t, "data") is not t or D.gather(t, 0, "data") is not t:
            failures.append("size-1 group did not short-circuit")
        if D.get_group("tensor") is not ctx.get_group("tensor"):
            failures.append("get_group")
        checks += 5
    # Errors name the sizes.
    errors = []
    for call in (lambda: D.gather(torch.zeros(3, 2), 0, "tensor", sizes=[1]),
                 lambda: D.all_to_all(torch.zeros(4, 4), 1, -1, "tensor"),
                 lambda: D.gather(torch.zeros(3, 2), 0, "tensor", sizes=[5] * ctx.get_world_size("tensor"))):
        try:
            call()
            errors.append("no error")
        except ParallelCtxError as e:
            errors.append(str(e))
    if "group size" not in errors[0] or "scatter_dim != gather_dim" not in errors[1] or "size 3" not in errors[2]:
        failures.append(f"error messages: {errors}")
    # An explicit context= wins over the current one; a destroyed one is refused.
    if D.get_world_size("tensor", context=LocalContext()) != 1:
        failures.append("context= ignored")
    ctx.destroy()
    try:
        D.get_world_size("tensor", context=ctx)
        failures.append("destroyed context accepted")
    except ParallelCtxError:
        pass
    return {"failures": failures, "checks": checks}


@pytest.mark.parametrize("world_size,sizes", [(2, {"tensor_parallel_size": 2}),
                                              (4, {"tensor_parallel_size": 2, "data_parallel_size": 2})],
                         ids=["2ranks-tp2", "4ranks-tp2-dp2"])
def test_collectives_match_reference(world_size: int, sizes: dict) -> None:
    results = spawn(_worker, world_size, sizes, timeout=240)
    for rank, res in enumerate(results):
        assert res["failures"] == [], f"rank {rank}: {res['failures'][:10]}"
        assert res["checks"] > 300  # the case grid really ran


@pytest.fixture
def no_live_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as if no ParallelContext had been built in it (another test may have left one)."""
    import weakref

    import lightning_parallelctx.current as current_module

    monkeypatch.setattr(current_module, "LIVE", weakref.WeakSet())
    monkeypatch.setattr(current_module, "_current", None)


def test_single_process_needs_no_context(no_live_context: None) -> None:
    """Without torch.distributed every mode has size 1: layers and collectives run unchanged."""
    x = torch.randn(4, 6, requires_grad=True)
    assert not D.is_initialized()
    assert isinstance(D.current_context(), LocalContext)
    assert D.get_world_size() == 1 and D.get_rank() == 0 and D.get_group() is None
    for out in (D.copy(x), D.reduce(x), D.scatter(x), D.gather(x), D.all_gather(x), D.reduce_scatter(x),
                D.all_to_all(x, 0, 1)):
        assert out is x
    assert D.split_sizes(5, 2) == [3, 2] and D.split_sizes(1, 4) == [1, 0, 0, 0]
    with pytest.raises(IndexError):
        D.scatter(x, dim=2)
