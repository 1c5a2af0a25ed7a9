"""Buffer-level communication (no autograd): the fast paths every collective is built on.

Layout choices (docs/benchmarking.md: a preallocated dim-0 buffer was 2x faster than ``all_gather``
into a fresh list followed by a last-dim ``cat``):
- all-gather: one ``(world, *piece)`` buffer filled by a single flat all-gather; along dim 0 that
  buffer already *is* the result (no copy), along another dim one ``movedim`` + copy.
- reduce-scatter: the input is laid out as ``(world, *piece)`` (free along dim 0) and reduced with
  a single flat reduce-scatter straight into the output.
- all-to-all: the same dim-0 packing, one ``all_to_all_single``; a gather along dim 0 is free.
Uneven pieces (``torch.tensor_split`` sizes, or sizes given explicitly) pad to the largest piece,
which keeps one collective call; gloo's collectives need equal sizes per rank.

Piece sizes are passed as ``Pieces``: an int when every rank's piece has that size (the hot path of
every TP layer: no list is built, checked or counted per call) or a list of one size per rank.

Flat 1-D views are passed to torch because gloo's all-gather rejects the "stacked" output form.
torch 2.13 deprecates ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` (with a warning on
every call) in favour of ``all_gather_single`` / ``reduce_scatter_single``; older torch has only
the former, very old torch only the list forms. Pick once, at import.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
import torch.distributed as dist

from ..errors import ParallelCtxError
from ._state import GroupInfo

_ALL_GATHER_FLAT = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
_REDUCE_SCATTER_FLAT = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)


#: Every rank's piece size: one int when they are all equal, else one size per rank.
Pieces = Union[int, list[int]]


def split_sizes(total: int, parts: int) -> list[int]:
    """The piece sizes of ``torch.tensor_split(range(total), parts)``: the first ``total % parts``
    pieces are one longer (so 5 over 2 is [3, 2], 1 over 2 is [1, 0])."""
    pieces = split_pieces(total, parts)
    return [pieces] * parts if isinstance(pieces, int) else pieces


def split_pieces(total: int, parts: int) -> Pieces:
    """:func:`split_sizes` as :data:`Pieces`: the int piece size when ``total`` divides evenly."""
    q, r = divmod(total, parts)
    return q if r == 0 else [q + 1] * r + [q] * (parts - r)


def pieces_of(sizes: list[int]) -> Pieces:
    """A size list as :data:`Pieces` (the int when all sizes are equal)."""
    first = sizes[0]
    return first if sizes.count(first) == len(sizes) else sizes


def as_list(sizes: Pieces, g: GroupInfo) -> list[int]:
    return [sizes] * g.size if isinstance(sizes, int) else sizes


def piece(sizes: Pieces, rank: int) -> tuple[int, int]:
    """(offset, size) of ``rank``'s piece."""
    if isinstance(sizes, int):
        return rank * sizes, sizes
    return sum(sizes[:rank]), sizes[rank]


def normalize_dim(dim: int, ndim: int, what: str = "dim") -> int:
    if ndim == 0:
        raise ParallelCtxError(f"{what}={dim}: cannot split or gather a 0-dimensional tensor, which has no "
                               f"dimension to cut. Fix: reshape it to 1 element first (x.reshape(1))")
    if not -ndim <= dim < ndim:
        raise IndexError(f"{what}={dim} is out of range for a tensor with {ndim} dimensions; "
                         f"use a dim in [{-ndim}, {ndim - 1}]")
    return dim % ndim


def _all_gather_flat(out: torch.Tensor, inp: torch.Tensor, g: GroupInfo) -> None:
    """out (world * n,) <- every rank's inp (n,), in rank order."""
    if _ALL_GATHER_FLAT is not None:
        _ALL_GATHER_FLAT(out, inp, group=g.group)
    else:  # torch without the flat variants: views of one buffer still avoid a cat
        dist.all_gather(list(out.chunk(g.size)), inp, group=g.group)


def _reduce_scatter_flat(out: torch.Tensor, inp: torch.Tensor, g: GroupInfo) -> None:
    """out (n,) <- sum over ranks of inp (world * n,)[rank * n:(rank + 1) * n]."""
    if _REDUCE_SCATTER_FLAT is not None:
        _REDUCE_SCATTER_FLAT(out, inp, group=g.group)
    else:  # never modify inp: reduce a copy
        full = inp.clone()
        dist.all_reduce(full, group=g.group)
        out.copy_(full.chunk(g.size)[g.rank])


def exchange_sizes(local: int, g: GroupInfo, device: torch.device | str = "cpu") -> list[int]:
    """Every rank's ``local`` value, in rank order (one small all-gather)."""
    if g.size == 1:
        return [local]
    mine = torch.tensor([local], dtype=torch.int64, device=device)
    out = torch.empty(g.size, dtype=torch.int64, device=device)
    _all_gather_flat(out, mine, g)
    return [int(v) for v in out.tolist()]


def check_sizes(sizes: Sequence[int], g: GroupInfo, what: str) -> list[int]:
    sizes = [int(s) for s in sizes]
    if len(sizes) != g.size or any(s < 0 for s in sizes):
        raise ParallelCtxError(
            f"{what}={sizes} must list one non-negative size per rank of the {g.mode!r} group "
            f"(group size {g.size}, so {g.size} entries >= 0), and be the same list on every rank. Fix: pass "
            f"{g.size} sizes in rank order (each rank's piece along the dim), or None to split evenly / exchange them"
        )
    return sizes


def all_reduce(x: torch.Tensor, g: GroupInfo) -> torch.Tensor:
    """Sum over the group, into a new tensor (x is never touched)."""
    # gloo reduces contiguous tensors only; clone() keeps a contiguous input's layout and is ~1.6k
    # instructions cheaper than clone(memory_format=...), whose keyword goes through the slow parser.
    out = x.clone() if x.is_contiguous() else x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=g.group)
    return out


def _with_size(shape: Sequence[int], dim: int, size: int) -> tuple[int, ...]:
    shape = list(shape)
    shape[dim] = size
    return tuple(shape)


def _gather_mismatch(x: torch.Tensor, dim: int, sizes: Sequence[int], g: GroupInfo) -> ParallelCtxError:
    return ParallelCtxError(
        f"gather along dim {dim}: this rank ({g.rank} of {g.size} in {g.mode!r}) holds size "
        f"{x.shape[dim]} but the expected piece sizes are {list(sizes)}; entry {g.rank} must equal this "
        f"rank's size along dim {dim}. Fix: pass every rank's real size in rank order, or sizes=None to exchange them"
    )


def all_gather(x: torch.Tensor, dim: int, sizes: Pieces, g: GroupInfo) -> torch.Tensor:
    """Concatenate every rank's piece along ``dim``; rank j's piece has ``sizes[j]`` there."""
    local = x.shape[dim]
    if isinstance(sizes, int):
        if local != sizes:
            raise _gather_mismatch(x, dim, as_list(sizes, g), g)
    elif local != sizes[g.rank]:
        raise _gather_mismatch(x, dim, sizes, g)
    elif sizes.count(local) != g.size:  # uneven: pad to the largest piece, one collective anyway
        return _all_gather_uneven(x, dim, sizes, g)
    # Even (the hot path of every TP layer): straight-line code, no size list built, no extra copy.
    x = x.contiguous()
    if dim == 0:  # the (world, *piece) buffer already is the result
        out = x.new_empty((g.size * local, *x.shape[1:]))
        if x.numel():
            _all_gather_flat(out.view(-1), x.view(-1), g)
        return out
    out = x.new_empty((g.size, *x.shape))
    if x.numel():
        _all_gather_flat(out.view(-1), x.view(-1), g)
    return out.movedim(0, dim).flatten(dim, dim + 1)  # one copy, no list, no cat


def _all_gather_uneven(x: torch.Tensor, dim: int, sizes: list[int], g: GroupInfo) -> torch.Tensor:
    size = max(sizes)
    if size == 0:
        return x.new_empty(_with_size(x.shape, dim, 0))
    padded = x.new_zeros(_with_size(x.shape, dim, size))
    padded.narrow(dim, 0, x.shape[dim]).copy_(x)
    out = x.new_empty((g.size, *padded.shape))
    _all_gather_flat(out.view(-1), padded.view(-1), g)
    return torch.cat([out[j].narrow(dim, 0, s) for j, s in enumerate(sizes)], dim)


def reduce_scatter(x: torch.Tensor, dim: int, sizes: Pieces, g: GroupInfo) -> torch.Tensor:
    """Sum over ranks, then keep this rank's piece along ``dim`` (pieces have ``sizes``)."""
    even = isinstance(sizes, int)
    if (sizes * g.size if even else sum(sizes)) != x.shape[dim]:
        raise ParallelCtxError(
            f"reduce-scatter along dim {dim}: size {x.shape[dim]} does not match the piece sizes "
            f"{as_list(sizes, g)} of the {g.mode!r} group (group size {g.size}); the pieces must add up to the "
            f"input's size along dim {dim}. Fix: pass sizes summing to {x.shape[dim]}, or None to split evenly"
        )
    if not even:
        size = sizes[0]
        if sizes.count(size) != g.size:
            return _reduce_scatter_uneven(x, dim, sizes, g)
        sizes = size
    if dim == 0:
        buf = x.contiguous()  # already (world * size, ...) in rank order: no copy
        out = x.new_empty((sizes, *x.shape[1:]))
    else:
        buf = x.unflatten(dim, (g.size, sizes)).movedim(dim, 0).contiguous()
        out = x.new_empty(buf.shape[1:])
    if out.numel():
        _reduce_scatter_flat(out.view(-1), buf.view(-1), g)
    return out


def _reduce_scatter_uneven(x: torch.Tensor, dim: int, sizes: list[int], g: GroupInfo) -> torch.Tensor:
    size = max(sizes)
    chunk_shape = _with_size(x.shape, dim, size)
    buf = x.new_zeros((g.size, *chunk_shape))
    for j, piece in enumerate(x.split(sizes, dim)):
        buf[j].narrow(dim, 0, sizes[j]).copy_(piece)
    out = x.new_empty(chunk_shape)
    if out.numel():
        _reduce_scatter_flat(out.view(-1), buf.view(-1), g)
    return out if sizes[g.rank] == size else out.narrow(dim, 0, sizes[g.rank])


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, scatter_sizes: Pieces,
               gather_sizes: Pieces, g: GroupInfo) -> torch.Tensor:
    """Split ``x`` along ``scatter_dim`` (piece j, of ``scatter_sizes[j]``, goes to rank j) and
    concatenate what arrives along ``gather_dim`` (rank j's piece has ``gather_sizes[j]`` there)."""
    c = scatter_sizes if isinstance(scatter_sizes, int) else None
    scatter_total = c * g.size if c is not None else sum(scatter_sizes)
    own_gather = gather_sizes if isinstance(gather_sizes, int) else gather_sizes[g.rank]
    if scatter_total != x.shape[scatter_dim] or x.shape[gather_dim] != own_gather:
        raise ParallelCtxError(
            f"all-to-all: input shape {tuple(x.shape)} does not fit scatter_dim={scatter_dim} sizes "
            f"{as_list(scatter_sizes, g)} / gather_dim={gather_dim} sizes {as_list(gather_sizes, g)} of the "
            f"{g.mode!r} group (group size {g.size}, this rank {g.rank}): the scatter sizes must add up to the "
            f"input's size along scatter_dim, and gather size {g.rank} must be this rank's size along gather_dim. "
            f"Fix: pass sizes that match the input (or None to split evenly / exchange them)"
        )
    if c is None and scatter_sizes.count(scatter_sizes[0]) == g.size:
        c = scatter_sizes[0]
    if c is not None and (isinstance(gather_sizes, int) or gather_sizes.count(gather_sizes[0]) == g.size):
        if scatter_dim == 0:
            inp = x.contiguous().view((g.size, c, *x.shape[1:]))
        else:
            inp = x.unflatten(scatter_dim, (g.size, c)).movedim(scatter_dim, 0).contiguous()
        out = torch.empty_like(inp)
        if out.numel():
            dist.all_to_all_single(out.view(-1), inp.view(-1), group=g.group)
        return out.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1)  # free for gather_dim 0
    scatter_sizes, gather_sizes = as_list(scatter_sizes, g), as_list(gather_sizes, g)
    # Uneven: pack the pieces flat and let all_to_all_single's split sizes route them.
    pieces = x.split(list(scatter_sizes), scatter_dim)
    send = torch.cat([p.reshape(-1) for p in pieces])
    recv_shapes = [_with_size(_with_size(x.shape, scatter_dim, scatter_sizes[g.rank]), gather_dim, s)
                   for s in gather_sizes]
    recv_counts = [int(torch.Size(s).numel()) for s in recv_shapes]
    out = x.new_empty(sum(recv_counts))
    dist.all_to_all_single(out, send, recv_counts, [p.numel() for p in pieces], group=g.group)
    return torch.cat([c.view(s) for c, s in zip(out.split(recv_counts), recv_shapes)], gather_dim)
