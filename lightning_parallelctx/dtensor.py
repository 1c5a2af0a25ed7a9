"""DTensor and FSDP2 parameters: who holds what, in the context's terms (docs/traps.md #26, #27).

A DTensor says how it is laid out over the mesh it lives on (Shard / Replicate / Partial per mesh
dim), but not what it is over the rest of the world: a tensor-parallel DTensor on the TENSOR mesh
is replicated over the data ranks, and an FSDP2 parameter on the data mesh may be a shard of a
library tensor-parallel layer. This module answers the questions the gradient handlers, the
initial replica broadcast and clipping ask, from the DTensor's placements plus the context's
layout, without any collective:

- :func:`role`: ``"plain"`` (the library's markers decide), ``"fsdp"`` (FSDP2 reduces its gradient
  itself: leave it alone), ``"replicated"`` (a DTensor replicated over the data ranks: reduce its
  local tensor over them, like a plain parameter).
- :func:`counts_in_norm`: whether this rank's local piece of a gradient is counted in the global
  norm, so that every piece of the full model is counted exactly once over the whole world.

Every answer depends only on metadata that is the same on every rank of a parameter's groups, so
all ranks take the same path and issue the same collectives (the hang of docs/traps.md #27 came from
ranks taking different paths).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from .errors import ParallelCtxError
from .markers import is_expert, is_sequence_parallel, is_tensor_parallel
from .mode import AXES

if TYPE_CHECKING:
    from .context import ParallelContext

__all__ = ["check_dtensor_params", "counts_in_norm", "fsdp_managed", "is_dtensor", "local", "role", "split_params",
           "wrap_like"]

#: The axes over which dense parameters are replicated (their gradients averaged): DATA x SEQUENCE x EXPERT.
DATA_AXES = ("data", "sequence", "expert")


def is_dtensor(t: Any) -> bool:
    # By attribute, so this module never imports torch.distributed.tensor unless DTensors exist.
    return isinstance(t, torch.Tensor) and hasattr(t, "device_mesh") and hasattr(t, "placements")


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's local tensor (the tensor itself if it is not a DTensor); shares storage."""
    return t._local_tensor if is_dtensor(t) else t  # type: ignore[attr-defined]


def wrap_like(local_tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``local_tensor`` as a DTensor laid out like ``like`` (no copy, no communication)."""
    if not is_dtensor(like):
        return local_tensor
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local_tensor, like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())


# ---------------------------------------------------------------------------------- FSDP2
def fsdp_managed(module: torch.nn.Module) -> dict[int, Any]:
    """``id(param) -> FSDP2 data mesh`` for every parameter an FSDP2 ``fully_shard`` manages (and
    the library's marks put back on them, see :func:`lightning_parallelctx.lightning.fully_shard`)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return {}
    owned: dict[int, Any] = {}
    for sub in module.modules():
        if not isinstance(sub, FSDPModule):
            continue
        state = sub._get_fsdp_state()  # type: ignore[attr-defined]
        group = state._fsdp_param_group
        if group is None:  # fully_shard on a module without parameters of its own
            continue
        mesh = group.mesh_info.mesh
        for fsdp_param in group.fsdp_params:
            # The library's marks, kept by lightning.fully_shard on the FSDPParam: FSDP2 swaps the
            # Parameter object on module.to(), and attributes of the old one are lost.
            for attr, value in getattr(fsdp_param, "_pctx_marks", {}).items():
                setattr(fsdp_param.sharded_param, attr, value)
            owned[id(fsdp_param.sharded_param)] = mesh
    return owned


# ---------------------------------------------------------------------------------- rank math
def _mesh_dim_ranks(mesh: Any, dim: int) -> tuple[int, ...]:
    # The mesh tensor holds global ranks; this rank's row along ``dim`` is its group there.
    coord = mesh.get_coordinate()
    if coord is None:
        raise ParallelCtxError(f"rank {dist.get_rank()} is not part of DeviceMesh {mesh}")
    index = list(coord)
    index[dim] = slice(None)
    return tuple(int(r) for r in mesh.mesh[tuple(index)].flatten().tolist())


def _axes_spanned(ranks: tuple[int, ...], ctx: ParallelContext) -> frozenset[str]:
    coords = [ctx.layout.coords(r) for r in ranks]
    return frozenset(a for a in AXES if len({c[a] for c in coords}) > 1)


def _dim_name(mesh: Any, dim: int) -> str:
    names = mesh.mesh_dim_names
    return repr(names[dim]) if names else str(dim)


_MESH_CACHE: dict[tuple[Any, int], list[tuple[frozenset[str], tuple[int, ...], tuple[int, ...]]]] = {}


def _mesh_groups(mesh: Any, ctx: ParallelContext) -> list[tuple[frozenset[str], tuple[int, ...], tuple[int, ...]]]:
    """Per mesh dim: (context axes it spans, its ranks, the context's group over those axes).
    Cached: clipping asks for every parameter at every step."""
    key = (mesh, ctx.build_id)
    if key not in _MESH_CACHE:
        me = dist.get_rank()
        dims = []
        for dim in range(mesh.ndim):
            ranks = _mesh_dim_ranks(mesh, dim)
            axes = _axes_spanned(ranks, ctx)
            dims.append((axes, ranks, ctx.layout.group_of(me, axes) if axes else (me,)))
        _MESH_CACHE[key] = dims
    return _MESH_CACHE[key]


def _dims(t: torch.Tensor, ctx: ParallelContext, name: str) -> list[tuple[frozenset[str], Any, int]]:
    """Per mesh dim of a DTensor: (context axes it spans, placement, this rank's index on it).
    Raises when a dim's ranks are not a group of the context (a mesh made for another layout)."""
    mesh = t.device_mesh  # type: ignore[attr-defined]
    me = dist.get_rank()
    out = []
    for dim, ((axes, ranks, expected), placement) in enumerate(zip(_mesh_groups(mesh, ctx), t.placements)):  # type: ignore[attr-defined]
        if tuple(sorted(ranks)) != expected:
            raise ParallelCtxError(
                f"parameter {name!r} is a DTensor on mesh dim {_dim_name(mesh, dim)} with ranks {list(ranks)}, "
                f"which is not a group of this ParallelContext ({ctx.layout.describe()}; rank {me}'s group over "
                f"{sorted(axes) or 'no axis'} is {list(expected)}). Rule: DTensor and FSDP2 meshes must be the "
                f"context's own. Fix: build them from self.device_mesh (e.g. self.device_mesh['tensor_parallel'], "
                f"self.device_mesh['data_parallel']), not with init_device_mesh"
            )
        out.append((axes, placement, ranks.index(me)))
    return out


def _is_shard(placement: Any) -> bool:
    # FSDP2 over a tensor-parallel DTensor shards with _StridedShard, which is no Shard subclass
    # and answers is_shard() == False in torch 2.13; it still gives each rank a distinct piece.
    return placement.is_shard() or type(placement).__name__ == "_StridedShard"


def _data_axes(ctx: ParallelContext) -> frozenset[str]:
    return frozenset(a for a in DATA_AXES if ctx.layout.sizes[a] > 1)


def role(p: torch.Tensor, name: str, ctx: ParallelContext, fsdp: dict[int, Any]) -> str:
    """``"plain"``, ``"fsdp"`` or ``"replicated"`` (see the module doc); raises for a layout the
    handlers cannot reduce correctly, naming the parameter, the rule and the fix."""
    if id(p) in fsdp:
        _check_fsdp_param(p, name, ctx, fsdp[id(p)])
        return "fsdp"
    if not is_dtensor(p):
        return "plain"
    on_data = set().union(*(axes for axes, _, _ in _dims(p, ctx, name))) & _data_axes(ctx)
    if on_data:
        raise ParallelCtxError(
            f"parameter {name!r} is a DTensor laid out over the data-parallel ranks ({sorted(on_data)}) but is not "
            f"managed by FSDP2 in this module: the gradient handlers reduce only parameters replicated over the "
            f"data ranks, and FSDP2 reduces the ones it shards itself (never both). Fix: pass the whole module "
            f"(not a parameter list) so FSDP2-managed parameters are recognised, apply fully_shard over "
            f"self.device_mesh['data_parallel'], or keep this parameter on a tensor-parallel mesh"
        )
    return "replicated"


def _check_fsdp_param(p: torch.Tensor, name: str, ctx: ParallelContext, mesh: Any) -> None:
    ranks = tuple(sorted(int(r) for r in mesh.mesh.flatten().tolist()))
    dense = tuple(ctx.get_ranks_in_group("dense_replica"))
    if ranks != dense:
        raise ParallelCtxError(
            f"parameter {name!r} is sharded by FSDP2 over ranks {list(ranks)}, but its gradient must be averaged "
            f"over this rank's data replicas {list(dense)} (DATA x SEQUENCE x EXPERT of {ctx.layout.describe()}). "
            f"Rule: FSDP2's mesh must be the context's data mesh. Fix: fully_shard(module, "
            f"mesh=self.device_mesh['data_parallel'])"
        )
    if is_expert(p) or is_sequence_parallel(p):
        kind = "expert" if is_expert(p) else "sequence-parallel"
        raise ParallelCtxError(
            f"parameter {name!r} is marked {kind} and sharded by FSDP2: FSDP2 averages its gradient over the data "
            f"mesh only, but a {kind} parameter needs "
            f"{'the expert replicas' if kind == 'expert' else 'a sum over TENSOR too'}. Fix: leave the {kind} "
            f"modules out of fully_shard (FSDP2 ignores parameters of modules you do not shard when you pass "
            f"ignored_params=...), and let the strategy's gradient handler reduce them"
        )


def check_dtensor_params(named: Iterable[tuple[str, torch.Tensor]], ctx: ParallelContext,
                         fsdp: dict[int, Any]) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """Sort parameters by :func:`role` (checking every DTensor's mesh against the context)."""
    out: dict[str, list[tuple[str, torch.Tensor]]] = {"plain": [], "fsdp": [], "replicated": []}
    seen: set[int] = set()
    for name, p in named:
        if id(p) in seen:
            continue
        seen.add(id(p))
        out[role(p, name, ctx, fsdp)].append((name, p))
    return out


def counts_in_norm(p: torch.Tensor, ctx: ParallelContext, name: str = "", grad: torch.Tensor | None = None) -> bool:
    """Whether this rank's local piece of ``p`` (or of its gradient) is counted in the full model's
    norm: over the whole world every piece is then counted exactly once.

    Along a mesh dim where ``p`` is sharded, every rank holds a different piece; where it is
    replicated, only index 0 counts. Along the axes its mesh does not span (all of them for a plain
    tensor) the library's markers decide: tensor-parallel shards differ along TENSOR, expert
    shards along EXPERT, pipeline stages always differ; everything else is a replica, counted at
    coordinate 0. ``grad`` (default ``p``) gives the placements: a gradient can be laid out
    differently from its parameter.
    """
    laid_out = p if grad is None else grad
    spanned: set[str] = set()
    if is_dtensor(laid_out):
        for axes, placement, index in _dims(laid_out, ctx, name):
            spanned |= axes
            if not _is_shard(placement) and index != 0:
                return False
    coords = ctx.layout.coords(ctx.get_global_rank())
    for axis in AXES:
        if axis in spanned or ctx.layout.sizes[axis] == 1 or coords[axis] == 0:
            continue
        if axis == "pipeline" or (axis == "tensor" and is_tensor_parallel(p)) or (axis == "expert" and is_expert(p)):
            continue
        return False
    return True


def split_params(module: torch.nn.Module | Iterable[tuple[str, torch.Tensor]], ctx: ParallelContext | None
                 ) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]:
    """(plain parameters, DTensor parameters replicated over the data ranks) of what a gradient
    handler is given; FSDP2-managed ones are left out (FSDP2 reduces them, docs/traps.md #26). Only a
    whole module shows which parameters FSDP2 manages: in a parameter list they are an error."""
    is_module = isinstance(module, torch.nn.Module)
    named = list(module.named_parameters()) if is_module else list(module)
    fsdp = fsdp_managed(module) if is_module else {}
    if not fsdp and not any(is_dtensor(p) for _, p in named):
        return named, []  # the common case needs no context
    if ctx is None:
        raise ParallelCtxError(
            "the module has DTensor / FSDP2 parameters: which ranks hold replicas of them depends on the "
            "ParallelContext's layout. Fix: pass ctx=ParallelContext.from_...(...) (the strategy does)"
        )
    roles = check_dtensor_params(named, ctx, fsdp)
    return roles["plain"], roles["replicated"]
