"""The data-parallel gradient hook: flat buckets, gradient views, async bucketed all-reduce.

Design notes (why it is shaped like this):

- Each bucketed parameter's ``.grad`` becomes a view into a flat bucket, so communication reads and
  writes the gradients in place and nothing is copied back after the all-reduce.
- With ``zero_grad(set_to_none=True)`` (Lightning's default) the next backward allocates a fresh
  ``.grad`` (docs/traps.md #16). Re-pointing ``.grad`` at a zeroed view before backward would cost a
  zero-fill plus an accumulate (read 2, write 1) per element. Instead the post-accumulate hook
  sees the fresh tensor, copies it into its view while scaling by 1/replicas (one pass, the same
  traffic as DDP with ``gradient_as_bucket_view=True``) and re-points ``.grad`` at the view. When
  ``.grad`` already is the view (``set_to_none=False``, or accumulation), it is scaled in place.
- A parameter whose gradient is at least ``in_place_mb`` is all-reduced in place, as its own
  collective, in the tensor backward produced: no copy at all, only an in-place scale (half the
  memory traffic of copying into a bucket). Below that size the copy is cheaper than a collective's
  fixed cost, so small parameters share buckets. Those parameters' "used" flags (below) ride in
  one small extra collective launched right after the last of them.
- Averaging = scale before a SUM all-reduce: gloo has no AVG, and pre-scaling keeps fp16/bf16
  buckets from overflowing. For power-of-two replica counts it is bit-identical to DDP.
- That scale is a full pass over every gradient (10 ms of a 175 ms step for 96 MiB on the
  benchmark's core). :meth:`DataParallelGradientHook.scaled_backward` folds it into the backward's
  seed instead: the loss's gradient starts at 1/replicas, so every gradient arrives already
  averaged-to-be and the hook only sums. Multiplying by a power of two commutes exactly with every
  float operation of a backward that is linear in its seed (all of autograd's, barring overflow and
  subnormals), so the result is bit-identical; it is used only when it is (power-of-two replicas,
  one factor for every parameter, every gradient fresh, a synchronising backward), else the pass
  runs as before.
- Buckets are launched strictly in one fixed order (reverse parameter order, like DDP), whatever
  order they complete in, so every rank issues the same collectives in the same sequence.
- Every bucket carries one extra element per parameter, set to 1 where this rank produced a
  gradient: after the SUM it counts the ranks that used the parameter, which gives DDP's
  ``find_unused_parameters=True`` semantics (globally unused -> ``.grad`` untouched, e.g. None)
  without a second collective.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ..dtensor import split_params
from ..errors import ParallelCtxError
from .base import SyncSwitch, as_dtype
from .groups import GroupResolver, ReductionPlan

if TYPE_CHECKING:
    from ..context import ParallelContext

__all__ = ["DataParallelGradientHook"]

_ALIGN_BYTES = 64  # each view starts on a cache line: vectorised copies stay aligned
_MB = 1024 * 1024


class _Slot:
    __slots__ = ("bucket", "name", "param", "ready", "restore", "seen", "unused", "view")

    def __init__(self, param: torch.nn.Parameter, name: str, bucket: _Bucket, view: torch.Tensor):
        self.param = param
        self.name = name
        self.bucket = bucket
        self.view = view
        self.ready = False  # absorbed into the bucket during the synchronising backward
        self.seen = False  # got a gradient since the last finish (any micro-batch)
        self.unused = False  # contributed zeros at launch: no gradient on this rank
        self.restore: torch.Tensor | None = None  # its .grad before launch, kept if globally unused


class _Bucket:
    __slots__ = (
        "buffer",
        "comm",
        "comm_dtype",
        "comm_grads",
        "covers",
        "dtype",
        "flags",
        "grads",
        "has_unused",
        "hook_scale",
        "index",
        "kind",
        "numel",
        "pending",
        "plan",
        "scale",
        "slots",
        "upcast",
        "work",
    )

    def __init__(self, plan: ReductionPlan, dtype: torch.dtype, comm_dtype: torch.dtype):
        self.plan = plan
        self.dtype = dtype
        self.comm_dtype = comm_dtype
        self.slots: list[_Slot] = []
        self.numel = 0
        self.index = -1
        self.scale = 1.0 / plan.divisor
        # Same dtype: scale while copying into the bucket (one pass). Otherwise the bucket holds
        # raw gradients and the scale is applied while casting into the communication buffer.
        self.hook_scale = self.scale if comm_dtype == dtype else 1.0
        self.upcast = comm_dtype.itemsize > dtype.itemsize
        self.pending = 0
        self.has_unused = False
        self.work: Any = None
        # "bucket": a flat bucket of views. "in_place": one parameter reduced in its own .grad
        # (``comm`` is set at launch). "flags": the used-flags of the in-place buckets in ``covers``.
        self.kind = "bucket"
        self.covers: list[_Bucket] = []

    @property
    def two_stage(self) -> bool:
        return self.plan.tensor is not None and self.plan.replica is not None


class DataParallelGradientHook(SyncSwitch):
    """Synchronise a module's gradients over exactly the ranks holding replicas of each parameter.

    Usable with or without Lightning::

        hook = DataParallelGradientHook(model, ctx)           # ctx=None: plain DP over the world
        for step, batch in ...:
            opt.zero_grad(set_to_none=True)
            with hook.no_sync() if not last_micro_batch else contextlib.nullcontext():
                loss(model(batch)).backward()
            hook.finish()                                     # before clipping / opt.step()
            opt.step()

    Dense parameters are averaged over ``dense_replica`` (DATA x SEQUENCE x EXPERT), expert ones
    (``markers.is_expert``) over ``expert_replica`` (DATA x SEQUENCE); sequence-parallel-marked
    ones (``markers.is_sequence_parallel``) are first summed over ``tensor``. Parameters with
    ``requires_grad=False`` and parameters with nothing to reduce or scale are left alone.

    Unused parameters follow DDP's ``find_unused_parameters=True``: a parameter that got no
    gradient on any rank keeps its ``.grad`` (None after ``zero_grad(set_to_none=True)``); one
    that got a gradient on some ranks gets the average, with zeros from the others.
    """

    def __init__(self, module: torch.nn.Module | Iterable[tuple[str, torch.nn.Parameter]],
                 ctx: ParallelContext | None = None, *, bucket_cap_mb: float = 25.0,
                 first_bucket_cap_mb: float | None = None, reduce_dtype: str | torch.dtype | None = None,
                 compress: str | torch.dtype | None = None, in_place_mb: float | None = 4.0):
        if not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb!r}")
        if first_bucket_cap_mb is not None and not first_bucket_cap_mb > 0:
            raise ValueError(f"first_bucket_cap_mb must be > 0 or None, got {first_bucket_cap_mb!r}")
        self.reduce_dtype = as_dtype(reduce_dtype, "reduce_dtype")
        self.compress = as_dtype(compress, "compress")
        if self.reduce_dtype is not None and self.compress is not None:
            raise ValueError("reduce_dtype (reduce in a wider dtype) and compress (communicate in a narrower one) "
                             "contradict each other; set one of them")
        if self.compress is not None and self.compress.itemsize != 2:
            raise ValueError(f"compress must be a 16-bit dtype (fp16 or bf16), got {self.compress}")
        if in_place_mb is not None and not in_place_mb > 0:
            raise ValueError(f"in_place_mb must be > 0 or None, got {in_place_mb!r}")
        self.in_place_mb = in_place_mb
        self.bucket_cap_mb = float(bucket_cap_mb)
        self.first_bucket_cap_mb = first_bucket_cap_mb
        self.ctx = ctx
        self._window = False  # some gradient arrived since the last finish
        self._sync_started = False  # a synchronising backward has absorbed gradients
        self._next = 0  # index of the next bucket to launch
        self._handles: list[Any] = []
        self._seed = 1.0  # the seed factor of the backward running now (scaled_backward)
        self._window_seed: float | None = None  # the seed factor of this window's backward passes

        if not isinstance(module, torch.nn.Module):
            module = list(module)  # read twice: here and for the seed factor below
        # FSDP2-managed parameters are FSDP2's to reduce (docs/traps.md #26); DTensors need the handler.
        named, dtensors = split_params(module, ctx)
        if dtensors:
            raise ParallelCtxError(
                f"DataParallelGradientHook keeps plain gradients as views into flat buckets; DTensor parameters "
                f"({', '.join(n for n, _ in dtensors[:3])}{', ...' if len(dtensors) > 3 else ''}) cannot be. Fix: use "
                f"get_gradient_handler('bucketed'), which reduces their local shards after the buckets"
            )
        self._buckets = self._build_buckets(named, GroupResolver(ctx))
        self._params = tuple(slot.param for bucket in self._buckets for slot in bucket.slots)
        # A scaled seed scales every gradient of the backward, also those this hook leaves alone
        # (FSDP2's, or a parameter with no replica to average with): only safe when it has none.
        self.seed_factor = _exact_seed_factor(self._buckets) if covers_trainable(self._params, module) else 1.0
        for bucket in self._buckets:
            for slot in bucket.slots:
                self._handles.append(slot.param.register_post_accumulate_grad_hook(self._make_hook(slot)))

    # ------------------------------------------------------------------ building
    def _comm_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if self.reduce_dtype is not None and dtype.itemsize < self.reduce_dtype.itemsize:
            return self.reduce_dtype
        if self.compress is not None and dtype.itemsize > self.compress.itemsize:
            return self.compress
        return dtype

    def _build_buckets(self, named: list[tuple[str, torch.nn.Parameter]], resolver: GroupResolver) -> list[_Bucket]:
        seen: set[int] = set()
        order: list[tuple[str, torch.nn.Parameter]] = []
        for name, p in named:
            if id(p) in seen or not p.requires_grad:  # tied parameters: one slot
                continue
            seen.add(id(p))
            order.append((name, p))
        order.reverse()  # gradients arrive roughly in reverse registration order

        open_buckets: dict[tuple, tuple[_Bucket, list[tuple[str, torch.nn.Parameter]], int]] = {}
        closed: list[tuple[int, _Bucket, list[tuple[str, torch.nn.Parameter]]]] = []
        last_position: dict[tuple, int] = {}
        in_place_flags: dict[tuple, list] = {}  # key -> [position of its last in-place parameter, flags bucket]
        first = True
        for position, (name, p) in enumerate(order):
            plan = resolver.plan(p, name)
            if not plan.active:
                continue
            if p.is_sparse:
                raise TypeError(f"parameter {name!r} has a sparse gradient layout; the bucketed hook handles dense "
                                f"parameters only (use the 'ddp' handler)")
            key = (p.device, p.dtype, plan.key)
            if self._reduce_in_place(p, plan):
                bucket = _Bucket(plan, p.dtype, p.dtype)
                bucket.kind = "in_place"
                closed.append((position, bucket, [(name, p)]))
                flags = in_place_flags.get(key)
                if flags is None:
                    flags = in_place_flags[key] = [-1, _Bucket(plan, p.dtype, p.dtype)]
                    flags[1].kind = "flags"
                flags[0] = position
                flags[1].covers.append(bucket)
                continue
            if key not in open_buckets:
                cap = self.first_bucket_cap_mb if first and self.first_bucket_cap_mb is not None else self.bucket_cap_mb
                first = False
                open_buckets[key] = (_Bucket(plan, p.dtype, self._comm_dtype(p.dtype)), [], int(cap * _MB))
            bucket, members, cap_bytes = open_buckets[key]
            # The cap is a maximum (DDP closes a bucket only once it reaches the cap, so its buckets
            # overshoot): smaller buckets start their all-reduce earlier during backward.
            if members and (bucket.numel + p.numel()) * p.element_size() > cap_bytes:
                closed.append((last_position[key], bucket, members))
                bucket = _Bucket(plan, p.dtype, self._comm_dtype(p.dtype))
                members = []
                open_buckets[key] = (bucket, members, int(self.bucket_cap_mb * _MB))
            members.append((name, p))
            bucket.numel += p.numel()
            last_position[key] = position
        for key, (bucket, members, _) in open_buckets.items():
            closed.append((last_position[key], bucket, members))
        for position, flags in in_place_flags.values():  # launched right after its last in-place bucket
            closed.append((position + 0.5, flags, []))
        # A bucket is complete when its last member's gradient arrives: launch in that order.
        closed.sort(key=lambda item: item[0])
        buckets = []
        for index, (_, bucket, members) in enumerate(closed):
            bucket.index = index
            self._allocate(bucket, members)
            buckets.append(bucket)
        return buckets

    def _reduce_in_place(self, p: torch.nn.Parameter, plan: ReductionPlan) -> bool:
        """Large, contiguous, communicated in its own dtype over exactly one group."""
        return (self.in_place_mb is not None and p.numel() * p.element_size() >= self.in_place_mb * _MB
                and p.is_contiguous() and self._comm_dtype(p.dtype) == p.dtype
                and (plan.tensor is None) != (plan.replica is None))

    @staticmethod
    def _allocate(bucket: _Bucket, members: list[tuple[str, torch.nn.Parameter]]) -> None:
        if bucket.kind == "flags":
            bucket.buffer = bucket.comm = bucket.flags = torch.zeros(
                len(bucket.covers), dtype=bucket.dtype, device=bucket.covers[0].slots[0].param.device)
            for i, covered in enumerate(bucket.covers):
                covered.flags = bucket.comm[i:i + 1]
            return
        if bucket.kind == "in_place":
            name, p = members[0]
            bucket.buffer = bucket.comm = None
            bucket.slots.append(_Slot(p, name, bucket, None))
            bucket.numel = p.numel()
            bucket.pending = 1
            return
        align = max(1, _ALIGN_BYTES // bucket.dtype.itemsize)
        offsets, total = [], 0
        for _, p in members:
            offsets.append(total)
            total += math.ceil(p.numel() / align) * align
        device = members[0][1].device
        n = len(members)
        separate = bucket.comm_dtype != bucket.dtype
        # The per-parameter "used" counters ride at the end of whatever buffer is communicated.
        bucket.buffer = torch.zeros(total + (0 if separate else n), dtype=bucket.dtype, device=device)
        bucket.grads = bucket.buffer[:total]
        bucket.comm = torch.zeros(total + n, dtype=bucket.comm_dtype, device=device) if separate else bucket.buffer
        bucket.comm_grads = bucket.comm[:total]
        bucket.flags = bucket.comm[total:]
        for (name, p), offset in zip(members, offsets):
            view = _view_like(bucket.buffer, offset, p)
            if p.grad is not None:  # keep what is already accumulated
                view.copy_(p.grad)
                p.grad = view
            bucket.slots.append(_Slot(p, name, bucket, view))
        bucket.numel = total
        bucket.pending = n

    # ------------------------------------------------------------------ the hook
    def _make_hook(self, slot: _Slot):
        def hook(param: torch.Tensor) -> None:
            if self._window_seed != self._seed:
                self._check_seed(slot)
            if not self._require_sync:
                if self._sync_started:
                    raise RuntimeError(
                        f"parameter {slot.name!r} got a gradient inside no_sync() after a synchronising backward "
                        f"whose reduction was not finished; call finish() before the next accumulation window"
                    )
                slot.seen = True
                self._window = True
                return
            if slot.ready:
                raise RuntimeError(
                    f"parameter {slot.name!r} got a second gradient in one synchronisation window (its bucket "
                    f"is already reduced or scaled); run earlier backward passes inside no_sync(), or call "
                    f"finish() between backward passes"
                )
            self._window = True
            self._sync_started = True
            slot.seen = True
            self._absorb(slot)
            slot.ready = True
            bucket = slot.bucket
            bucket.pending -= 1
            if bucket.pending == 0 and bucket.index == self._next:
                self._launch_in_order()

        return hook

    def _check_seed(self, slot: _Slot) -> None:
        if self._window_seed is None:  # the first gradient of this window
            self._window_seed = self._seed
            return
        raise RuntimeError(
            f"parameter {slot.name!r} got a gradient from a backward pass seeded with {self._seed} in a window "
            f"whose earlier backward passes were seeded with {self._window_seed}: one window's gradients must all be "
            f"scaled alike to be averaged. Fix: call finish() after each synchronising backward, and run every "
            f"backward of an accumulation window through scaled_backward(loss) (Lightning: manual_backward), or "
            f"none of them"
        )

    def _absorb(self, slot: _Slot) -> None:
        """Move this rank's gradient into the bucket (scaled), leave ``.grad`` as the view.
        In-place buckets scale ``.grad`` where it is. Gradients of a seeded backward
        (:meth:`scaled_backward`) are already scaled."""
        p, view = slot.param, slot.view
        grad = p.grad
        scale = 1.0 if self._window_seed not in (None, 1.0) else slot.bucket.hook_scale
        if view is None:
            if grad is None:
                p.grad = grad = torch.zeros_like(p)
            elif not grad.is_contiguous():  # set by hand: the collective needs one dense block
                p.grad = grad = grad.contiguous()
            if scale != 1.0:
                grad.mul_(scale)
        elif grad is None:
            view.zero_()
            p.grad = view
        elif grad is view:
            if scale != 1.0:
                view.mul_(scale)
        else:
            if scale != 1.0:
                torch.mul(grad, scale, out=view)
            else:
                view.copy_(grad)
            p.grad = view

    def _launch_in_order(self) -> None:
        buckets = self._buckets
        while self._next < len(buckets) and buckets[self._next].pending == 0:
            self._launch(buckets[self._next])
            self._next += 1

    def _launch(self, bucket: _Bucket) -> None:
        if bucket.kind != "bucket":
            self._launch_in_place(bucket)
            return
        if bucket.pending:
            for slot in bucket.slots:
                if slot.ready:
                    continue
                if slot.seen:  # accumulated in earlier micro-batches only
                    self._absorb(slot)
                else:
                    slot.restore = slot.param.grad
                    slot.view.zero_()
                    slot.unused = True
                    bucket.has_unused = True
                slot.ready = True
            bucket.pending = 0
        if bucket.has_unused:
            bucket.flags.copy_(torch.tensor([0.0 if s.unused else 1.0 for s in bucket.slots]))
        else:
            bucket.flags.fill_(1.0)
        if bucket.comm is not bucket.buffer:
            if bucket.upcast:  # scale in the wide dtype: no extra rounding in the narrow one
                bucket.comm_grads.copy_(bucket.grads)
                if bucket.scale != 1.0:
                    bucket.comm_grads.mul_(bucket.scale)
            else:
                torch.mul(bucket.grads, bucket.scale, out=bucket.comm_grads)
        plan = bucket.plan
        # Sum over TENSOR first (sequence-parallel params); the replica average follows in finish().
        # A bucket with no group (an expert without replicas) was only to be scaled, which is done.
        group = plan.tensor if plan.tensor is not None else plan.replica
        if group is not None:
            bucket.work = dist.all_reduce(bucket.comm, op=dist.ReduceOp.SUM, group=group, async_op=True)

    def _launch_in_place(self, bucket: _Bucket) -> None:
        if bucket.kind == "in_place":
            slot = bucket.slots[0]
            if not slot.ready:
                if slot.seen:  # accumulated in earlier micro-batches only
                    self._absorb(slot)
                else:  # contribute zeros; .grad stays as it is unless another rank used the parameter
                    slot.restore = slot.param.grad
                    slot.unused = True
                    bucket.has_unused = True
                slot.ready = True
                bucket.pending = 0
            bucket.comm = torch.zeros_like(slot.param) if slot.unused else slot.param.grad
            bucket.flags.fill_(0.0 if slot.unused else 1.0)
        plan = bucket.plan
        group = plan.tensor if plan.tensor is not None else plan.replica
        bucket.work = dist.all_reduce(bucket.comm, op=dist.ReduceOp.SUM, group=group, async_op=True)

    # ------------------------------------------------------------------ public API
    def exact_seed(self) -> float:
        """The factor the next backward's seed may carry in place of the hook's scale pass: the
        uniform 1/replicas when that is exact now (see the module notes), else 1.0."""
        if self.seed_factor == 1.0 or not self._require_sync or self._window:
            return 1.0  # inside no_sync, DDP leaves local unscaled gradients: so does this
        if any(p.grad is not None for p in self._params):  # old + new/n would average to n*old + avg(new)
            return 1.0
        return self.seed_factor

    @contextlib.contextmanager
    def scaled_backward(self, loss: torch.Tensor) -> Iterator[torch.Tensor]:
        """``with hook.scaled_backward(loss) as seeded: seeded.backward()``: the same gradients
        as ``loss.backward()`` followed by the hook's averaging, without the averaging pass over
        every gradient, when that is exact (:meth:`exact_seed`); otherwise ``seeded`` is ``loss``.
        ``seeded`` has ``loss``'s value; only its backward seed is scaled, so tensor hooks and
        ``retain_grad()`` tensors inside this backward see gradients divided by the replica count
        (as Lightning's ``accumulate_grad_batches`` divides them by the accumulation count)."""
        factor = self.exact_seed()
        if factor == 1.0:
            yield loss
            return
        self._seed = factor
        try:
            yield _SeedScale.apply(loss, factor)
        finally:
            self._seed = 1.0

    def finish(self) -> None:
        """Launch the buckets not launched yet (unused parameters contribute zeros), wait for all,
        and leave every reduced ``.grad`` averaged. No-op inside ``no_sync()``, when no gradient
        arrived since the last call, and when called twice."""
        if not self._require_sync or not self._window:
            return
        buckets = self._buckets
        while self._next < len(buckets):
            self._launch(buckets[self._next])
            self._next += 1
        # Stage two (sequence-parallel buckets) only after every first stage is launched, in the
        # fixed bucket order: all ranks then issue the replica collectives identically.
        for bucket in buckets:
            if bucket.two_stage:
                bucket.work.wait()
                bucket.work = dist.all_reduce(bucket.comm, op=dist.ReduceOp.SUM, group=bucket.plan.replica,
                                              async_op=True)
        for bucket in buckets:
            if bucket.work is not None:
                bucket.work.wait()
            bucket.work = None
            if bucket.comm is not bucket.buffer and bucket.kind == "bucket":
                bucket.grads.copy_(bucket.comm_grads)
        # After every wait: an in-place bucket's flag arrives with its flags bucket, launched later.
        for bucket in buckets:
            if bucket.has_unused:
                counts = bucket.flags.tolist()
                for slot, count in zip(bucket.slots, counts):
                    if slot.unused:
                        slot.param.grad = (slot.view if slot.view is not None else bucket.comm) if count > 0 \
                            else slot.restore
        self._reset()

    def _reset(self) -> None:
        for bucket in self._buckets:
            for slot in bucket.slots:
                slot.ready = slot.seen = slot.unused = False
                slot.restore = None
            bucket.pending = len(bucket.slots)
            bucket.has_unused = False
            bucket.work = None
            if bucket.kind == "in_place":
                bucket.comm = None  # the gradient is the parameter's, not the hook's to keep alive
        self._next = 0
        self._window = False
        self._sync_started = False
        self._window_seed = None

    def remove(self) -> None:
        """Remove the hooks. Reductions already in flight are waited for; gradients stay where they are.
        The hooks are removed even when a wait fails (a peer died); the first such error is then raised."""
        error: Exception | None = None
        for bucket in self._buckets:
            if bucket.work is not None:
                try:
                    bucket.work.wait()
                except Exception as err:  # noqa: BLE001 - finish removing, then report it
                    error = error or err
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._reset()
        if error is not None:
            raise error

    # ------------------------------------------------------------------ introspection
    def parameters(self) -> list[torch.nn.Parameter]:
        """The parameters whose gradients this hook reduces or scales."""
        return list(self._params)

    @property
    def buckets(self) -> list[dict[str, Any]]:
        """One entry per bucket, in launch order: dtypes, sizes, parameter names, groups."""
        return [
            {"index": b.index, "dtype": b.dtype, "comm_dtype": b.comm_dtype, "numel": b.numel,
             "bytes": _bytes(b), "params": [s.name for s in b.slots], "in_place": b.kind == "in_place",
             "replica_ranks": b.plan.replica_ranks if b.plan.replica is not None else (),
             "tensor_ranks": b.plan.tensor_ranks if b.plan.tensor is not None else ()}
            for b in self._buckets if b.kind != "flags"
        ]

    def communication_buffers(self) -> list[torch.Tensor]:
        """The flat tensors each bucket all-reduces (for benchmarks); for an in-place bucket, its
        parameter's current ``.grad`` (left out while it is None)."""
        return [b.comm if b.kind != "in_place" else b.slots[0].param.grad for b in self._buckets
                if b.kind != "in_place" or b.slots[0].param.grad is not None]

    def __repr__(self) -> str:
        total = sum(map(_bytes, self._buckets)) / _MB
        return (f"DataParallelGradientHook({len(self._buckets)} buckets, {total:.1f} MB, "
                f"bucket_cap_mb={self.bucket_cap_mb}, reduce_dtype={self.reduce_dtype}, compress={self.compress})")


class _SeedScale(torch.autograd.Function):
    """Identity forward; the gradient flowing back through it is multiplied by ``factor``."""

    @staticmethod
    def forward(ctx: Any, loss: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return loss.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return grad * ctx.factor, None


def covers_trainable(params: Iterable[torch.Tensor],
                     module: torch.nn.Module | Iterable[tuple[str, torch.Tensor]]) -> bool:
    """Every parameter of ``module`` (or of its (name, parameter) pairs) that requires grad is in ``params``."""
    named = module.named_parameters() if isinstance(module, torch.nn.Module) else module
    return {id(p) for _, p in named if p.requires_grad} <= {id(p) for p in params}


def _exact_seed_factor(buckets: list[_Bucket]) -> float:
    """1/replicas when one power-of-two replica count averages every parameter, each scaled
    in the hook in its own dtype (a seed scaled by it is then exact); else 1.0."""
    scales = {b.scale for b in buckets if b.kind != "flags"}
    if len(scales) != 1 or any(b.hook_scale != b.scale for b in buckets if b.kind != "flags"):
        return 1.0
    scale = scales.pop()
    return scale if scale < 1.0 and math.frexp(scale)[0] == 0.5 else 1.0


def _bytes(bucket: _Bucket) -> int:
    if bucket.kind == "in_place":
        return bucket.numel * bucket.dtype.itemsize
    return bucket.comm.numel() * bucket.comm.element_size()


def _dense_layout(p: torch.Tensor) -> bool:
    """True when ``p``'s strides cover exactly ``numel`` elements (any permutation of dims)."""
    expected = 1
    for d in sorted(range(p.dim()), key=p.stride):
        if p.size(d) == 1:
            continue
        if p.stride(d) != expected:
            return False
        expected *= p.size(d)
    return True


def _view_like(flat: torch.Tensor, offset: int, p: torch.Tensor) -> torch.Tensor:
    # AccumulateGrad keeps .grad in the parameter's layout (channels_last etc.); a view with the
    # same strides lets it accumulate in place instead of replacing the view.
    if p.is_contiguous() or not _dense_layout(p):
        return flat.narrow(0, offset, p.numel()).view(p.shape)
    return flat.as_strided(p.shape, p.stride(), offset)
