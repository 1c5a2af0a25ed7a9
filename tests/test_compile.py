"""torch.compile over blocks built from the library's layers and collectives (2 processes, gloo).

``fullgraph=True`` makes any graph break an error, so passing means: the whole forward (and, through
AOTAutograd, the whole backward) is one graph, collectives included; Dynamo turns the in-place
torch.distributed calls inside our autograd functions into functional collectives. The compiled
copy must give the eager module's outputs, input gradients and parameter gradients on every rank
(the eager layers are proved against unsplit torch in test_nn_layers.py). Backend "aot_eager"
traces forward and backward exactly as inductor does but skips code generation, which would cost
minutes on these machines (benchmarks/bench_compile.py measures inductor, within fp32 round-off).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import lightning_parallelctx.nn as N
from lightning_parallelctx import ParallelContext
from lightning_parallelctx.testing import spawn

TOL = 1e-6


class _TPBlock(torch.nn.Module):
    """Attention (column q, k, v -> SDPA -> row o) and an MLP, each with a residual: copy / reduce."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (N.ColumnParallelLinear(d, d) for _ in range(3))
        self.o = N.RowParallelLinear(d, d)
        self.fc1, self.fc2 = N.ColumnParallelLinear(d, 4 * d), N.RowParallelLinear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        local = self.q.out_features_per_rank
        hd = self.q.out_features // self.heads
        q, k, v = (p(x).view(b, s, local // hd, hd).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, local))
        return x + self.fc2(F.gelu(self.fc1(x)))


class _SPMLP(torch.nn.Module):
    """Megatron sequence parallelism: all-gather in (reduce-scatter back), reduce-scatter out."""

    def __init__(self, d: int, seq: int) -> None:
        super().__init__()
        self.seq = seq
        self.fc1 = N.ColumnParallelLinear(d, 4 * d, sequence_parallel=True)
        self.fc2 = N.RowParallelLinear(4 * d, d, sequence_parallel=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (seq / tp, batch, d)
        return self.fc2(F.gelu(self.fc1(x, sequence_sizes=self.seq)))


def _compare(eager: torch.nn.Module, x: torch.Tensor, upstream: torch.Tensor, label: str) -> list[str]:
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, backend="aot_eager", fullgraph=True)
    failures = []
    for step in range(2):  # the second call runs the cached graph
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe), compiled(xc)
        ye.backward(upstream)
        yc.backward(upstream)
        pairs = [("output", yc, ye), ("input grad", xc.grad, xe.grad)]
        pairs += [(f"grad of {n}", p.grad, q.grad) for (n, p), q in
                  zip(compiled_module.named_parameters(), eager.parameters())]
        for what, got, want in pairs:
            if got is None or not torch.allclose(got.detach(), want.detach(), atol=TOL, rtol=0):
                diff = "None" if got is None else f"{(got.detach() - want.detach()).abs().max():.3g}"
                failures.append(f"{label} step {step}: {what} differs ({diff})")
        eager.zero_grad(set_to_none=True)
        compiled_module.zero_grad(set_to_none=True)
    return failures


def _compile_worker(rank: int, world_size: int) -> list[str]:
    torch.set_num_threads(1)
    ctx = ParallelContext.from_torch(tensor_parallel_size=world_size)
    try:
        torch._dynamo.reset()
        gen = torch.Generator().manual_seed(7)  # same data on every rank: the TP block's input is replicated
        torch.manual_seed(0)
        d, seq, batch = 16, 8, 2
        failures = _compare(_TPBlock(d, heads=4), torch.randn(batch, seq, d, generator=gen),
                            torch.randn(batch, seq, d, generator=gen), "TP block")
        torch.manual_seed(1)
        x_full = torch.randn(seq, batch, d, generator=gen)
        g_full = torch.randn(seq, batch, d, generator=gen)
        piece = seq // world_size
        failures += _compare(_SPMLP(d, seq), x_full[rank * piece:(rank + 1) * piece],
                             g_full[rank * piece:(rank + 1) * piece], "sequence-parallel MLP")
        return failures
    finally:
        ctx.destroy()


def test_compiled_tp_blocks_match_eager_with_no_graph_break() -> None:
    for rank, failures in enumerate(spawn(_compile_worker, 2, timeout=300)):
        assert not failures, f"rank {rank}: " + "; ".join(failures)
