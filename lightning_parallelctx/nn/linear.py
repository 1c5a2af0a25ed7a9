"""Column- and row-parallel linear layers (Megatron), optionally with sequence parallelism.

Weights keep ``torch.nn.Linear``'s (out_features, in_features) layout. A column-parallel weight
is ``full.chunk(tp, 0)[tp_rank]`` (its bias likewise), a row-parallel weight
``full.chunk(tp, 1)[tp_rank]`` with the full bias replicated and added after the reduction.

Initialisation builds the *full* weight with exactly the draws ``torch.nn.Linear`` makes (same
generator, order, dtype and device) and keeps this rank's slice, so a model built under
``torch.manual_seed(s)`` with tp=2 holds the slices of the tp=1 model built under the same seed.
The price is one temporary full weight per layer at construction.

Megatron sequence parallelism (``sequence_parallel=True``): activations outside the
tensor-parallel region are split along ``sequence_dim`` over TENSOR. The column layer then
all-gathers its input (backward: reduce-scatter) instead of copying it, and the row layer
reduce-scatters its output (backward: all-gather) instead of all-reducing it. Parameters that see
sequence-split inputs but are replicated over TENSOR (LayerNorm, the row layer's bias) must be
marked with :func:`lightning_parallelctx.markers.mark_sequence_parallel` so that their gradients
are summed over TENSOR; the row bias is marked here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import markers
from ..distributed import collectives as C
from ..distributed._state import ContextLike
from ..mode import ParallelMode
from ._common import InitFn, _ParallelLayer, is_meta, linear_init_, mark_shard, shard_size
from ._region import enter_region


class _ParallelLinear(_ParallelLayer):
    """What both parallel linears share: the full ``(out, in)`` weight is drawn as ``nn.Linear``
    would draw it and cut by ``init_from_full``, so every tensor-parallel size trains the same model."""

    @torch.no_grad()
    def reset_parameters(self) -> None:
        w = torch.empty(self.out_features, self.in_features, device=self.weight.device, dtype=self.weight.dtype)
        b = torch.empty(self.out_features, device=w.device, dtype=w.dtype) if self.bias is not None else None
        linear_init_(w, b, self.init_method)
        self.init_from_full(w, b)


class ColumnParallelLinear(_ParallelLinear):
    """``y = x W^T + b`` with W's rows (output features) split over the group.

    Output: this rank's slice of the features, or all of them with ``gather_output=True``.
    With ``sequence_parallel=True`` the input is this rank's slice of the sequence along
    ``sequence_dim`` (default 0, Megatron's (seq, batch, hidden) layout: the all-gather there
    needs no copy); the output covers the full sequence.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gather_output: bool = False, *,
                 sequence_parallel: bool = False, sequence_dim: int = 0, init_method: InitFn | None = None,
                 mode: "ParallelMode | str" = ParallelMode.TENSOR, context: ContextLike | None = None,
                 device: "torch.device | str | None" = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self._setup_group(mode, context)
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.sequence_parallel, self.sequence_dim = gather_output, sequence_parallel, sequence_dim
        self.out_features_per_rank = shard_size(out_features, self.world_size, "out_features", self.mode)
        kw = {"device": device, "dtype": dtype}
        self.weight = torch.nn.Parameter(torch.empty(self.out_features_per_rank, in_features, **kw))
        self.bias = torch.nn.Parameter(torch.empty(self.out_features_per_rank, **kw)) if bias else None
        mark_shard(self.weight, 0, out_features, self.mode)
        if self.bias is not None:
            mark_shard(self.bias, 0, out_features, self.mode)
        self.init_method = init_method
        if not is_meta(device):
            self.reset_parameters()


    @torch.no_grad()
    def init_from_full(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Load this rank's slice of a full (out_features, in_features) weight (and bias)."""
        self.weight.copy_(weight.chunk(self.world_size, 0)[self.rank])
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias.chunk(self.world_size, 0)[self.rank])

    def forward(self, x: torch.Tensor, sequence_sizes: "int | Sequence[int] | None" = None) -> torch.Tensor:
        """``sequence_sizes`` (sequence parallelism only): the full sequence length (slices as
        ``torch.tensor_split``) or every rank's slice length. Without it the slice lengths are
        exchanged first, one small all-gather per call."""
        g = self._group()
        if g.size > 1:
            ctx = self._context
            if self.sequence_parallel:  # q, k, v reading one input share one all-gather (see _region)
                sizes = tuple(sequence_sizes) if isinstance(sequence_sizes, (list, tuple)) else sequence_sizes
                x = enter_region(x, ("all_gather", g, self.sequence_dim, sizes), lambda t: C.all_gather(
                    t, self.sequence_dim, self.mode, sizes=sequence_sizes, context=ctx))
            else:
                x = enter_region(x, ("copy", g), lambda t: C.copy(t, self.mode, context=ctx), aliases_input=True)
        y = F.linear(x, self.weight, self.bias)
        if self.gather_output and g.size > 1:
            y = C.gather(y, -1, self.mode, sizes=self.out_features, context=self._context)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"({self.out_features_per_rank} on this rank of {self.world_size} in {self.mode!r}), "
                f"bias={self.bias is not None}, gather_output={self.gather_output}, "
                f"sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(_ParallelLinear):
    """``y = x W^T + b`` with W's columns (input features) split over the group.

    Input: this rank's slice of the features (``input_is_parallel=True``, e.g. a column layer's
    output) or all of them (split here). The partial products are summed over the group (or,
    with ``sequence_parallel=True``, summed and split along ``sequence_dim``), then the
    replicated bias is added.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_is_parallel: bool = True, *,
                 sequence_parallel: bool = False, sequence_dim: int = 0, init_method: InitFn | None = None,
                 mode: "ParallelMode | str" = ParallelMode.TENSOR, context: ContextLike | None = None,
                 device: "torch.device | str | None" = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self._setup_group(mode, context)
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.sequence_parallel, self.sequence_dim = input_is_parallel, sequence_parallel, sequence_dim
        self.in_features_per_rank = shard_size(in_features, self.world_size, "in_features", self.mode)
        kw = {"device": device, "dtype": dtype}
        self.weight = torch.nn.Parameter(torch.empty(out_features, self.in_features_per_rank, **kw))
        self.bias = torch.nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        mark_shard(self.weight, 1, in_features, self.mode)
        if self.bias is not None and sequence_parallel:
            # Added to a sequence slice: each rank's gradient covers only its tokens.
            markers.mark_sequence_parallel(self.bias)
        self.init_method = init_method
        if not is_meta(device):
            self.reset_parameters()


    @torch.no_grad()
    def init_from_full(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Load this rank's slice of a full (out_features, in_features) weight (and the bias)."""
        self.weight.copy_(weight.chunk(self.world_size, 1)[self.rank])
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self._group()
        ctx = self._context
        if not self.input_is_parallel and g.size > 1:
            x = C.scatter(x, -1, self.mode, context=ctx)
        y = F.linear(x, self.weight)
        if g.size > 1:
            y = (C.reduce_scatter(y, self.sequence_dim, self.mode, context=ctx) if self.sequence_parallel
                 else C.reduce(y, self.mode, context=ctx))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} ({self.in_features_per_rank} on this rank of "
                f"{self.world_size} in {self.mode!r}), out_features={self.out_features}, "
                f"bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}, "
                f"sequence_parallel={self.sequence_parallel}")
