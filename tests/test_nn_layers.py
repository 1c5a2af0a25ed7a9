"""Tensor-parallel layers against torch's unsplit ones, on 2 and 4 ranks (float64, within 1e-6).

Reference rule: each rank builds the unsplit torch module under the same seed (which the parallel
layers' initialisation must reproduce exactly), runs it on the full input with the full upstream
gradient, and compares its own slice of every output and gradient. 4-rank groups are exercised
through mode="global" on a tp=2 x ep=2 context, so one spawned job covers 2- and 4-rank groups.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lightning_parallelctx.distributed as D
import lightning_parallelctx.nn as N
from lightning_parallelctx import ParallelContext, markers
from lightning_parallelctx.distributed import LocalContext
from lightning_parallelctx.errors import ParallelConfigError
from lightning_parallelctx.testing import spawn

TOL = 1e-6
F64 = torch.float64


class _Checker:
    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.failures: list[str] = []
        self.count = 0

    def close(self, got: torch.Tensor | None, want: torch.Tensor, label: str) -> None:
        self.count += 1
        if got is None:
            self.failures.append(f"{label}: missing (None)")
        elif got.shape != want.shape:
            self.failures.append(f"{label}: shape {tuple(got.shape)} != {tuple(want.shape)}")
        elif not torch.allclose(got.detach(), want.detach(), atol=TOL, rtol=0):
            self.failures.append(f"{label}: differs by {(got.detach() - want.detach()).abs().max():.3g}")

    def true(self, cond: bool, label: str) -> None:
        self.count += 1
        if not cond:
            self.failures.append(label)


def _shard(t: torch.Tensor, n: int, r: int, dim: int) -> torch.Tensor:
    return t.chunk(n, dim)[r]


def _linear_cases(c: _Checker, mode: str, seed: int) -> None:
    n, r = D.get_world_size(mode), D.get_rank(mode)
    gen = torch.Generator().manual_seed(seed)
    din, dout = 4 * n, 6 * n
    for bias in (True, False):
        for gather_output in (False, True):
            tag = f"[{mode} n={n} bias={bias} gather={gather_output}]"
            torch.manual_seed(seed)
            ref = torch.nn.Linear(din, dout, bias=bias, dtype=F64)
            torch.manual_seed(seed)
            col = N.ColumnParallelLinear(din, dout, bias=bias, gather_output=gather_output, mode=mode, dtype=F64)
            c.close(col.weight, _shard(ref.weight, n, r, 0), f"column init weight {tag}")
            c.true(markers.tensor_parallel_dim(col.weight) == 0, f"column weight marker {tag}")
            if bias:
                c.close(col.bias, _shard(ref.bias, n, r, 0), f"column init bias {tag}")
            x_full = torch.randn(3, 5, din, generator=gen, dtype=F64)
            g_full = torch.randn(3, 5, dout, generator=gen, dtype=F64)
            xr = x_full.clone().requires_grad_()
            (ref(xr) * g_full).sum().backward()
            x = x_full.clone().requires_grad_()
            y = col(x)
            want = ref(x_full) if gather_output else _shard(ref(x_full), n, r, -1)
            c.close(y, want, f"column forward {tag}")
            y.backward(g_full if gather_output else _shard(g_full, n, r, -1))
            c.close(x.grad, xr.grad, f"column input grad {tag}")
            c.close(col.weight.grad, _shard(ref.weight.grad, n, r, 0), f"column weight grad {tag}")
            if bias:
                c.close(col.bias.grad, _shard(ref.bias.grad, n, r, 0), f"column bias grad {tag}")
            c.true(torch.equal(x.detach(), x_full), f"column input unchanged {tag}")

        for parallel_in in (True, False):
            tag = f"[{mode} n={n} bias={bias} input_is_parallel={parallel_in}]"
            torch.manual_seed(seed + 1)
            ref = torch.nn.Linear(din, dout, bias=bias, dtype=F64)
            torch.manual_seed(seed + 1)
            row = N.RowParallelLinear(din, dout, bias=bias, input_is_parallel=parallel_in, mode=mode, dtype=F64)
            c.close(row.weight, _shard(ref.weight, n, r, 1), f"row init weight {tag}")
            c.true(markers.tensor_parallel_dim(row.weight) == 1, f"row weight marker {tag}")
            if bias:
                c.close(row.bias, ref.bias, f"row init bias {tag}")
                c.true(not markers.is_tensor_parallel(row.bias), f"row bias replicated {tag}")
            x_full = torch.randn(2, 7, din, generator=gen, dtype=F64)
            g_full = torch.randn(2, 7, dout, generator=gen, dtype=F64)
            xr = x_full.clone().requires_grad_()
            (ref(xr) * g_full).sum().backward()
            x_in = _shard(x_full, n, r, -1) if parallel_in else x_full
            x = x_in.clone().requires_grad_()
            y = row(x)
            c.close(y, ref(x_full), f"row forward {tag}")
            y.backward(g_full)
            c.close(x.grad, _shard(xr.grad, n, r, -1) if parallel_in else xr.grad, f"row input grad {tag}")
            c.close(row.weight.grad, _shard(ref.weight.grad, n, r, 1), f"row weight grad {tag}")
            if bias:
                c.close(row.bias.grad, ref.bias.grad, f"row bias grad {tag}")
            c.true(torch.equal(x.detach(), x_in), f"row input unchanged {tag}")


def _sequence_parallel_linear_cases(c: _Checker, mode: str, seed: int) -> None:
    """Megatron SP on the layers alone: column all-gathers the sequence, row reduce-scatters it.
    Sequence lengths that do not divide follow tensor_split."""
    n, r = D.get_world_size(mode), D.get_rank(mode)
    gen = torch.Generator().manual_seed(seed)
    din, dh = 2 * n, 4 * n
    for seq, seq_dim in ((4 * n, 0), (4 * n + 1, 0), (2 * n + 1, 1), (3 * n, -2)):
        tag = f"[{mode} n={n} seq={seq} dim={seq_dim}]"
        torch.manual_seed(seed)
        ref1, ref2 = torch.nn.Linear(din, dh, dtype=F64), torch.nn.Linear(dh, din, dtype=F64)
        torch.manual_seed(seed)
        col = N.ColumnParallelLinear(din, dh, sequence_parallel=True, sequence_dim=seq_dim, mode=mode, dtype=F64)
        row = N.RowParallelLinear(dh, din, sequence_parallel=True, sequence_dim=seq_dim, mode=mode, dtype=F64)
        c.true(markers.is_sequence_parallel(row.bias), f"SP row bias marked {tag}")
        shape = [3, 3, din]
        shape[seq_dim % 3] = seq
        x_full = torch.randn(shape, generator=gen, dtype=F64)
        g_full = torch.randn(shape, generator=gen, dtype=F64)
        xr = x_full.clone().requires_grad_()
        (ref2(torch.tanh(ref1(xr))) * g_full).sum().backward()
        mine = x_full.tensor_split(n, seq_dim)[r]
        x = mine.clone().requires_grad_()
        # Slice lengths: exchanged, or given as the full length / the per-rank list.
        hint = [None, seq, [p.shape[seq_dim] for p in x_full.tensor_split(n, seq_dim)]][seq % 3]
        y = row(torch.tanh(col(x, sequence_sizes=hint)))
        c.close(y, ref2(torch.tanh(ref1(x_full))).tensor_split(n, seq_dim)[r], f"SP forward {tag} hint={hint}")
        y.backward(g_full.tensor_split(n, seq_dim)[r].contiguous())
        c.close(x.grad, xr.grad.tensor_split(n, seq_dim)[r], f"SP input grad {tag}")
        c.close(col.weight.grad, _shard(ref1.weight.grad, n, r, 0), f"SP column weight grad {tag}")
        c.close(row.weight.grad, _shard(ref2.weight.grad, n, r, 1), f"SP row weight grad {tag}")
        # The replicated, sequence-parallel-marked bias: per-rank partial gradients sum to the full one.
        c.close(D.reduce(row.bias.grad.clone(), mode), ref2.bias.grad, f"SP row bias grad (summed) {tag}")


def _embedding_cases(c: _Checker, mode: str, seed: int) -> None:
    n, r = D.get_world_size(mode), D.get_rank(mode)
    gen = torch.Generator().manual_seed(seed)
    vocab, dim = 5 * n, 3
    for padding_idx in (None, 1, -1):
        for sp in (False, True):
            tag = f"[{mode} n={n} padding={padding_idx} sp={sp}]"
            torch.manual_seed(seed)
            ref = torch.nn.Embedding(vocab, dim, padding_idx=padding_idx, dtype=F64)
            torch.manual_seed(seed)
            emb = N.VocabParallelEmbedding(vocab, dim, padding_idx=padding_idx, sequence_parallel=sp,
                                           sequence_dim=1, mode=mode, dtype=F64)
            c.close(emb.weight, _shard(ref.weight, n, r, 0), f"embedding init {tag}")
            ids = torch.randint(0, vocab, (4, 2 * n + 1), generator=gen)
            ids[0, :3] = torch.tensor([0, vocab - 1, ref.padding_idx if padding_idx is not None else 2])
            g_full = torch.randn(4, 2 * n + 1, dim, generator=gen, dtype=F64)
            (ref(ids) * g_full).sum().backward()
            ids_before = ids.clone()
            y = emb(ids)
            want = ref(ids)
            if sp:
                want, g = want.tensor_split(n, 1)[r], g_full.tensor_split(n, 1)[r].contiguous()
            else:
                g = g_full
            c.close(y, want, f"embedding forward {tag}")
            y.backward(g)
            c.close(emb.weight.grad, _shard(ref.weight.grad, n, r, 0), f"embedding grad {tag}")
            c.true(torch.equal(ids, ids_before), f"embedding ids unchanged {tag}")


def _cross_entropy_cases(c: _Checker, mode: str, seed: int) -> None:
    n, r = D.get_world_size(mode), D.get_rank(mode)
    gen = torch.Generator().manual_seed(seed)
    vocab = 6 * n
    for smoothing in (0.0, 0.1):
        for reduction in ("mean", "sum", "none"):
            tag = f"[{mode} n={n} ls={smoothing} {reduction}]"
            logits = torch.randn(3, 5, vocab, generator=gen, dtype=F64) * 3
            target = torch.randint(0, vocab, (3, 5), generator=gen)
            target[0, 0], target[1, 2], target[2, 4] = -100, 0, vocab - 1
            lr = logits.clone().requires_grad_()
            want = F.cross_entropy(lr.view(-1, vocab), target.view(-1), ignore_index=-100,
                                   label_smoothing=smoothing, reduction=reduction)
            if reduction == "none":
                want = want.view(3, 5)
            up = torch.randn(want.shape, generator=gen, dtype=F64)
            (want * up).sum().backward()
            x = _shard(logits, n, r, -1).clone().requires_grad_()
            got = N.vocab_parallel_cross_entropy(x, target, label_smoothing=smoothing, reduction=reduction, mode=mode)
            c.close(got, want, f"cross-entropy value {tag}")
            (got * up).sum().backward()
            c.close(x.grad, _shard(lr.grad, n, r, -1), f"cross-entropy grad {tag}")
    # Module form, through a vocab-parallel output layer, with a custom ignore_index.
    torch.manual_seed(seed)
    ref = torch.nn.Linear(4, vocab, dtype=F64)
    torch.manual_seed(seed)
    head = N.ColumnParallelLinear(4, vocab, mode=mode, dtype=F64)
    h = torch.randn(2, 6, 4, generator=gen, dtype=F64)
    target = torch.randint(0, vocab, (2, 6), generator=gen)
    target[1, 1] = 7
    hr = h.clone().requires_grad_()
    want = F.cross_entropy(ref(hr).view(-1, vocab), target.view(-1), ignore_index=7, label_smoothing=0.2)
    want.backward()
    hx = h.clone().requires_grad_()
    got = N.VocabParallelCrossEntropy(ignore_index=7, label_smoothing=0.2, mode=mode)(head(hx), target)
    got.backward()
    c.close(got, want, f"cross-entropy head loss [{mode}]")
    c.close(hx.grad, hr.grad, f"cross-entropy head input grad [{mode}]")
    c.close(head.weight.grad, _shard(ref.weight.grad, n, r, 0), f"cross-entropy head weight grad [{mode}]")


class _Model(torch.nn.Module):
    """Every layer kind, for the state-dict round trip."""

    def __init__(self, mode: str, context=None) -> None:
        super().__init__()
        self.emb = N.VocabParallelEmbedding(16, 8, mode=mode, context=context)
        self.norm = torch.nn.LayerNorm(8)
        self.up = N.ColumnParallelLinear(8, 16, mode=mode, context=context)
        self.down = N.RowParallelLinear(16, 8, mode=mode, context=context)
        self.moe = N.ExpertParallelMoE(8, 12, num_experts=4, top_k=2, context=context)
        self.register_buffer("steps", torch.tensor(3))


def _state_dict_cases(c: _Checker, mode: str, seed: int) -> None:
    torch.manual_seed(seed)
    full = _Model(mode, context=LocalContext())
    torch.manual_seed(seed)
    built = _Model(mode)
    sd_full = full.state_dict()
    sharded = N.shard_state_dict(sd_full, built)
    for key, value in built.state_dict().items():  # seeded construction == slicing the full model
        c.close(sharded[key].to(value.dtype), value, f"shard_state_dict {key} [{mode}]")
    torch.manual_seed(seed + 5)
    other = _Model(mode)
    N.load_full_state_dict(other, sd_full)
    gathered = N.gather_state_dict(other)
    c.true(set(gathered) == set(sd_full), f"gather_state_dict keys [{mode}]")
    for key, value in sd_full.items():
        c.close(gathered[key].to(F64), value.to(F64), f"gather_state_dict {key} [{mode}]")
    x = torch.randint(0, 16, (2, 5))
    c.close(other.down(other.up(other.norm(other.emb(x)))), full.down(full.up(full.norm(full.emb(x)))),
            f"loaded model output [{mode}]")
    h = torch.randn(2, 5, 8)
    c.close(other.moe(h), full.moe(h), f"loaded MoE output [{mode}]")


def _worker(rank: int, world_size: int, sizes: dict) -> dict:
    ctx = ParallelContext.from_torch(**sizes)
    D.set_current_context(ctx)
    c = _Checker(rank)
    modes = ["tensor"] + (["global"] if world_size == 4 else [])
    for i, mode in enumerate(modes):
        _linear_cases(c, mode, 100 + i)
        _sequence_parallel_linear_cases(c, mode, 200 + i)
        _embedding_cases(c, mode, 300 + i)
        _cross_entropy_cases(c, mode, 400 + i)
        _state_dict_cases(c, mode, 500 + i)
    # Sizes that cannot be split evenly are refused with the size and the group size.
    try:
        N.ColumnParallelLinear(4, 2 * ctx.tp_size + 1)
        c.true(False, "uneven out_features accepted")
    except ParallelConfigError as e:
        c.true(f"out_features={2 * ctx.tp_size + 1}" in str(e) and f"group size {ctx.tp_size}" in str(e),
               f"error message: {e}")
    ctx.destroy()
    return {"failures": c.failures, "checks": c.count}


@pytest.mark.parametrize("world_size,sizes", [(2, {"tensor_parallel_size": 2}),
                                              (4, {"tensor_parallel_size": 2, "expert_parallel_size": 2})],
                         ids=["2ranks-tp2", "4ranks-tp2-ep2"])
def test_layers_match_unsplit_torch(world_size: int, sizes: dict) -> None:
    results = spawn(_worker, world_size, sizes, timeout=240)
    for rank, res in enumerate(results):
        assert res["failures"] == [], f"rank {rank}: {res['failures'][:10]}"
        assert res["checks"] > (150 if world_size == 2 else 300)


@pytest.fixture
def no_live_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as if no ParallelContext had been built in it (another test may have left one)."""
    import weakref

    import lightning_parallelctx.current as current_module

    monkeypatch.setattr(current_module, "LIVE", weakref.WeakSet())
    monkeypatch.setattr(current_module, "_current", None)


def test_layers_single_process_equal_torch(no_live_context: None) -> None:
    """Without a context (every group of size 1) the layers are their torch counterparts."""
    torch.manual_seed(3)
    ref = torch.nn.Sequential(torch.nn.Embedding(10, 6), torch.nn.Linear(6, 8), torch.nn.Linear(8, 10))
    torch.manual_seed(3)
    par = torch.nn.Sequential(N.VocabParallelEmbedding(10, 6), N.ColumnParallelLinear(6, 8, gather_output=True),
                              N.RowParallelLinear(8, 10, input_is_parallel=False))
    ids = torch.randint(0, 10, (3, 4))
    target = torch.randint(0, 10, (3, 4))
    want = F.cross_entropy(ref(ids).view(-1, 10), target.view(-1), label_smoothing=0.05)
    got = N.vocab_parallel_cross_entropy(par(ids), target, label_smoothing=0.05)
    want.backward()
    got.backward()
    assert torch.allclose(got, want, atol=1e-6)
    for (name, p), q in zip(par.named_parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name
    assert N.gather_state_dict(par).keys() == ref.state_dict().keys()
    with pytest.raises(ParallelConfigError, match="num_experts=3"):
        N.ExpertParallelMoE(4, 4, num_experts=3, context=_Sized(2))


class _Sized(LocalContext):
    """A context that claims a group size, for construction-time checks only."""

    def __init__(self, n: int) -> None:
        self.n = n

    def get_world_size(self, mode=None) -> int:
        return self.n


def test_cross_entropy_errors_name_the_value_the_rule_and_the_fix() -> None:
    from lightning_parallelctx.errors import ParallelCtxError

    logits, local = torch.randn(2, 3, 10), LocalContext()
    with pytest.raises(ParallelCtxError, match=r"target has 5 entries for 6 rows of logits.*target\.shape == "
                                               r"logits\.shape\[:-1\]\. Fix:"):
        N.vocab_parallel_cross_entropy(logits, torch.zeros(5, dtype=torch.long), context=local)
    with pytest.raises(ParallelCtxError, match=r"target holds id\(s\) -3, 10 outside \[0, 10\).*ignore_index=-100\. Fix:"):
        N.vocab_parallel_cross_entropy(logits, torch.tensor([[0, 10, -100], [-3, 1, 2]]), context=local)
    with pytest.raises(ValueError, match=r"label_smoothing=1\.5 must be in \[0, 1\].*use e\.g\."):
        N.vocab_parallel_cross_entropy(logits, torch.zeros(2, 3, dtype=torch.long), label_smoothing=1.5, context=local)
    with pytest.raises(ValueError, match="reduction='avg' is not a reduction; use 'mean', 'sum' or 'none'"):
        N.vocab_parallel_cross_entropy(logits, torch.zeros(2, 3, dtype=torch.long), reduction="avg", context=local)
