"""Shared plumbing of the parallel layers: group sizes, the even-split rule, full-weight init."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .. import markers
from ..errors import ParallelConfigError, ParallelCtxError
from ..mode import ParallelMode, mode_name
from ..distributed._state import ContextLike, GroupInfo, group_info, resolve

InitFn = Callable[[torch.Tensor], Any]

#: Attribute naming the mode a tensor-parallel shard is split over (TENSOR unless a layer was
#: built over another mode); read by the state-dict conversion.
TP_MODE_ATTR = "_pctx_tensor_parallel_mode"

#: Expert parameters are stored stacked, the expert index on this dim, split like
#: ``full.chunk(expert_world, EXPERT_DIM)[expert_rank]``.
EXPERT_DIM = 0


class _ParallelLayer(torch.nn.Module):
    """Remembers the group it was built for and checks, at every call, that it still holds."""

    def _setup_group(self, mode: "ParallelMode | str", context: ContextLike | None) -> None:
        ctx = resolve(context)
        self.mode = mode_name(mode)
        self.world_size = ctx.get_world_size(mode)
        self.rank = ctx.get_local_rank(mode) if self.world_size > 1 else 0
        # Only an explicitly given context is kept: otherwise the current one is looked up at each
        # call, so a model survives destroy() + rebuild (and pickles without process groups).
        self._context = context

    def _group(self) -> GroupInfo:
        g = group_info(self.mode, self._context)
        if g.size != self.world_size or g.rank != self.rank:
            raise ParallelCtxError(
                f"{type(self).__name__} was built for rank {self.rank} of a {self.mode!r} group of "
                f"{self.world_size}, but the current context has rank {g.rank} of {g.size}; build the "
                f"layer under the context it runs with (or pass context=)"
            )
        return g


def shard_size(full: int, parts: int, what: str, mode: str) -> int:
    """The even shard size, or an error naming the size and the group size."""
    if full % parts:
        raise ParallelConfigError(
            f"{what}={full} is not divisible by the {mode!r} group size {parts}; the weight layout "
            f"(full.chunk({parts}, dim)[rank]) needs equal shards. Fix: pick a size divisible by "
            f"{parts} (e.g. {math.ceil(full / parts) * parts}, padding the vocabulary if needed)"
        )
    return full // parts


def mark_shard(param: torch.Tensor, dim: int, full_size: int, mode: str) -> torch.Tensor:
    markers.mark_tensor_parallel(param, dim, full_size)
    setattr(param, TP_MODE_ATTR, mode)
    return param


def linear_init_(weight: torch.Tensor, bias: torch.Tensor | None, init_method: InitFn | None) -> None:
    """``torch.nn.Linear.reset_parameters`` on a full (out, in) weight: same draws, same order."""
    if init_method is not None:
        init_method(weight)
    else:
        torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in = weight.shape[1]
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        torch.nn.init.uniform_(bias, -bound, bound)


def is_meta(device: Any) -> bool:
    return device is not None and torch.device(device).type == "meta"
