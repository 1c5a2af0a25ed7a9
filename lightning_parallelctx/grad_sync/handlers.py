"""The built-in gradient handlers: ``bucketed`` (default), ``ddp`` and ``allreduce``."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.parallel.distributed import _find_tensors

from ..dtensor import is_dtensor, local, split_params, wrap_like
from ..errors import ParallelCtxError
from ..markers import is_expert, is_sequence_parallel
from .base import GradientHandler, register_gradient_handler
from .groups import GroupResolver, ReductionPlan
from .hook import DataParallelGradientHook, covers_trainable

if TYPE_CHECKING:
    from ..context import ParallelContext

__all__ = ["BucketedGradientHandler", "DDPGradientHandler", "FlatAllReduceGradientHandler"]


def _local_shard_sync(named: list[tuple[str, torch.nn.Parameter]], ctx: ParallelContext | None) -> Any:
    """A flat all-reduce handler over ``named`` (DTensors replicated over the data ranks), or None."""
    if not named:
        return None
    sync = FlatAllReduceGradientHandler()
    sync.attach(named, ctx)
    return sync


@register_gradient_handler("bucketed")
class BucketedGradientHandler(GradientHandler):
    """The library's hook (:class:`DataParallelGradientHook`): flat buckets, ``.grad`` views,
    each bucket's all-reduce started from the backward pass as soon as it is complete.

    Args:
        bucket_cap_mb: bucket size in MiB (of the parameters' dtype).
        first_bucket_cap_mb: size of the first bucket launched (the last layers); ``None`` = ``bucket_cap_mb``.
        reduce_dtype: reduce 16-bit parameters' gradients in this wider dtype (e.g. ``"fp32"``).
        compress: communicate gradients of wider parameters in this 16-bit dtype (``"fp16"``/``"bf16"``).
        in_place_mb: a parameter whose gradient is at least this size in MiB is all-reduced in its
            own ``.grad``, with no copy into a bucket; ``None``: every parameter goes through a bucket.
        average_in_backward: fold the 1/replicas average into the backward's seed gradient where
            that is bit-identical (power-of-two replicas, fresh gradients: docs/grad_sync.md), which
            saves a pass over every gradient. Tensor hooks inside that backward then see gradients
            divided by the replica count; ``False`` keeps them as DDP shows them.
    """

    def __init__(self, bucket_cap_mb: float = 25.0, first_bucket_cap_mb: float | None = None,
                 reduce_dtype: str | torch.dtype | None = None, compress: str | torch.dtype | None = None,
                 in_place_mb: float | None = 4.0, average_in_backward: bool = True):
        super().__init__()
        if not isinstance(average_in_backward, bool):
            raise TypeError(f"average_in_backward must be True or False, got {average_in_backward!r}. Fix: True (the "
                            f"default) folds the 1/replicas average into the backward's seed where exact; False "
                            f"scales every gradient in the hook instead")
        self.average_in_backward = average_in_backward
        self._seed_ok = False  # every trainable parameter is the hook's (set in setup)
        self.bucket_cap_mb = bucket_cap_mb
        self.first_bucket_cap_mb = first_bucket_cap_mb
        self.reduce_dtype = reduce_dtype
        self.compress = compress
        self.in_place_mb = in_place_mb
        self.hook: DataParallelGradientHook | None = None
        # DTensor parameters replicated over the data ranks (tensor parallelism without FSDP2):
        # their local shards are reduced after the buckets, by the flat handler.
        self._dtensors: FlatAllReduceGradientHandler | None = None

    def setup(self, module: torch.nn.Module, ctx: ParallelContext | None) -> torch.nn.Module:
        self.remove()
        plain, dtensors = split_params(module, ctx)
        self.hook = DataParallelGradientHook(plain, ctx, bucket_cap_mb=self.bucket_cap_mb,
                                             first_bucket_cap_mb=self.first_bucket_cap_mb,
                                             reduce_dtype=self.reduce_dtype, compress=self.compress,
                                             in_place_mb=self.in_place_mb)
        self._dtensors = _local_shard_sync(dtensors, ctx)
        # The hook checks what it was given; the DTensors and FSDP2's parameters split off above
        # would be scaled by the seed too, and nothing would un-scale them.
        self._seed_ok = self.average_in_backward and covers_trainable(self.hook.parameters(), module)
        return module

    def scaled_backward(self, loss: torch.Tensor) -> contextlib.AbstractContextManager[torch.Tensor]:
        if not self._seed_ok or self.hook is None:
            return contextlib.nullcontext(loss)
        return self.hook.scaled_backward(loss)

    @property
    def require_sync(self) -> bool:
        return self.hook.require_sync if self.hook is not None else True

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        stack = contextlib.ExitStack()
        for part in (self.hook, self._dtensors):
            if part is not None:
                stack.enter_context(part.no_sync())
        return stack

    def finish(self) -> None:
        if self.hook is not None:
            self.hook.finish()
        if self._dtensors is not None:
            self._dtensors.finish()

    def remove(self) -> None:
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        if self._dtensors is not None:
            self._dtensors.remove()
            self._dtensors = None

    def __repr__(self) -> str:
        return (f"BucketedGradientHandler(bucket_cap_mb={self.bucket_cap_mb}, reduce_dtype={self.reduce_dtype}, "
                f"compress={self.compress}, in_place_mb={self.in_place_mb}, "
                f"average_in_backward={self.average_in_backward})")


@register_gradient_handler("ddp")
class DDPGradientHandler(GradientHandler):
    """torch ``DistributedDataParallel`` over the dense replica group (DATA x SEQUENCE x EXPERT),
    for comparison. DDP reduces every parameter over one group, so models with expert or
    (with TENSOR > 1) sequence-parallel parameters are refused; use ``"bucketed"`` for those.
    ``setup`` returns the DDP wrapper; the original module is ``handler.module``.
    """

    def __init__(self, bucket_cap_mb: float = 25.0, gradient_as_bucket_view: bool = False,
                 find_unused_parameters: bool = False, static_graph: bool = False,
                 ddp_kwargs: dict[str, Any] | None = None):
        super().__init__()
        self.ddp_kwargs: dict[str, Any] = dict(
            bucket_cap_mb=bucket_cap_mb, gradient_as_bucket_view=gradient_as_bucket_view,
            find_unused_parameters=find_unused_parameters, static_graph=static_graph, **(ddp_kwargs or {}),
        )
        self.module: torch.nn.Module | None = None
        self.ddp: torch.nn.parallel.DistributedDataParallel | None = None
        self._dtensors: FlatAllReduceGradientHandler | None = None

    def setup(self, module: torch.nn.Module, ctx: ParallelContext | None) -> torch.nn.Module:
        expert = [n for n, p in module.named_parameters() if is_expert(p)]
        if expert:
            raise ParallelCtxError(
                f"the 'ddp' gradient handler cannot sync expert parameters ({', '.join(expert[:3])}"
                f"{', ...' if len(expert) > 3 else ''}): DDP reduces every parameter over one group, but expert "
                f"parameters must be averaged over 'expert_replica' and dense ones over 'dense_replica'. "
                f"Use gradient_handler='bucketed'"
            )
        tp = ctx.get_world_size("tensor") if ctx is not None else 1
        seq = [n for n, p in module.named_parameters() if is_sequence_parallel(p)]
        if seq and tp > 1:
            raise ParallelCtxError(
                f"the 'ddp' gradient handler cannot sum sequence-parallel parameters ({', '.join(seq[:3])}) over "
                f"TENSOR; use gradient_handler='bucketed'"
            )
        if not (dist.is_available() and dist.is_initialized()):
            raise ParallelCtxError("the 'ddp' gradient handler needs an initialised default process group")
        group = ctx.get_group("dense_replica") if ctx is not None else dist.group.WORLD
        self.module = module
        plain, dtensors = split_params(module, ctx)
        # DDP broadcasts and buckets plain tensors only: DTensors (FSDP2's, which FSDP2 reduces, and
        # replicated ones, reduced here after DDP) are hidden from it.
        ignored = {id(p) for _, p in module.named_parameters()} - {id(p) for _, p in plain}
        if ignored:
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                module, [n for n, p in module.named_parameters() if id(p) in ignored]
                + [n for n, b in module.named_buffers() if is_dtensor(b)])
        self._dtensors = _local_shard_sync(dtensors, ctx)
        if not any(p.requires_grad for _, p in plain):
            return module  # DDP refuses a module with nothing for it to reduce
        self.ddp = torch.nn.parallel.DistributedDataParallel(module, process_group=group, **self.ddp_kwargs)
        return self.ddp

    def before_backward(self, loss: torch.Tensor) -> None:
        # Manual optimization runs backward inside training_step, i.e. inside DDP's forward, before
        # DDP's post-forward has prepared the reducer (torch: "initialize_buckets must NOT be called
        # during autograd execution"). Prepare it here, as Lightning's DDPStrategy.pre_backward does.
        ddp = self.ddp
        if ddp is None:
            return
        if torch.is_grad_enabled() and ddp.require_backward_grad_sync:
            ddp.require_forward_param_sync = True
            find = ddp.find_unused_parameters and not ddp.static_graph
            ddp.reducer._rebuild_buckets()
            ddp.reducer.prepare_for_backward(list(_find_tensors(loss)) if find else [])
        else:
            ddp.require_forward_param_sync = False

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        stack = contextlib.ExitStack()
        if self.ddp is not None:
            stack.enter_context(self.ddp.no_sync())
        if self._dtensors is not None:
            stack.enter_context(self._dtensors.no_sync())
        return stack

    @property
    def require_sync(self) -> bool:
        if self.ddp is not None:
            return self.ddp.require_backward_grad_sync
        return self._dtensors.require_sync if self._dtensors is not None else True

    def finish(self) -> None:
        # DDP finishes its reductions inside backward (an autograd end-of-backward callback).
        if self._dtensors is not None:
            self._dtensors.finish()

    def remove(self) -> None:
        self.ddp = None
        if self._dtensors is not None:
            self._dtensors.remove()
            self._dtensors = None

    def __repr__(self) -> str:
        return f"DDPGradientHandler({', '.join(f'{k}={v}' for k, v in self.ddp_kwargs.items())})"


@register_gradient_handler("allreduce")
class FlatAllReduceGradientHandler(GradientHandler):
    """Baseline: after backward, flatten all gradients of a kind into one tensor, all-reduce it,
    copy back. Simple and slow (no overlap, two extra copies); kept to measure against.
    Parameters without a gradient on any rank keep ``.grad = None``, as with the other handlers.
    """

    def __init__(self) -> None:
        super().__init__()
        self._groups: list[tuple[ReductionPlan, list[torch.nn.Parameter]]] = []
        self._handles: list[Any] = []
        self._dirty = False

    def setup(self, module: torch.nn.Module, ctx: ParallelContext | None) -> torch.nn.Module:
        plain, dtensors = split_params(module, ctx)  # FSDP2-managed ones are FSDP2's (docs/traps.md #26)
        self.attach(plain + dtensors, ctx)
        return module

    def attach(self, named: list[tuple[str, torch.nn.Parameter]], ctx: ParallelContext | None) -> None:
        """Reduce exactly these parameters (plain tensors, or DTensors replicated over the data
        ranks: their local shards are reduced)."""
        self.remove()
        resolver = GroupResolver(ctx)
        groups: dict[tuple, tuple[ReductionPlan, list[torch.nn.Parameter]]] = {}
        for name, p in named:
            if not p.requires_grad:
                continue
            plan = resolver.plan(p, name)
            if plan.active:
                groups.setdefault((p.device, p.dtype, plan.key), (plan, []))[1].append(p)
                # Only to know whether a backward ran since the last finish.
                self._handles.append(p.register_post_accumulate_grad_hook(self._mark))
        self._groups = list(groups.values())

    def _mark(self, _: torch.Tensor) -> None:
        self._dirty = True

    def finish(self) -> None:
        if not self.require_sync or not self._dirty:
            return
        for plan, params in self._groups:
            grads = [local(p.grad) if p.grad is not None else torch.zeros_like(local(p)) for p in params]
            used = torch.tensor([float(p.grad is not None) for p in params], dtype=params[0].dtype,
                                device=params[0].device)
            flat = _flatten_dense_tensors(grads + [used])
            flat.mul_(1.0 / plan.divisor)
            if plan.tensor is not None:  # sum over TENSOR, then average over the replicas
                dist.all_reduce(flat, group=plan.tensor)
            if plan.replica is not None:
                dist.all_reduce(flat, group=plan.replica)
            *reduced, counts = _unflatten_dense_tensors(flat, grads + [used])
            for p, new, count in zip(params, reduced, counts.tolist()):
                if p.grad is not None:
                    local(p.grad).copy_(new)
                elif count > 0:
                    p.grad = wrap_like(new, p)
        self._dirty = False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._groups = []
