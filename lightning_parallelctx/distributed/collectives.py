"""Collectives with Megatron/torchshard gradients, over any mode's group.

| function         | forward              | backward                  |
|------------------|----------------------|---------------------------|
| copy             | identity             | all-reduce                |
| reduce           | all-reduce (sum)     | identity                  |
| scatter          | keep own slice       | all-gather                |
| gather           | all-gather           | keep own slice            |
| reduce_scatter   | reduce-scatter       | all-gather                |
| all_gather       | all-gather           | reduce-scatter            |
| all_to_all       | all-to-all           | inverse all-to-all        |

These are written as our own ``torch.autograd.Function``s: torch's differentiable collectives
(``torch.distributed.nn``, functional collectives) treat each rank's loss as separate, so
replicated downstream compute gets gradients multiplied by the group size, and they break on gloo
sub-groups (docs/traps.md #11, #12).

Uneven sizes follow ``torch.tensor_split``: the first ``size % world`` ranks get one more.
``scatter`` and ``reduce_scatter`` see the full size, so they need nothing else. ``gather`` and
``all_gather`` only see their own piece: pass ``sizes=`` (the full size as an int, meaning
tensor_split pieces, or every rank's size as a list) to skip communication; with ``sizes=None``
the pieces' sizes are first exchanged with one small all-gather (correct for any split, costs one
latency-bound collective). ``all_to_all`` likewise takes ``gather_sizes=``.

A group of size 1 never communicates: the functions return their input (or its slice) at once.
No function modifies its input in place; outputs that communicate are new tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import torch

from ..errors import ParallelCtxError
from ..mode import ParallelMode
from . import _comm
from ._comm import Pieces, exchange_sizes, normalize_dim, piece, pieces_of, split_pieces, split_sizes
from ._state import ContextLike, GroupInfo, group_info

#: Piece sizes: None (exchange them), the full size (tensor_split pieces) or one size per rank.
Sizes = Union[int, Sequence[int], None]
_TENSOR = ParallelMode.TENSOR


def resolve_sizes(sizes: Any, local: int, g: GroupInfo, device: torch.device, what: str = "sizes") -> list[int]:
    """Piece sizes per rank from ``None`` (exchange), a full size (tensor_split) or a list."""
    if sizes is None:
        return exchange_sizes(local, g, device)
    if isinstance(sizes, int) and not isinstance(sizes, bool):
        return split_sizes(sizes, g.size)
    return _comm.check_sizes(sizes, g, what)


def _pieces(sizes: Any, x: torch.Tensor, dim: int, g: GroupInfo, what: str = "sizes") -> Pieces:
    """:func:`resolve_sizes` as :data:`~._comm.Pieces` for ``x``'s pieces along ``dim``: a full size
    that divides evenly (what the layers pass) becomes the piece size at once, with no list built
    or scanned and nothing else looked up (this path was ~3k instructions, a third of a wrapper)."""
    if type(sizes) is int:  # not bool, whose type is bool
        return split_pieces(sizes, g.size)
    return pieces_of(resolve_sizes(sizes, x.shape[dim], g, x.device, what))


def _own_piece(x: torch.Tensor, dim: int, sizes: Pieces, g: GroupInfo) -> torch.Tensor:
    # A copy, not a view: an in-place change of the output must never reach the input.
    offset, size = piece(sizes, g.rank)
    return x.narrow(dim, offset, size).clone(memory_format=torch.contiguous_format)


# ------------------------------------------------------------------ autograd functions
# Every function takes the tensor and ONE non-tensor argument (the group, or a tuple "spec" the
# public function already built), stored as one ctx attribute: each extra argument to apply() costs
# ~0.3-0.5 us per call (argument unwrapping, a None gradient to return), measured with callgrind.
class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, g: GroupInfo) -> torch.Tensor:
        ctx.g = g
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return _comm.all_reduce(grad, ctx.g), None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, g: GroupInfo) -> torch.Tensor:
        return _comm.all_reduce(x, g)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return grad, None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, spec: tuple) -> torch.Tensor:  # spec: (dim, sizes, g)
        ctx.spec = spec
        return _own_piece(x, *spec)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return _comm.all_gather(grad, *ctx.spec), None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, spec: tuple) -> torch.Tensor:  # spec: (dim, sizes, g)
        ctx.spec = spec
        return _comm.all_gather(x, *spec)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        dim, sizes, g = ctx.spec
        offset, size = piece(sizes, g.rank)
        return grad.narrow(dim, offset, size).contiguous(), None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, spec: tuple) -> torch.Tensor:  # spec: (dim, sizes, g)
        ctx.spec = spec
        return _comm.reduce_scatter(x, *spec)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return _comm.all_gather(grad, *ctx.spec), None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, spec: tuple) -> torch.Tensor:  # spec: (dim, sizes, g)
        ctx.spec = spec
        return _comm.all_gather(x, *spec)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return _comm.reduce_scatter(grad, *ctx.spec), None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, spec: tuple) -> torch.Tensor:
        ctx.spec = spec  # (scatter_dim, gather_dim, scatter_sizes, gather_sizes, g)
        return _comm.all_to_all(x, *spec)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        scatter_dim, gather_dim, scatter_sizes, gather_sizes, g = ctx.spec
        # The inverse: send back along gather_dim what came from each rank, re-assemble scatter_dim.
        return _comm.all_to_all(grad, gather_dim, scatter_dim, gather_sizes, scatter_sizes, g), None


# ------------------------------------------------------------------ public functions
# Each function answers a call that needs no gradient (inference, no_grad, an input that does not
# require grad) without building an autograd node: the forward is the same buffer-level call, so
# the result is identical, and the node (~5-8 us) is a large part of a small collective's cost.
# The test is written out in each function (``x.requires_grad and torch.is_grad_enabled()``): a
# helper's call frame was a measurable part of what these wrappers add.
def copy(x: torch.Tensor, mode: "ParallelMode | str" = _TENSOR, *, context: ContextLike | None = None) -> torch.Tensor:
    """Identity forward, all-reduce (sum) of the gradient backward: enters a parallel region."""
    g = group_info(mode, context)
    return _Copy.apply(x, g) if g.size > 1 and x.requires_grad and torch.is_grad_enabled() else x


def reduce(x: torch.Tensor, mode: "ParallelMode | str" = _TENSOR, *, context: ContextLike | None = None) -> torch.Tensor:
    """All-reduce (sum) forward, identity backward: leaves a parallel region (row-parallel output)."""
    g = group_info(mode, context)
    if g.size == 1:
        return x
    return _Reduce.apply(x, g) if x.requires_grad and torch.is_grad_enabled() else _comm.all_reduce(x, g)


def scatter(x: torch.Tensor, dim: int = -1, mode: "ParallelMode | str" = _TENSOR, *,
            context: ContextLike | None = None) -> torch.Tensor:
    """Keep this rank's ``torch.tensor_split`` piece along ``dim``; backward all-gathers.

    With 2 ranks, ``scatter(torch.empty(6, 8), dim=0).shape == (3, 8)``; 5 rows give 3 and 2.
    """
    g = group_info(mode, context)
    dim = normalize_dim(dim, x.dim())
    if g.size == 1:
        return x
    spec = (dim, split_pieces(x.shape[dim], g.size), g)
    return _Scatter.apply(x, spec) if x.requires_grad and torch.is_grad_enabled() else _own_piece(x, *spec)


def gather(x: torch.Tensor, dim: int = -1, mode: "ParallelMode | str" = _TENSOR, *, sizes: Sizes = None,
           context: ContextLike | None = None) -> torch.Tensor:
    """All-gather the pieces along ``dim`` (rank order); backward keeps this rank's slice.

    ``sizes``: None exchanges the piece sizes first (any split); an int is the full size (pieces
    as ``torch.tensor_split``); a list gives every rank's size. With 2 ranks,
    ``gather(torch.empty(6, 8), dim=1).shape == (6, 16)``.
    """
    g = group_info(mode, context)
    dim = normalize_dim(dim, x.dim())
    if g.size == 1:
        return x
    spec = (dim, _pieces(sizes, x, dim, g), g)
    return _Gather.apply(x, spec) if x.requires_grad and torch.is_grad_enabled() else _comm.all_gather(x, *spec)


def reduce_scatter(x: torch.Tensor, dim: int = 0, mode: "ParallelMode | str" = _TENSOR, *,
                   context: ContextLike | None = None) -> torch.Tensor:
    """Sum over the group and keep this rank's ``tensor_split`` piece along ``dim``; backward
    all-gathers (Megatron sequence parallelism's exit from a tensor-parallel region)."""
    g = group_info(mode, context)
    dim = normalize_dim(dim, x.dim())
    if g.size == 1:
        return x
    spec = (dim, split_pieces(x.shape[dim], g.size), g)
    if x.requires_grad and torch.is_grad_enabled():
        return _ReduceScatter.apply(x, spec)
    return _comm.reduce_scatter(x, *spec)


def all_gather(x: torch.Tensor, dim: int = 0, mode: "ParallelMode | str" = _TENSOR, *, sizes: Sizes = None,
               context: ContextLike | None = None) -> torch.Tensor:
    """All-gather along ``dim``; backward reduce-scatters (sums the gradient of every rank's
    copy, then keeps this rank's piece): Megatron sequence parallelism's entry. ``sizes`` as in
    :func:`gather`."""
    g = group_info(mode, context)
    dim = normalize_dim(dim, x.dim())
    if g.size == 1:
        return x
    spec = (dim, _pieces(sizes, x, dim, g), g)
    return _AllGather.apply(x, spec) if x.requires_grad and torch.is_grad_enabled() else _comm.all_gather(x, *spec)


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, mode: "ParallelMode | str" = _TENSOR, *,
               scatter_sizes: Sizes = None, gather_sizes: Sizes = None,
               context: ContextLike | None = None) -> torch.Tensor:
    """Split along ``scatter_dim`` (piece j to rank j), concatenate what arrives along
    ``gather_dim``; backward is the inverse all-to-all.

    ``scatter_sizes``: None = ``tensor_split`` of the local size, or a list (the same on every
    rank). ``gather_sizes``: every rank's size along ``gather_dim``, as in :func:`gather`'s
    ``sizes`` (None exchanges them).
    """
    g = group_info(mode, context)
    scatter_dim = normalize_dim(scatter_dim, x.dim(), "scatter_dim")
    gather_dim = normalize_dim(gather_dim, x.dim(), "gather_dim")
    if scatter_dim == gather_dim:
        raise ParallelCtxError(
            f"all_to_all needs scatter_dim != gather_dim (both are {scatter_dim}): it splits one dimension "
            f"over the ranks and concatenates the received pieces along another. Fix: pass two different "
            f"dims (e.g. scatter_dim=heads, gather_dim=sequence); to split or join along one dim use scatter/gather"
        )
    if g.size == 1:
        return x
    if scatter_sizes is None or isinstance(scatter_sizes, int):
        scatter_pieces = split_pieces(x.shape[scatter_dim] if scatter_sizes is None else scatter_sizes, g.size)
    else:
        scatter_pieces = pieces_of(_comm.check_sizes(scatter_sizes, g, "scatter_sizes"))
    spec = (scatter_dim, gather_dim, scatter_pieces, _pieces(gather_sizes, x, gather_dim, g, "gather_sizes"), g)
    if x.requires_grad and torch.is_grad_enabled():
        return _AllToAll.apply(x, spec)
    return _comm.all_to_all(x, *spec)
