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
    would draw it and cut by ``init_from_full``, so every tensor-parallel size trains the same model.
    ``split_dim`` is the weight dimension split over the group: 0 (output features) for the column
    layer, 1 (input features) for the row layer."""

    split_dim: int

    def _build(self, in_features: int, out_features: int, bias: bool, sequence_parallel: bool, sequence_dim: int,
               init_method: InitFn | None, mode: "ParallelMode | str", context: ContextLike | None,
               device: "torch.device | str | None", dtype: torch.dtype | None) -> int:
        """Create this rank's weight and bias shards; returns the split dimension's size per rank."""
        self._setup_group(mode, context)
        self.in_features, self.out_features = in_features, out_features
        self.sequence_parallel, self.sequence_dim = sequence_parallel, sequence_dim
        full = (out_features, in_features)
        per_rank = shard_size(full[self.split_dim], self.world_size, ("out_features", "in_features")[self.split_dim],
                              self.mode)
        shape = list(full)
        shape[self.split_dim] = per_rank
        kw = {"device": device, "dtype": dtype}
        self.weight = torch.nn.Parameter(torch.empty(*shape, **kw))
        self.bias = torch.nn.Parameter(torch.empty(shape[0], **kw)) if bias else None
        mark_shard(self.weight, self.split_dim, full[self.split_dim], self.mode)
        if self.bias is not None and self.split_dim == 0:
            mark_shard(self.bias, 0, out_features, self.mode)
        elif self.bias is not None and sequence_parallel:
            # The row layer's replicated bias is added to a sequence slice: each rank's gradient
            # covers only its tokens.
            markers.mark_sequence_parallel(self.bias)
        self.init_method = init_method
        if not is_meta(device):
            self.reset_parameters()
        return per_rank

    @torch.no_grad()
    def reset_parameters(self) -> None:
        w = torch.empty(self.out_features, self.in_features, device=self.weight.device, dtype=self.weight.dtype)
        b = torch.empty(self.out_features, device=w.device, dtype=w.dtype) if self.bias is not None else None
        linear_init_(w, b, self.init_method)
        self.init_from_full(w, b)

    @torch.no_grad()
    def init_from_full(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Load this rank's slice of a full (out_features, in_features) weight (and bias: sliced
        for the column layer, whole for the row layer's replicated one)."""
        self.weight.copy_(weight.chunk(self.world_size, self.split_dim)[self.rank])
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias.chunk(self.world_size, 0)[self.rank] if self.split_dim == 0 else bias)


class ColumnParallelLinear(_ParallelLinear):
    """``y = x W^T + b`` with W's rows (output features) split over the group.

    Output: this rank's slice of the features, or all of them with ``gather_output=True``.
    With ``sequence_parallel=True`` the input is this rank's slice of the sequence along
    ``sequence_dim`` (default 0, Megatron's (seq, batch, hidden) layout: the all-gather there
    needs no copy); the output covers the full sequence.
    """

    split_dim = 0

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gather_output: bool = False, *,
                 sequence_parallel: bool = False, sequence_dim: int = 0, init_method: InitFn | None = None,
                 mode: "ParallelMode | str" = ParallelMode.TENSOR, context: ContextLike | None = None,
                 device: "torch.device | str | None" = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.gather_output = gather_output
        self.out_features_per_rank = self._build(in_features, out_features, bias, sequence_parallel, sequence_dim,
                                                 init_method, mode, context, device, dtype)

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

    split_dim = 1

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_is_parallel: bool = True, *,
                 sequence_parallel: bool = False, sequence_dim: int = 0, init_method: InitFn | None = None,
                 mode: "ParallelMode | str" = ParallelMode.TENSOR, context: ContextLike | None = None,
                 device: "torch.device | str | None" = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.input_is_parallel = input_is_parallel
        self.in_features_per_rank = self._build(in_features, out_features, bias, sequence_parallel, sequence_dim,
                                                init_method, mode, context, device, dtype)

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
