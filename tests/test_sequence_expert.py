"""A transformer block in tensor-parallel, Megatron sequence-parallel and Ulysses modes equals the
unsplit block (forward and backward), and an expert-parallel MoE equals the unsplit one.

float64, within 1e-6. The unsplit reference is built under the same seed on every rank (the
parallel layers' initialisation reproduces it), run on the full input; each rank compares its
slice. Gradients that the library's gradient hook would reduce (replicated parameters under
sequence splitting) are summed here the way the contract says ("Who holds what").
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lightning_parallelctx.distributed as D
import lightning_parallelctx.nn as N
from lightning_parallelctx import ParallelContext, markers
from lightning_parallelctx.distributed import LocalContext
from lightning_parallelctx.testing import spawn

TOL = 1e-6
F64 = torch.float64
D_MODEL, HEADS, HIDDEN = 16, 4, 32


def _core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention on (batch, seq, heads, head_dim)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


class Block(torch.nn.Module):
    """Pre-norm attention + MLP block, (batch, seq, d_model).

    tp: mode of the tensor-parallel linears (None: plain torch.nn.Linear). megatron_sp: the input
    is split along the sequence over ``tp`` (Megatron sequence parallelism). ulysses: mode over
    which the input is split along the sequence, attention via Ulysses all-to-alls.
    Construction draws from the global RNG in the same order in every variant.
    """

    def __init__(self, tp: str | None = None, megatron_sp: bool = False, ulysses: str | None = None) -> None:
        super().__init__()
        self.ulysses = ulysses
        self.ln1, self.ln2 = torch.nn.LayerNorm(D_MODEL, dtype=F64), torch.nn.LayerNorm(D_MODEL, dtype=F64)
        if tp is None:
            lin = lambda i, o, kind: torch.nn.Linear(i, o, dtype=F64)  # noqa: E731
        else:
            def lin(i, o, kind):
                cls = N.ColumnParallelLinear if kind == "col" else N.RowParallelLinear
                return cls(i, o, sequence_parallel=megatron_sp, sequence_dim=1, mode=tp, dtype=F64)
        self.q, self.k, self.v = (lin(D_MODEL, D_MODEL, "col") for _ in range(3))
        self.o = lin(D_MODEL, D_MODEL, "row")
        self.fc1, self.fc2 = lin(D_MODEL, HIDDEN, "col"), lin(HIDDEN, D_MODEL, "row")
        if megatron_sp:  # replicated over TENSOR, fed sequence slices: summed over TENSOR
            markers.mark_module(self.ln1, sequence_parallel=True)
            markers.mark_module(self.ln2, sequence_parallel=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        q, k, v = (proj(h) for proj in (self.q, self.k, self.v))
        b, s, d_local = q.shape
        q, k, v = (t.view(b, s, d_local * HEADS // D_MODEL, D_MODEL // HEADS) for t in (q, k, v))
        if self.ulysses is not None:
            a = D.ulysses_attention(q, k, v, _core, seq_dim=1, head_dim=2, mode=self.ulysses)
        else:
            a = _core(q, k, v)
        x = x + self.o(a.reshape(b, s, d_local))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def _compare_block(fails: list[str], label: str, seed: int, seq: int, *, tp: str | None, megatron_sp: bool,
                   ulysses: str | None) -> int:
    gen = torch.Generator().manual_seed(seed)
    x_full = torch.randn(2, seq, D_MODEL, generator=gen, dtype=F64)
    g_full = torch.randn(2, seq, D_MODEL, generator=gen, dtype=F64)
    torch.manual_seed(seed)
    ref = Block()
    torch.manual_seed(seed)
    par = Block(tp=tp, megatron_sp=megatron_sp, ulysses=ulysses)
    xr = x_full.clone().requires_grad_()
    y_ref = ref(xr)
    (y_ref * g_full).sum().backward()

    seq_mode = tp if megatron_sp else ulysses  # the mode the sequence is split over, if any
    n_seq, r_seq = (D.get_world_size(seq_mode), D.get_rank(seq_mode)) if seq_mode else (1, 0)
    mine = lambda t: t.tensor_split(n_seq, 1)[r_seq]  # noqa: E731
    x = mine(x_full).clone().requires_grad_()
    y = par(x)
    y.backward(mine(g_full).contiguous())
    checks = 0

    def close(got, want, what):
        nonlocal checks
        checks += 1
        if got is None or got.shape != want.shape or not torch.allclose(got, want, atol=TOL, rtol=0):
            diff = "None" if got is None else (f"shape {tuple(got.shape)} vs {tuple(want.shape)}" if got.shape != want.shape
                                               else f"{(got - want).abs().max():.3g}")
            fails.append(f"{label} seq={seq}: {what} ({diff})")

    close(y.detach(), mine(y_ref.detach()), "forward")
    close(x.grad, mine(xr.grad), "input grad")
    ref_params = dict(ref.named_parameters())
    for name, p in par.named_parameters():
        want = ref_params[name].grad
        grad = p.grad.clone()
        if megatron_sp and markers.is_sequence_parallel(p):
            grad = D.reduce(grad, tp)  # what the gradient hook does for sequence-parallel params
        if ulysses is not None:
            grad = D.reduce(grad, ulysses)  # partial per sequence slice: the hook averages, loss sums
        dim = markers.tensor_parallel_dim(p)
        if dim is not None:
            want = want.chunk(D.get_world_size(tp), dim)[D.get_rank(tp)]
        close(grad, want, f"grad of {name}")
    return checks


def _moe_cases(fails: list[str], mode: str, seed: int) -> int:
    n, r = D.get_world_size(mode), D.get_rank(mode)
    checks = 0
    for top_k in (1, 2):
        torch.manual_seed(seed + top_k)
        ref = N.ExpertParallelMoE(D_MODEL, HIDDEN, num_experts=2 * n, top_k=top_k, context=LocalContext(), dtype=F64)
        torch.manual_seed(seed + top_k)
        par = N.ExpertParallelMoE(D_MODEL, HIDDEN, num_experts=2 * n, top_k=top_k, mode=mode, dtype=F64)
        gen = torch.Generator().manual_seed(seed)
        # Every rank of the group reads different tokens (EXPERT ranks are distinct data shards).
        xs = [torch.randn(3, 2 + j, D_MODEL, generator=gen, dtype=F64) for j in range(n)]
        gs = [torch.randn_like(x) for x in xs]
        leaves = [x.clone().requires_grad_() for x in xs]
        ys = [ref(x) for x in leaves]
        sum((y * g).sum() for y, g in zip(ys, gs)).backward()
        x = xs[r].clone().requires_grad_()
        y = par(x)
        y.backward(gs[r])
        ref_p = dict(ref.named_parameters())
        pairs = [("forward", y, ys[r]), ("input grad", x.grad, leaves[r].grad)]
        for name, p in par.named_parameters():
            if markers.is_expert(p):  # every rank's tokens reach the expert: full gradient slice
                pairs.append((f"expert grad {name}", p.grad, ref_p[name].grad.chunk(n, N.EXPERT_DIM)[r]))
            else:  # router: this rank's tokens only; summed over the group it is the full gradient
                pairs.append((f"router grad {name} (summed)", D.reduce(p.grad.clone(), mode), ref_p[name].grad))
        for what, got, want in pairs:
            checks += 1
            if got is None or got.shape != want.shape or not torch.allclose(got.detach(), want.detach(), atol=TOL, rtol=0):
                fails.append(f"MoE [{mode} n={n} top_k={top_k}] {what}")
    return checks


def _dispatch_cases(fails: list[str], mode: str) -> int:
    """dispatch/combine alone: uneven token counts, a rank with no tokens, experts nobody uses."""
    n, r = D.get_world_size(mode), D.get_rank(mode)
    num_experts = 2 * n
    gen = torch.Generator().manual_seed(77)
    counts = [5, 0, 3, 7][:n] if n > 1 else [4]
    xs = [torch.randn(c, 3, generator=gen, dtype=F64) for c in counts]
    idx = [torch.randint(0, num_experts - 1, (c,), generator=gen) for c in counts]  # last expert unused
    x = xs[r].clone().requires_grad_()
    recv, local, handle = D.dispatch(x, idx[r], num_experts, mode)
    per = num_experts // n
    want = []
    want_local = []
    for s in range(n):  # what rank r should receive: each source's tokens for r, sorted by expert
        order = torch.argsort(idx[s], stable=True)
        sel = order[(idx[s][order] // per) == r]
        want.append(xs[s][sel])
        want_local.append(idx[s][sel] - r * per)
    ok = torch.equal(recv.detach(), torch.cat(want)) and torch.equal(local, torch.cat(want_local))
    scaled = recv * (local + r * per + 1).unsqueeze(-1).to(F64)  # "expert e multiplies by e + 1"
    out = D.combine(scaled, handle)
    ok &= torch.allclose(out.detach(), xs[r] * (idx[r] + 1).unsqueeze(-1).to(F64), atol=TOL)
    g = torch.randn(out.shape, generator=gen, dtype=F64)
    out.backward(g)
    ok &= torch.allclose(x.grad, g * (idx[r] + 1).unsqueeze(-1).to(F64), atol=TOL)
    if not ok:
        fails.append(f"dispatch/combine [{mode} n={n}]")
    return 1


def _seq_head_roundtrip(fails: list[str], mode: str) -> int:
    """sequence_to_heads / heads_to_sequence alone: values, inverse, gradients, uneven slices."""
    n, r = D.get_world_size(mode), D.get_rank(mode)
    checks = 0
    for seq, heads in ((4 * n, 2 * n), (3 * n + 1, 2 * n + 1)):
        gen = torch.Generator().manual_seed(seq)
        full = torch.randn(2, seq, heads, 3, generator=gen, dtype=F64)
        g = torch.randn(2, seq, heads, 3, generator=gen, dtype=F64)
        x = full.tensor_split(n, 1)[r].clone().requires_grad_()
        h = D.sequence_to_heads(x, 1, 2, mode)
        ok = torch.equal(h.detach(), full.tensor_split(n, 2)[r])
        back = D.heads_to_sequence(h * 2, 1, 2, mode, num_heads=heads)
        ok &= torch.equal(back.detach(), 2 * x.detach())
        back.backward(g.tensor_split(n, 1)[r])
        ok &= torch.equal(x.grad, 2 * g.tensor_split(n, 1)[r])
        # ulysses_attention's seq_sizes: exchanged (None), the full length (passed on as an int)
        # and every slice's length give bit-identical outputs and gradients.
        got = []
        for seq_sizes in (None, seq, D.split_sizes(seq, n)):
            q = x.detach().clone().requires_grad_()
            out = D.ulysses_attention(q, q * 2, q * 3, _core, mode=mode, seq_sizes=seq_sizes)
            out.backward(g.tensor_split(n, 1)[r])
            got.append((out.detach(), q.grad))
        ok &= all(torch.equal(o, got[0][0]) and torch.equal(q, got[0][1]) for o, q in got[1:])
        checks += 1
        if not ok:
            fails.append(f"sequence_to_heads/heads_to_sequence [{mode} n={n} seq={seq} heads={heads}]")
    return checks


def _block_worker(rank: int, world_size: int, sizes: dict, plan: list) -> dict:
    ctx = ParallelContext.from_torch(**sizes)
    D.set_current_context(ctx)
    fails: list[str] = []
    block_checks = seq_checks = 0
    for i, (label, kwargs) in enumerate(plan):
        for seq in (8, 7):  # even and uneven (tensor_split) sequence slices
            block_checks += _compare_block(fails, label, 10 + i, seq, **kwargs)
    for mode in sorted({kw["ulysses"] for _, kw in plan if kw["ulysses"]}):
        seq_checks += _seq_head_roundtrip(fails, mode)
    ctx.destroy()
    return {"failures": fails, "checks": block_checks, "seq_checks": seq_checks}


def _moe_worker(rank: int, world_size: int, sizes: dict) -> dict:
    ctx = ParallelContext.from_torch(**sizes)
    D.set_current_context(ctx)
    fails: list[str] = []
    checks = 0
    for mode in ("expert", "global"):
        checks += _moe_cases(fails, mode, 40)
        checks += _dispatch_cases(fails, mode)
    ctx.destroy()
    return {"failures": fails, "checks": checks}


TP2_PLAN = [
    ("tensor parallel", dict(tp="tensor", megatron_sp=False, ulysses=None)),
    ("megatron sequence parallel", dict(tp="tensor", megatron_sp=True, ulysses=None)),
    ("ulysses", dict(tp=None, megatron_sp=False, ulysses="global")),
]
TP2_SP2_PLAN = [
    ("tensor parallel x2", dict(tp="tensor", megatron_sp=False, ulysses=None)),
    ("tensor parallel x4", dict(tp="global", megatron_sp=False, ulysses=None)),
    ("megatron sequence parallel x2", dict(tp="tensor", megatron_sp=True, ulysses=None)),
    ("megatron sequence parallel x4", dict(tp="global", megatron_sp=True, ulysses=None)),
    ("ulysses x2", dict(tp=None, megatron_sp=False, ulysses="sequence")),
    ("ulysses x4", dict(tp=None, megatron_sp=False, ulysses="global")),
    ("tensor x2 + ulysses x2", dict(tp="tensor", megatron_sp=False, ulysses="sequence")),
]


@pytest.mark.parametrize("world_size,sizes,plan", [
    (2, {"tensor_parallel_size": 2}, TP2_PLAN),
    (4, {"tensor_parallel_size": 2, "sequence_parallel_size": 2}, TP2_SP2_PLAN),
], ids=["2ranks-tp2", "4ranks-tp2-sp2"])
def test_transformer_block_equals_unsplit(world_size: int, sizes: dict, plan: list) -> None:
    results = spawn(_block_worker, world_size, sizes, plan, timeout=240)
    for rank, res in enumerate(results):
        assert res["failures"] == [], f"rank {rank}: {res['failures'][:10]}"
        assert res["checks"] == len(plan) * 2 * 18  # forward, input grad, 16 parameters
        assert res["seq_checks"] == 2 * len({kw["ulysses"] for _, kw in plan if kw["ulysses"]})


@pytest.mark.parametrize("world_size,sizes", [(2, {"expert_parallel_size": 2}),
                                              (4, {"expert_parallel_size": 2, "data_parallel_size": 2})],
                         ids=["2ranks-ep2", "4ranks-ep2-dp2"])
def test_expert_parallel_moe_equals_unsplit(world_size: int, sizes: dict) -> None:
    results = spawn(_moe_worker, world_size, sizes, timeout=240)
    for rank, res in enumerate(results):
        assert res["failures"] == [], f"rank {rank}: {res['failures'][:10]}"
        assert res["checks"] >= 2 * (2 * 7 + 1)


def _bad_dispatch_worker(rank: int, world_size: int) -> dict:
    ctx = ParallelContext.from_torch(expert_parallel_size=world_size)
    D.set_current_context(ctx)
    num_experts = 2 * world_size
    x = torch.randn(4, 3, dtype=F64)
    good = torch.tensor([0, 1, 2, 3])
    cases = {  # only rank 1 is wrong; every rank must raise (no hang), before any token moves
        "range": torch.tensor([0, num_experts, -1, num_experts]),
        "length": torch.tensor([0, 1]),
        "dtype": torch.tensor([0.0, 1.0, 2.0, 3.0]),
    }
    errors = {}
    for name, bad in cases.items():
        try:
            D.dispatch(x, bad if rank == 1 else good, num_experts, "expert")
            errors[name] = None
        except Exception as err:  # noqa: BLE001  (the test checks the type)
            errors[name] = (type(err).__name__, str(err))
    # The group is still in step afterwards: a valid dispatch/combine round trip works.
    recv, local, handle = D.dispatch(x, good, num_experts, "expert")
    back = D.combine(recv, handle)
    ctx.destroy()
    return {"errors": errors, "round_trip": torch.equal(back, x)}


def test_dispatch_rejects_bad_expert_index_on_every_rank_without_hanging() -> None:
    # One process: the error names the bad ids, the range, num_experts and the fix.
    with pytest.raises(Exception, match=r"expert_index holds 3 id\(s\) outside \[0, 4\) with num_experts=4: -2, 4, 7\. "
                                        r"Every expert id must be in 0\.\.3\. Fix: make the router score"):
        D.dispatch(torch.zeros(5, 3), torch.tensor([0, 4, 7, -2, 3]), 4, context=LocalContext())
    # Two ranks, bad input on rank 1 only: rank 1 says what is wrong, rank 0 names rank 1 (and the
    # timeout is far below gloo's default, so a hang would fail here rather than wait 30 minutes).
    results = spawn(_bad_dispatch_worker, 2, timeout=120)
    for rank, res in enumerate(results):
        assert res["round_trip"], rank
        for name, err in res["errors"].items():
            assert err is not None and err[0] == "ParallelCtxError", (rank, name, err)
            if rank == 0:
                assert "rank(s) [1] of the 'expert' group passed invalid expert_index/tokens" in err[1], err
                assert "no tokens were exchanged" in err[1], err
    bad = results[1]["errors"]
    assert "dispatch on rank 1 of the 'expert' group: expert_index holds 3 id(s) outside [0, 4) with num_experts=4: -1, 4." \
        in bad["range"][1], bad["range"]
    assert "expert_index has 2 entries for 4 tokens" in bad["length"][1] and "Fix:" in bad["length"][1]
    assert "expert_index has dtype torch.float32" in bad["dtype"][1] and ".long()" in bad["dtype"][1]

