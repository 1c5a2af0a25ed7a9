"""The data-parallel gradient hook against torch DDP and hand-computed references.

Every multi-process check runs inside one ``spawn`` per world size (2, 4, 8 ranks): each rank runs
many scenarios and returns, per scenario, the list of mismatches and how many tensors it compared;
the parent asserts every list is empty and every count positive.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lightning_parallelctx import ParallelContext
from lightning_parallelctx.errors import ParallelCtxError
from lightning_parallelctx.grad_sync import (
    BucketedGradientHandler,
    DataParallelGradientHook,
    DDPGradientHandler,
    FlatAllReduceGradientHandler,
    GradientHandler,
    available_gradient_handlers,
    get_gradient_handler,
    register_gradient_handler,
)
from lightning_parallelctx.markers import (
    is_expert,
    is_sequence_parallel,
    mark_expert,
    mark_sequence_parallel,
    mark_tensor_parallel,
)
from lightning_parallelctx.testing import spawn

# ------------------------------------------------------------------------------------ models
# Each forward takes (batch, rank, step) and returns the loss, so DDP and the hook run the same code.


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(12, 24), nn.Linear(24, 24), nn.Linear(24, 6)

    def forward(self, x: torch.Tensor, rank: int, step: int) -> torch.Tensor:
        return self.l3(torch.relu(self.l2(torch.relu(self.l1(x))))).square().mean()


class LayerNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(12 if i == 0 else 24, 24), nn.LayerNorm(24))
                                    for i in range(4))
        self.norm = nn.LayerNorm(24)
        self.head = nn.Linear(24, 6)

    def forward(self, x: torch.Tensor, rank: int, step: int) -> torch.Tensor:
        for block in self.blocks:
            x = F.gelu(block(x))
        return self.head(self.norm(x)).square().mean()


class TiedLM(nn.Module):
    """Input embedding and output projection share one Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.body = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 40, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor, rank: int, step: int) -> torch.Tensor:
        tokens = (x.abs() * 7).long() % 40
        logits = self.head(self.norm(torch.tanh(self.body(self.emb(tokens[:, :6])))))
        return F.cross_entropy(logits.reshape(-1, 40), tokens[:, 1:7].reshape(-1))


class Unused(nn.Module):
    """aux: used by rank 0 on odd steps only (locally unused elsewhere); sometimes: used by every
    rank on even steps only; never: no gradient ever; frozen: requires_grad=False."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk, self.head = nn.Linear(12, 16), nn.Linear(16, 4)
        self.aux, self.sometimes, self.never = nn.Linear(16, 4), nn.Linear(16, 4), nn.Linear(16, 4)
        self.frozen = nn.Linear(16, 16)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor, rank: int, step: int) -> torch.Tensor:
        h = torch.relu(self.frozen(torch.relu(self.trunk(x))))
        out = self.head(h)
        if rank == 0 and step % 2 == 1:
            out = out + self.aux(h)
        if step % 2 == 0:
            out = out * self.sometimes(h).sigmoid()
        return out.square().mean()


class ChannelsLastConv(nn.Module):
    """Conv weights in channels_last layout: the bucket views must keep the parameters' strides."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor, rank: int, step: int) -> torch.Tensor:
        img = x[:, :12].reshape(5, 3, 2, 2).repeat(1, 1, 3, 3).contiguous(memory_format=torch.channels_last)
        return self.c2(torch.relu(self.c1(img))).square().mean()


MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": MLP, "layernorm": LayerNormNet, "tied": TiedLM, "unused": Unused,
                                              "conv": ChannelsLastConv}


def _build(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]().to(dtype)


def _batch(rank: int, step: int, micro: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 * rank + 100 * step + micro)
    return torch.randn(5, 12, generator=g).to(dtype)


# ------------------------------------------------------------------------------------ helpers
def _diff(a: torch.Tensor | None, b: torch.Tensor | None, exact: bool, rtol: float) -> str | None:
    if a is None or b is None:
        return None if a is None and b is None else f"grad None on one side only (ours None={a is None})"
    if exact:
        return None if torch.equal(a, b) else f"not bit-exact, max |diff| {(a - b).abs().max().item():.3e}"
    err = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
    return None if err <= rtol else f"relative error {err:.3e} > {rtol}"


def _backward_through(handler: object | None) -> Callable[[torch.Tensor], None]:
    """``loss.backward()``, or (a handler given) as ParallelCtxStrategy.backward runs it: through
    ``handler.scaled_backward``, which may fold the average into the seed."""
    if handler is None:
        return lambda loss: loss.backward()

    def backward(loss: torch.Tensor) -> None:
        with handler.scaled_backward(loss) as seeded:
            seeded.backward()
    return backward


def _train(model: nn.Module, run: nn.Module, finish: Callable[[], None], no_sync: Callable, rank: int, *,
           steps: int, micro: int, opt: str, set_to_none: Callable[[int], bool] = lambda s: True,
           dtype: torch.dtype = torch.float32, backward: Callable[[torch.Tensor], None] = _backward_through(None),
           ) -> tuple[list[list[torch.Tensor | None]], list[torch.Tensor]]:
    """Train ``steps`` optimizer steps of ``micro`` micro-batches; return grads per step and final weights."""
    params = list(model.parameters())
    optim = (torch.optim.SGD(params, lr=0.05, momentum=0.9) if opt == "sgd"
             else torch.optim.AdamW(params, lr=0.01, weight_decay=0.1))
    grads = []
    for step in range(steps):
        optim.zero_grad(set_to_none=set_to_none(step))
        for m in range(micro):
            with no_sync() if m < micro - 1 else contextlib.nullcontext():
                backward(run(_batch(rank, step, m, dtype), rank, step))
        finish()
        grads.append([None if p.grad is None else p.grad.detach().clone() for p in params])
        optim.step()
    return grads, [p.detach().clone() for p in params]


def _compare(ours: tuple, ref: tuple, exact: bool, rtol: float) -> tuple[list[str], int]:
    errors, n = [], 0
    for step, (ga, gb) in enumerate(zip(ours[0], ref[0])):
        for i, (a, b) in enumerate(zip(ga, gb)):
            n += 1
            if (msg := _diff(a, b, exact, rtol)) is not None:
                errors.append(f"step {step} grad #{i}: {msg}")
    for i, (a, b) in enumerate(zip(ours[1], ref[1])):
        n += 1
        if (msg := _diff(a, b, exact, rtol)) is not None:
            errors.append(f"final weight #{i}: {msg}")
    return errors, n


def _vs_ddp(rank: int, ctx: ParallelContext | None, model_name: str, spec: object = "bucketed", *,
            steps: int = 3, micro: int = 1, opt: str = "sgd", exact: bool = True, rtol: float = 1e-6,
            set_to_none: Callable[[int], bool] = lambda s: True, seeded: bool = False,
            **handler_kwargs: object) -> tuple[list[str], int]:
    """Our handler against torch DDP over the dense replica group, same data, same optimizer;
    ``seeded``: our backward runs through ``handler.scaled_backward`` (as the strategy's does)."""
    group = ctx.get_group("dense_replica") if ctx is not None else None
    ref_model = _build(model_name)
    ddp = nn.parallel.DistributedDataParallel(ref_model, process_group=group,
                                              find_unused_parameters=model_name == "unused")
    ref = _train(ref_model, ddp, lambda: None, ddp.no_sync, rank, steps=steps, micro=micro, opt=opt,
                 set_to_none=set_to_none)
    model = _build(model_name)
    handler = get_gradient_handler(spec, **handler_kwargs)
    run = handler.setup(model, ctx)
    ours = _train(model, run, handler.finish, handler.no_sync, rank, steps=steps, micro=micro, opt=opt,
                  set_to_none=set_to_none, backward=_backward_through(handler if seeded else None))
    handler.remove()
    return _compare(ours, ref, exact, rtol)


def _local_grads(model: nn.Module, rank: int, steps: int, micro: int) -> list[list[torch.Tensor | None]]:
    """Per step, this rank's own accumulated gradients (no communication), weights held fixed."""
    out = []
    for step in range(steps):
        model.zero_grad(set_to_none=True)
        for m in range(micro):
            model(_batch(rank, step, m), rank, step).backward()
        out.append([None if p.grad is None else p.grad.detach().clone() for p in model.parameters()])
    return out


def _expected(ctx: ParallelContext, model: nn.Module, local: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Hand-computed: SP params summed over each replica's TENSOR group, everything summed over its
    replica group (dense_replica, or expert_replica for experts) and divided by the data-parallel
    size (dense_replica): the gradient of the loss averaged over every data shard."""
    world = dist.get_world_size()
    tensor_groups = {r: g for g in ctx.all_groups("tensor") for r in g}
    out = []
    for p, g in zip(model.parameters(), local):
        everyone = [torch.empty_like(p, dtype=torch.float64) for _ in range(world)]
        dist.all_gather(everyone, (g if g is not None else torch.zeros_like(p)).double())
        replicas = ctx.get_ranks_in_group("expert_replica" if is_expert(p) else "dense_replica")
        members = [s for q in replicas for s in (tensor_groups[q] if is_sequence_parallel(p) else (q,))]
        out.append((sum(everyone[s] for s in members) / ctx.get_world_size("dense_replica")).to(p.dtype))
    return out


class Mixture(nn.Module):
    """Dense, tensor-parallel-shard, sequence-parallel (LayerNorm) and expert parameters."""

    def __init__(self, ctx: ParallelContext, experts: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(12, 16)
        self.norm = nn.LayerNorm(16)
        torch.manual_seed(100 + ctx.tp_rank)  # each TENSOR rank holds a different shard
        self.shard = nn.Linear(16, 16)
        torch.manual_seed(200 + ctx.ep_rank)  # each EXPERT rank holds different experts
        self.experts = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))
        torch.manual_seed(1)
        self.out = nn.Linear(16, 4)
        with torch.no_grad():  # LayerNorm's affine starts at 1/0: make its gradients less special
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)
        for p in self.experts.parameters() if experts else ():
            mark_expert(p)
        for p in self.norm.parameters():
            mark_sequence_parallel(p)
        mark_tensor_parallel(self.shard.weight, 0)
        mark_tensor_parallel(self.shard.bias, 0)

    def forward(self, x: torch.Tensor, rank: int, step: int) -> torch.Tensor:
        h = torch.relu(self.shard(self.norm(self.inp(x))))
        h = self.experts[0](h) + torch.tanh(self.experts[1](h))
        return self.out(h).square().mean()


def _vs_reference(rank: int, ctx: ParallelContext, spec: str = "bucketed", steps: int = 2, micro: int = 2,
                  rtol: float = 1e-6, seeded: bool = False, **kwargs: object) -> tuple[list[str], int]:
    """Mixture model: the handler's gradients against the hand-computed reduction (weights fixed)."""
    ref_model = Mixture(ctx)
    local = _local_grads(ref_model, rank, steps, micro)
    model = Mixture(ctx)
    handler = get_gradient_handler(spec, **kwargs)
    run = handler.setup(model, ctx)
    backward = _backward_through(handler if seeded else None)
    errors, n = [], 0
    for step in range(steps):
        model.zero_grad(set_to_none=True)
        for m in range(micro):
            with handler.no_sync() if m < micro - 1 else contextlib.nullcontext():
                backward(run(_batch(rank, step, m), rank, step))
        handler.finish()
        expected = _expected(ctx, ref_model, local[step])
        for (name, p), e in zip(model.named_parameters(), expected):
            n += 1
            if (msg := _diff(p.grad, e, False, rtol)) is not None:
                errors.append(f"step {step} {name}: {msg}")
    handler.remove()
    return errors, n


def _check(results: dict, name: str, fn: Callable[[], tuple[list[str], int]]) -> None:
    try:
        results[name] = fn()
    except Exception as err:  # noqa: BLE001 - reported per check, with the others still run
        results[name] = ([f"raised {type(err).__name__}: {err}"], 0)


def _assert_all(per_rank: list[dict]) -> None:
    failures = []
    for rank, results in enumerate(per_rank):
        for name, (errors, n) in results.items():
            if errors or n == 0:
                failures.append(f"rank {rank} {name}: {errors[:3] or 'compared nothing'}")
    assert not failures, "\n".join(failures)


def _expect_error(fn: Callable[[], object], exc: type[BaseException], words: str) -> tuple[list[str], int]:
    try:
        fn()
    except exc as err:
        return ([] if words in str(err) else [f"message lacks {words!r}: {err}"]), 1
    return [f"no {exc.__name__} raised"], 1


# ------------------------------------------------------------------------------------ 2 ranks
def _two_ranks(rank: int, world: int) -> dict:
    ctx = ParallelContext.from_torch(data_parallel_size=world)
    r: dict = {}
    tiny = 0.0005  # MB: about one parameter per bucket, so ordering and partial buckets are exercised
    _check(r, "mlp", lambda: _vs_ddp(rank, ctx, "mlp"))
    _check(r, "mlp small buckets, first bucket cap", lambda: _vs_ddp(rank, ctx, "mlp", bucket_cap_mb=tiny,
                                                                      first_bucket_cap_mb=0.0001))
    _check(r, "mlp accumulation x3", lambda: _vs_ddp(rank, ctx, "mlp", micro=3))
    _check(r, "mlp zero_grad set_to_none alternating",
           lambda: _vs_ddp(rank, ctx, "mlp", steps=4, micro=2, set_to_none=lambda s: s % 2 == 0))
    _check(r, "layernorm adamw accumulation", lambda: _vs_ddp(rank, ctx, "layernorm", micro=2, opt="adamw"))
    _check(r, "layernorm small buckets", lambda: _vs_ddp(rank, ctx, "layernorm", bucket_cap_mb=tiny))
    _check(r, "tied", lambda: _vs_ddp(rank, ctx, "tied", opt="adamw"))
    _check(r, "tied accumulation", lambda: _vs_ddp(rank, ctx, "tied", micro=2, bucket_cap_mb=tiny))
    _check(r, "unused", lambda: _vs_ddp(rank, ctx, "unused", steps=4))
    _check(r, "unused adamw small buckets", lambda: _vs_ddp(rank, ctx, "unused", steps=4, opt="adamw",
                                                            bucket_cap_mb=tiny))
    _check(r, "unused accumulation", lambda: _vs_ddp(rank, ctx, "unused", steps=4, micro=2))
    _check(r, "channels_last conv, accumulation", lambda: _vs_ddp(rank, ctx, "conv", micro=2,
                                                                  set_to_none=lambda s: s != 1))
    _check(r, "no context: world group", lambda: _vs_ddp(rank, None, "mlp", micro=2))
    _check(r, "baseline allreduce", lambda: _vs_ddp(rank, ctx, "mlp", "allreduce", micro=2))
    _check(r, "baseline allreduce unused", lambda: _vs_ddp(rank, ctx, "unused", "allreduce", steps=4))
    _check(r, "ddp handler", lambda: _vs_ddp(rank, ctx, "layernorm", "ddp", micro=2))
    _check(r, "compress fp16", lambda: _vs_ddp(rank, ctx, "layernorm", exact=False, rtol=2e-3, compress="fp16"))
    _check(r, "compress bf16", lambda: _vs_ddp(rank, ctx, "mlp", exact=False, rtol=2e-2, compress="bf16"))
    _check(r, "reduce_dtype fp32 for bf16 params", lambda: _reduce_dtype(rank, ctx))
    _check(r, "grads are bucket views across zero_grad", lambda: _views(rank, ctx))
    # In-place reduction (in_place_mb): every parameter (ALL), or the weights in place and the
    # biases / norms in buckets (SOME); the same results as DDP, bit for bit.
    _check(r, "in place: mlp", lambda: _vs_ddp(rank, ctx, "mlp", in_place_mb=ALL))
    _check(r, "in place: mlp accumulation, set_to_none alternating",
           lambda: _vs_ddp(rank, ctx, "mlp", steps=4, micro=2, set_to_none=lambda s: s % 2 == 0, in_place_mb=ALL))
    _check(r, "in place + buckets: layernorm adamw accumulation",
           lambda: _vs_ddp(rank, ctx, "layernorm", micro=2, opt="adamw", in_place_mb=SOME, bucket_cap_mb=tiny))
    _check(r, "in place: tied accumulation", lambda: _vs_ddp(rank, ctx, "tied", micro=2, in_place_mb=ALL))
    _check(r, "in place: unused", lambda: _vs_ddp(rank, ctx, "unused", steps=4, in_place_mb=ALL))
    _check(r, "in place + buckets: unused adamw accumulation, set_to_none alternating",
           lambda: _vs_ddp(rank, ctx, "unused", steps=4, micro=2, opt="adamw", in_place_mb=SOME,
                           set_to_none=lambda s: s % 2 == 0))
    _check(r, "in place: channels_last conv (buckets keep its layout)",
           lambda: _vs_ddp(rank, ctx, "conv", micro=2, in_place_mb=ALL))
    _check(r, "in place: no copy, accumulation into the same .grad", lambda: _in_place_grads(rank, ctx))
    # The average folded into the backward's seed (scaled_backward, the strategy's path): bit-exact
    # with DDP where it applies, and the fall-backs (accumulation, gradients not reset) as well.
    _check(r, "seeded: mlp", lambda: _vs_ddp(rank, ctx, "mlp", seeded=True))
    _check(r, "seeded: mlp in place", lambda: _vs_ddp(rank, ctx, "mlp", seeded=True, in_place_mb=ALL))
    _check(r, "seeded: layernorm adamw, in place + small buckets",
           lambda: _vs_ddp(rank, ctx, "layernorm", opt="adamw", seeded=True, in_place_mb=SOME, bucket_cap_mb=tiny))
    _check(r, "seeded: tied", lambda: _vs_ddp(rank, ctx, "tied", opt="adamw", seeded=True))
    _check(r, "seeded: unused, small buckets", lambda: _vs_ddp(rank, ctx, "unused", steps=4, seeded=True,
                                                               bucket_cap_mb=tiny))
    _check(r, "seeded: channels_last conv", lambda: _vs_ddp(rank, ctx, "conv", seeded=True))
    _check(r, "seeded: accumulation x3 (falls back)", lambda: _vs_ddp(rank, ctx, "mlp", micro=3, seeded=True))
    _check(r, "seeded: set_to_none alternating (falls back)",
           lambda: _vs_ddp(rank, ctx, "unused", steps=4, micro=1, seeded=True, set_to_none=lambda s: s % 2 == 0))
    _check(r, "seeded: compress bf16 (not seeded)",
           lambda: _vs_ddp(rank, ctx, "mlp", exact=False, rtol=2e-2, compress="bf16", seeded=True))
    _check(r, "seeded: when it applies, and a mixed window refused", lambda: _seed_rules(rank, ctx))
    _check(r, "seeded: never with a parameter the hook leaves alone", lambda: _seed_needs_every_parameter(rank, ctx))
    _check(r, "finish idempotent / without backward", lambda: _finish_semantics(rank, ctx))
    _check(r, "double backward refused", lambda: _double_backward(rank, ctx))
    _check(r, "remove unhooks", lambda: _remove(rank, ctx))
    _check(r, "expert param needs a context", lambda: _expect_error(
        lambda: DataParallelGradientHook(mark_expert_model(), None), ParallelCtxError, "ParallelContext"))
    return r


ALL, SOME = 1e-9, 0.001  # in_place_mb: every parameter; only those of >= 1 KiB (the weights)


def _seed_needs_every_parameter(rank: int, ctx: ParallelContext) -> tuple[list[str], int]:
    """One layer sharded by torch's fully_shard: FSDP2 reduces (and averages) its gradients, the
    hook leaves it alone. A seed scaled by 1/2 would halve them once more with nothing to undo it:
    the hook itself (not only the handler) keeps the seed at 1 then."""
    from torch.distributed.fsdp import fully_shard

    errors: list[str] = []
    plain = DataParallelGradientHook(_build("mlp"), ctx)
    if plain.seed_factor != 0.5:
        errors.append(f"plain parameters over 2 ranks: seed factor {plain.seed_factor}, expected 0.5")
    plain.remove()
    model = _build("mlp")
    fully_shard(model.l2, mesh=ctx.device_mesh["dp"])
    hook = DataParallelGradientHook(model, ctx)
    if "l2.weight" in {n for b in hook.buckets for n in b["params"]}:
        errors.append("the hook took FSDP2's parameters")
    loss = model(_batch(rank, 0, 0), rank, 0)
    with hook.scaled_backward(loss) as seeded:
        if hook.seed_factor != 1.0 or seeded is not loss:
            errors.append(f"FSDP2 parameters beside the hook's, yet seed factor {hook.seed_factor}")
        seeded.backward()  # FSDP2 reshards l2 after its backward: the next setup sees it sharded
    hook.finish()
    hook.remove()
    handler = get_gradient_handler("bucketed")
    handler.setup(model, ctx)
    loss = model(_batch(rank, 0, 1), rank, 0)
    with handler.scaled_backward(loss) as seeded:
        if seeded is not loss:
            errors.append("the handler scaled the seed beside FSDP2's parameters")
        seeded.backward()
    handler.finish()
    handler.remove()
    return errors, 4


def _seed_rules(rank: int, ctx: ParallelContext) -> tuple[list[str], int]:
    """The seed is scaled only where that is exact, and only the seed: the loss keeps its value."""
    errors: list[str] = []
    model = _build("mlp")
    handler = get_gradient_handler("bucketed")
    handler.setup(model, ctx)
    hook = handler.hook
    loss = model(_batch(rank, 0, 0), rank, 0)
    with handler.scaled_backward(loss) as seeded:
        if seeded is loss or not torch.equal(seeded, loss) or hook.exact_seed() != 0.5:
            errors.append(f"fresh gradients, 2 replicas: seed {hook.exact_seed()}, value {seeded} vs {loss}")
        seeded.backward()
    handler.finish()
    if hook.exact_seed() != 1.0:  # .grad now holds averaged gradients: old + new/2 would be wrong
        errors.append(f"gradients present: seed {hook.exact_seed()}, expected 1.0")
    model.zero_grad(set_to_none=True)
    with handler.no_sync():
        if hook.exact_seed() != 1.0:
            errors.append("inside no_sync the seed must stay 1 (DDP's local gradients)")
    # A window whose backward passes are seeded differently cannot be averaged: refused, clearly.
    # Here a seeded backward reached only l3, then a plain one (no finish() between) reaches all.
    head_only = model.l3(torch.randn(5, 24)).square().mean()
    with hook.scaled_backward(head_only) as seeded:
        seeded.backward()
    loss = model(_batch(rank, 0, 1), rank, 0)
    try:
        loss.backward()
        errors.append("a window mixing seeds 0.5 and 1 was accepted")
    except RuntimeError as err:
        if "seeded with 1.0" not in str(err) or "seeded with 0.5" not in str(err) or "finish()" not in str(err):
            errors.append(f"unclear error: {err}")
    handler.remove()
    plain = get_gradient_handler("bucketed", average_in_backward=False)
    plain.setup(_build("mlp"), ctx)
    with plain.scaled_backward(loss) as seeded:
        if seeded is not loss:
            errors.append("average_in_backward=False still scaled the seed")
    plain.remove()
    return errors, 5


def _in_place_grads(rank: int, ctx: ParallelContext) -> tuple[list[str], int]:
    """In-place parameters keep the .grad backward made (no bucket storage); with
    set_to_none=False the next backward accumulates into that same tensor."""
    errors, n = [], 0
    model = _build("mlp")
    hook = DataParallelGradientHook(model, ctx, in_place_mb=SOME)
    in_place = {name for b in hook.buckets if b["in_place"] for name in b["params"]}
    if in_place != {"l1.weight", "l2.weight"}:
        errors.append(f"in-place parameters {sorted(in_place)}, expected the two larger weights")
    storages = {b.data_ptr() for b in hook.communication_buffers()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ptrs = None
    for step in range(4):
        opt.zero_grad(set_to_none=step < 2)
        if step == 3:
            ptrs = [p.grad.data_ptr() for p in model.parameters()]
        model(_batch(rank, step, 0), rank, step).backward()
        hook.finish()
        for name, p in model.named_parameters():
            n += 1
            if (p.grad.untyped_storage().data_ptr() in storages) == (name in in_place):
                errors.append(f"step {step} {name}: in a bucket's storage: {name not in in_place}")
        opt.step()
    if ptrs != [p.grad.data_ptr() for p in model.parameters()]:
        errors.append("backward after zero_grad(set_to_none=False) replaced a .grad")
    hook.remove()
    return errors, n


def mark_expert_model() -> nn.Module:
    model = MLP()
    mark_expert(model.l2.weight)
    return model


def _reduce_dtype(rank: int, ctx: ParallelContext) -> tuple[list[str], int]:
    """bf16 params: reducing in fp32 gives the fp32 average rounded once to bf16."""
    errors, n = [], 0
    model = _build("layernorm", torch.bfloat16)
    hook = DataParallelGradientHook(model, ctx, reduce_dtype="fp32")
    if any(b["comm_dtype"] != torch.float32 for b in hook.buckets):
        errors.append(f"buckets do not communicate in fp32: {hook.buckets}")
    ref = _build("layernorm", torch.bfloat16)
    ref(_batch(rank, 0, 0, torch.bfloat16), rank, 0).backward()
    model(_batch(rank, 0, 0, torch.bfloat16), rank, 0).backward()
    hook.finish()
    for p, q in zip(model.parameters(), ref.parameters()):
        both = [torch.empty_like(q.grad, dtype=torch.float32) for _ in range(2)]
        dist.all_gather(both, q.grad.float())
        expected = ((both[0] + both[1]) / 2).to(torch.bfloat16)
        n += 1
        if not torch.equal(p.grad, expected):
            errors.append(f"max |diff| {(p.grad.float() - expected.float()).abs().max().item():.3e}")
        if p.grad.dtype != torch.bfloat16:
            errors.append(f"grad dtype {p.grad.dtype}")
    hook.remove()
    return errors, n


def _views(rank: int, ctx: ParallelContext) -> tuple[list[str], int]:
    """docs/traps.md #16: after zero_grad(set_to_none=True) the next backward's gradients end up in the
    buckets again; with set_to_none=False the backward accumulates straight into the views."""
    errors, n = [], 0
    model = _build("mlp")
    hook = DataParallelGradientHook(model, ctx, bucket_cap_mb=0.0005)
    storages = {b.data_ptr() for b in hook.communication_buffers()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ptrs = None
    for step in range(4):
        opt.zero_grad(set_to_none=step < 2)
        if step < 2 and any(p.grad is not None for p in model.parameters()):
            errors.append("zero_grad(set_to_none=True) left a grad")
        if step == 3:
            ptrs = [p.grad.data_ptr() for p in model.parameters()]
        model(_batch(rank, step, 0), rank, step).backward()
        hook.finish()
        for p in model.parameters():
            n += 1
            if p.grad.untyped_storage().data_ptr() not in storages:
                errors.append(f"step {step}: a grad is not a view into a bucket")
        opt.step()
    if ptrs != [p.grad.data_ptr() for p in model.parameters()]:
        errors.append("backward after zero_grad(set_to_none=False) replaced the views")
    hook.remove()
    return errors, n


def _finish_semantics(rank: int, ctx: ParallelContext) -> tuple[list[str], int]:
    """finish() twice, or with no backward, must not communicate: rank 0 does it alone and a
    collective would hang until the spawn timeout."""
    errors = []
    model = _build("mlp")
    handler = get_gradient_handler("bucketed")
    handler.setup(model, ctx)
    if rank == 0:
        handler.finish()  # no backward yet
    model(_batch(rank, 0, 0), rank, 0).backward()
    handler.finish()
    snapshot = [p.grad.clone() for p in model.parameters()]
    if rank == 0:
        handler.finish()
        handler.finish()
    if not all(torch.equal(a, p.grad) for a, p in zip(snapshot, model.parameters())):
        errors.append("a second finish() changed the gradients")
    with handler.no_sync():  # finish inside no_sync: nothing to do yet
        model(_batch(rank, 1, 0), rank, 1).backward()
        if rank == 1:
            handler.finish()
    handler.finish()  # the accumulated gradients are reduced now
    dist.barrier()
    handler.remove()
    return errors, 1


def _double_backward(rank: int, ctx: ParallelContext) -> tuple[list[str], int]:
    model = _build("mlp")
    hook = DataParallelGradientHook(model, ctx)
    model(_batch(rank, 0, 0), rank, 0).backward()
    result = _expect_error(lambda: model(_batch(rank, 0, 1), rank, 0).backward(), RuntimeError, "no_sync()")
    hook.remove()
    return result


def _remove(rank: int, ctx: ParallelContext) -> tuple[list[str], int]:
    """After remove() backward is purely local: only rank 0 runs one, nothing waits for rank 1."""
    model = _build("mlp")
    hook = DataParallelGradientHook(model, ctx)
    hook.remove()
    hook.remove()
    model.zero_grad(set_to_none=True)
    if rank == 0:
        model(_batch(rank, 0, 0), rank, 0).backward()
    ref = _build("mlp")
    if rank == 0:
        ref(_batch(rank, 0, 0), rank, 0).backward()
    same = all((p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)
               for p, q in zip(model.parameters(), ref.parameters()))
    dist.barrier()
    return ([] if same else ["gradients changed after remove()"]), 1


@pytest.mark.slow
def test_two_ranks_bit_exact_with_ddp_and_semantics() -> None:
    _assert_all(spawn(_two_ranks, 2, timeout=240))


# ------------------------------------------------------------------------------------ 4 and 8 ranks
def _many_ranks(rank: int, world: int) -> dict:
    r: dict = {}
    flat = ParallelContext.from_torch(data_parallel_size=world)
    _check(r, "mlp accumulation", lambda: _vs_ddp(rank, flat, "mlp", micro=2, exact=False))
    _check(r, "tied adamw", lambda: _vs_ddp(rank, flat, "tied", opt="adamw", exact=False, bucket_cap_mb=0.0005))
    _check(r, "unused", lambda: _vs_ddp(rank, flat, "unused", steps=4, exact=False))
    _check(r, "unused in place", lambda: _vs_ddp(rank, flat, "unused", steps=4, micro=2, exact=False, in_place_mb=ALL))
    _check(r, "seeded", lambda: _vs_ddp(rank, flat, "layernorm", opt="adamw", exact=False, seeded=True))
    _check(r, "layernorm", lambda: _vs_ddp(rank, flat, "layernorm", micro=2, opt="adamw", exact=False))
    if world == 4:
        # ep=2, dp=2: dense over all 4 ranks, experts summed over their 2 data-parallel peers, both / 4.
        moe = ParallelContext.from_torch(data_parallel_size=2, expert_parallel_size=2)
        _check(r, "dense layernorm vs ddp over dense_replica",
               lambda: _vs_ddp(rank, moe, "layernorm", micro=2, exact=False))
        _check(r, "dense+expert vs hand reference", lambda: _vs_reference(rank, moe))
        _check(r, "dense+expert small buckets", lambda: _vs_reference(rank, moe, bucket_cap_mb=0.0005))
        _check(r, "dense+expert in place", lambda: _vs_reference(rank, moe, in_place_mb=ALL))
        _check(r, "dense+expert seeded (1/4 in the seed)", lambda: _vs_reference(rank, moe, micro=1, seeded=True))
        _check(r, "dense+expert baseline allreduce", lambda: _vs_reference(rank, moe, "allreduce"))
        _check(r, "ddp handler refuses experts", lambda: _expect_error(
            lambda: get_gradient_handler("ddp").setup(Mixture(moe), moe), ParallelCtxError, "expert"))
        # tp=2, dp=2: the LayerNorm is summed over TENSOR and averaged over DATA; shards only over DATA.
        tp = ParallelContext.from_torch(data_parallel_size=2, tensor_parallel_size=2)
        _check(r, "sequence-parallel sum over tensor", lambda: _vs_reference(rank, tp))
        _check(r, "sequence-parallel (buckets) + the rest in place", lambda: _vs_reference(rank, tp, in_place_mb=ALL))
        _check(r, "sequence-parallel seeded", lambda: _vs_reference(rank, tp, micro=1, seeded=True, in_place_mb=ALL))
        _check(r, "sequence-parallel fp16 compressed", lambda: _vs_reference(rank, tp, rtol=2e-3, compress="fp16"))
        _check(r, "ddp handler refuses sequence-parallel", lambda: _expect_error(
            lambda: get_gradient_handler("ddp").setup(Mixture(tp, experts=False), tp), ParallelCtxError, "sequence-parallel"))
    else:
        # tp=2, ep=2, dp=2: everything at once.
        full = ParallelContext.from_torch(data_parallel_size=2, tensor_parallel_size=2, expert_parallel_size=2)
        _check(r, "tp+ep+dp mixture vs hand reference", lambda: _vs_reference(rank, full))
        _check(r, "tp+ep+dp mixture in place", lambda: _vs_reference(rank, full, in_place_mb=ALL))
        _check(r, "tp+ep+dp mixture baseline allreduce", lambda: _vs_reference(rank, full, "allreduce", micro=1))
    return r


@pytest.mark.slow
def test_four_ranks_ddp_experts_and_sequence_parallel() -> None:
    _assert_all(spawn(_many_ranks, 4, timeout=240))


@pytest.mark.slow
def test_eight_ranks_ddp_and_full_mixture() -> None:
    _assert_all(spawn(_many_ranks, 8, timeout=300))


# ------------------------------------------------------------------------------------ registry (1 process)
def test_registry_names_classes_instances_and_class_paths() -> None:
    assert {"bucketed", "ddp", "allreduce"} <= set(available_gradient_handlers())
    default = get_gradient_handler()
    assert type(default) is BucketedGradientHandler and default.bucket_cap_mb == 25.0
    assert get_gradient_handler("bucketed", bucket_cap_mb=4).bucket_cap_mb == 4
    assert type(get_gradient_handler("ddp")) is DDPGradientHandler
    assert type(get_gradient_handler("allreduce")) is FlatAllReduceGradientHandler
    built = get_gradient_handler(BucketedGradientHandler, compress="bf16")
    assert built.compress == "bf16" and get_gradient_handler(built) is built
    with pytest.raises(TypeError, match="already built"):
        get_gradient_handler(built, bucket_cap_mb=1)
    from_yaml = get_gradient_handler({"class_path": "lightning_parallelctx.grad_sync.DDPGradientHandler",
                                      "init_args": {"gradient_as_bucket_view": True}})
    assert from_yaml.ddp_kwargs["gradient_as_bucket_view"] is True
    assert get_gradient_handler({"class_path": "bucketed", "init_args": {"bucket_cap_mb": 2}},
                                bucket_cap_mb=3).bucket_cap_mb == 3
    with pytest.raises(ValueError, match="registered names are"):
        get_gradient_handler("no-such-handler")
    with pytest.raises(ValueError, match="cannot import"):
        get_gradient_handler("no_such_module.Handler")
    with pytest.raises(TypeError, match="not a GradientHandler"):
        get_gradient_handler("torch.nn.Linear")
    with pytest.raises(ValueError, match="class_path"):
        get_gradient_handler({"init_args": {}})
    with pytest.raises(TypeError, match="cannot build"):
        get_gradient_handler("bucketed", no_such_option=1)


class CountingHandler(GradientHandler):
    """A user-written handler: averages over the world after backward, counting its calls."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.calls = 0
        self.module: nn.Module | None = None

    def setup(self, module: nn.Module, ctx: ParallelContext | None) -> nn.Module:
        self.module = module
        return module

    def finish(self) -> None:
        if self.require_sync:
            self.calls += 1
            for p in self.module.parameters():
                if p.grad is not None:
                    p.grad.mul_(self.scale)


def test_user_handlers_register_by_decorator_and_class_path() -> None:
    register_gradient_handler("counting", CountingHandler)
    register_gradient_handler("counting", CountingHandler)  # same class again: fine

    @register_gradient_handler
    class Mine(CountingHandler):
        name = "mine-test"

    assert "mine-test" in available_gradient_handlers()
    with pytest.raises(ValueError, match="taken"):
        register_gradient_handler("counting", Mine)
    register_gradient_handler("counting", Mine, override=True)
    assert type(get_gradient_handler("counting")) is Mine
    register_gradient_handler("counting", CountingHandler, override=True)
    with pytest.raises(TypeError, match="not a GradientHandler"):
        register_gradient_handler("bad", nn.Linear)
    with pytest.raises(TypeError):
        GradientHandler()  # abstract

    handler = get_gradient_handler({"class_path": f"{__name__}.CountingHandler", "init_args": {"scale": 0.5}})
    model = MLP()
    assert handler.setup(model, None) is model
    model(_batch(0, 0, 0), 0, 0).backward()
    before = [p.grad.clone() for p in model.parameters()]
    with handler.no_sync():
        assert not handler.require_sync
        handler.finish()
    assert handler.require_sync and handler.calls == 0
    handler.finish()
    assert handler.calls == 1
    assert all(torch.equal(p.grad, b * 0.5) for p, b in zip(model.parameters(), before))
    handler.remove()


def test_single_process_hook_is_a_no_op_and_options_are_checked() -> None:
    model = MLP()
    hook = DataParallelGradientHook(model, None)  # no process group: nothing to reduce
    assert hook.buckets == []
    model(_batch(0, 0, 0), 0, 0).backward()
    before = [p.grad.clone() for p in model.parameters()]
    hook.finish()
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))
    with pytest.raises(ValueError, match="contradict"):
        DataParallelGradientHook(model, None, reduce_dtype="fp32", compress="fp16")
    with pytest.raises(ValueError, match="16-bit"):
        DataParallelGradientHook(model, None, compress="fp32")
    with pytest.raises(ValueError, match="not a dtype"):
        DataParallelGradientHook(model, None, reduce_dtype="fp31")
    with pytest.raises(ValueError, match="bucket_cap_mb"):
        DataParallelGradientHook(model, None, bucket_cap_mb=0)
    with pytest.raises(ValueError, match="in_place_mb must be > 0 or None, got -1"):
        DataParallelGradientHook(model, None, in_place_mb=-1)
    with pytest.raises(TypeError, match="average_in_backward must be True or False, got 'yes'"):
        get_gradient_handler("bucketed", average_in_backward="yes")


def test_strategy_gradient_handler_validates_in_lightning_cli_yaml() -> None:
    """``ParallelCtxStrategy(gradient_handler: str | GradientHandler)``, parsed as LightningCLI parses
    ``trainer.strategy`` (a ``Strategy`` subclass named by class_path): a handler's class_path/init_args
    are checked against the handler's signature and built into an instance the strategy keeps as a
    template; a bad init_arg is rejected at parse time; names and plain dicts still work."""
    import pickle

    from jsonargparse import ArgumentError, ArgumentParser
    from lightning.pytorch.strategies import Strategy

    from lightning_parallelctx import ParallelCtxStrategy
    from lightning_parallelctx.lightning._grad_sync import make_gradient_handler

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--strategy", type=Strategy)  # as Trainer(strategy=...) is seen by LightningCLI
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes

    def strategy_from_yaml(handler_yaml: str) -> ParallelCtxStrategy:
        cfg = parser.parse_string("strategy:\n  class_path: lightning_parallelctx.ParallelCtxStrategy\n"
                                  "  init_args:\n    tensor_parallel_size: 2\n" + handler_yaml)
        return instantiate(cfg).strategy

    strategy = strategy_from_yaml(
        "    gradient_handler:\n      class_path: lightning_parallelctx.grad_sync.BucketedGradientHandler\n"
        "      init_args:\n        bucket_cap_mb: 8\n        compress: bf16\n")
    assert type(strategy) is ParallelCtxStrategy
    template = strategy._gradient_handler_spec
    assert type(template) is BucketedGradientHandler
    assert template.bucket_cap_mb == 8 and template.compress == "bf16"
    # Each fit gets its own copy of the template (a handler holds hooks on one module).
    first, second = make_gradient_handler(template), make_gradient_handler(template)
    assert first is not template and second is not first
    assert type(first) is BucketedGradientHandler and (first.bucket_cap_mb, first.compress) == (8, "bf16")
    restored = pickle.loads(pickle.dumps(strategy._gradient_handler_spec))  # plain, picklable config
    assert (restored.bucket_cap_mb, restored.compress) == (8, "bf16")

    # A bad init_arg fails while parsing, naming the argument (jsonargparse checks the signature).
    with pytest.raises(ArgumentError, match=r"bucket_cap_mb[\s\S]*lots") as bad:
        strategy_from_yaml("    gradient_handler:\n      class_path: lightning_parallelctx.grad_sync.BucketedGradientHandler\n"
                           "      init_args:\n        bucket_cap_mb: lots\n")
    assert "gradient_handler" in str(bad.value)
    with pytest.raises(ArgumentError, match="no_such_option"):  # an argument the handler does not take
        strategy_from_yaml("    gradient_handler:\n      class_path: lightning_parallelctx.grad_sync.DDPGradientHandler\n"
                           "      init_args:\n        no_such_option: 1\n")
    # A class that is not a GradientHandler.
    with pytest.raises(ArgumentError, match="gradient_handler[\\s\\S]*torch.nn.Linear"):
        strategy_from_yaml("    gradient_handler:\n      class_path: torch.nn.Linear\n")
    # A registered name stays a string; from Python a class_path dict and an instance still work.
    assert strategy_from_yaml("    gradient_handler: ddp\n")._gradient_handler_spec == "ddp"
    spec = {"class_path": "lightning_parallelctx.grad_sync.DDPGradientHandler", "init_args": {"bucket_cap_mb": 4}}
    assert type(make_gradient_handler(ParallelCtxStrategy(gradient_handler=spec)._gradient_handler_spec)) is DDPGradientHandler
    ParallelCtxStrategy(gradient_handler=BucketedGradientHandler(bucket_cap_mb=2))


def test_seed_factor_only_where_scaling_the_seed_is_exact() -> None:
    from types import SimpleNamespace

    from lightning_parallelctx.grad_sync.hook import _exact_seed_factor

    def bucket(divisor: int, kind: str = "bucket", cast: bool = False) -> SimpleNamespace:
        return SimpleNamespace(kind=kind, scale=1.0 / divisor, hook_scale=1.0 if cast else 1.0 / divisor)

    assert _exact_seed_factor([bucket(2), bucket(2, "in_place"), bucket(1, "flags")]) == 0.5
    assert _exact_seed_factor([bucket(8)]) == 0.125
    assert _exact_seed_factor([bucket(3)]) == 1.0  # 1/3 scales inexactly: the hook's pass keeps DDP's rounding
    assert _exact_seed_factor([bucket(6), bucket(6)]) == 1.0
    assert _exact_seed_factor([bucket(2), bucket(4)]) == 1.0  # two factors: one seed cannot carry both
    assert _exact_seed_factor([bucket(2, cast=True)]) == 1.0  # scaled while casting (compress / reduce_dtype)
    assert _exact_seed_factor([bucket(1)]) == 1.0
