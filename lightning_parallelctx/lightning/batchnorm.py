"""``Trainer(sync_batchnorm=True)``: batch statistics over the ranks holding distinct data, on CPU too.

torch's ``SyncBatchNorm`` raises on CPU tensors ("expected input tensor to be on GPU ..."), and
Lightning's ``TorchSyncBatchNorm`` converts over the whole world, which under tensor parallelism
would count each sample once per TENSOR peer. So: on CPU the layers become
:class:`GroupSyncBatchNorm` (two differentiable all-reduces per layer: the sums for the mean, then
for the variance, the same two-pass arithmetic as a single process); on accelerators torch's
``SyncBatchNorm`` with ``process_group`` = that group (DATA x SEQUENCE x EXPERT, see
:mod:`.reductions`). Either way the statistics are those
of the global batch, as one process would compute them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["GroupSyncBatchNorm", "convert_sync_batchnorm", "revert_sync_batchnorm"]

_CONVERTED = "_pctx_converted_from"  # set on layers we converted: only those are reverted


class _AllReduceSum(torch.autograd.Function):
    """A differentiable SUM all-reduce: the gradient of a sum over ranks is the sum of the ranks'
    gradients (torch.distributed.nn.functional.all_reduce does the same but is deprecated)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _AllReduceSum.apply(grad, ctx.group), None


class GroupSyncBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are over every rank of ``process_group`` (any device)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Any = None, device: Any = None,
                 dtype: Any = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        use_batch_stats = self.training or not self.track_running_stats
        if not (use_batch_stats and self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(input)
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        momentum = self.momentum
        if momentum is None:  # cumulative moving average, as _BatchNorm does
            momentum = 1.0 / float(self.num_batches_tracked)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        count = torch.tensor([x.numel() / x.size(1)], dtype=x.dtype, device=x.device)
        sums = _AllReduceSum.apply(torch.cat([x.sum(dims), count]), self.process_group)
        n = sums[-1]
        mean = sums[:-1] / n
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply(centred.pow(2).sum(dims), self.process_group) / n
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                unbiased = var * (n / (n - 1)) if float(n) > 1 else var
                self.running_mean.mul_(1 - momentum).add_(mean.detach().to(self.running_mean.dtype), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.detach().to(self.running_var.dtype), alpha=momentum)
        return out.to(input.dtype)



def _adopt_state(old: _BatchNorm, new: _BatchNorm) -> _BatchNorm:
    """Give ``new`` the very Parameter and buffer objects of ``old`` (optimizers and checkpoints
    keep pointing at them) and its train/eval mode."""
    if old.affine:
        new.weight = old.weight
        new.bias = old.bias
    new.running_mean = old.running_mean
    new.running_var = old.running_var
    new.num_batches_tracked = old.num_batches_tracked
    new.training = old.training
    return new

def convert_sync_batchnorm(module: torch.nn.Module, process_group: Any, device: torch.device) -> torch.nn.Module:
    """Replace every BatchNorm layer of ``module`` by a synchronised one over ``process_group``,
    keeping its parameters (the same Parameter objects) and buffers. Returns the converted module."""
    if isinstance(module, _BatchNorm) and not isinstance(module, (GroupSyncBatchNorm, torch.nn.SyncBatchNorm)):
        if device.type == "cpu":
            new: _BatchNorm = GroupSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                                 module.track_running_stats, process_group)
        else:
            new = torch.nn.SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                         module.track_running_stats, process_group)
        _adopt_state(module, new)
        setattr(new, _CONVERTED, True)
        if hasattr(module, "qconfig"):
            new.qconfig = module.qconfig
        return new
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child, process_group, device)
        if converted is not child:
            module.add_module(name, converted)
    return module



class _BatchNormXd(_BatchNorm):
    """A plain BatchNorm for any input rank (what a synchronised layer becomes again)."""

    def _check_input_dim(self, input: Tensor) -> None:
        return None


def revert_sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`convert_sync_batchnorm` at the end of fit, as Lightning's DDPStrategy does: the
    layers it converted become plain BatchNorm again, with the same parameters and buffers."""
    if getattr(module, _CONVERTED, False):
        assert isinstance(module, _BatchNorm)
        new = _BatchNormXd(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        return _adopt_state(module, new)
    for name, child in module.named_children():
        reverted = revert_sync_batchnorm(child)
        if reverted is not child:
            module.add_module(name, reverted)
    return module
