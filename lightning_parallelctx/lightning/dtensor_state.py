"""The library's sharded tensors presented as DTensors on the context's mesh, for torch DCP.

A tensor-parallel parameter holds ``full.chunk(tp, dim)[tp_rank]`` and an expert parameter
``full.chunk(ep, 0)[ep_rank]`` (docs/collectives.md, layer layouts). That is exactly a DTensor with placement
``Shard(dim)`` on the TENSOR mesh dimension (``Shard(0)`` on EXPERT; both, expert outermost, for an
expert weight that is also split over TENSOR). Presented so, ``torch.distributed.checkpoint``
records each shard's offset in the full tensor: every shard is kept (plain tensors under one key are
de-duplicated to rank 0's, docs/traps.md #14), replicas over DATA/SEQUENCE are written once, and a load
into another layout reads whichever slices the new shards need (re-sharding for free).

Optimizer states (AdamW moments) are cut exactly like their parameters, so they get the same
placements; scalars (``step``) stay plain. DTensors a model already has (FSDP2 / ``parallelize_module``)
are passed through untouched.

Rank math only (no communication): DTensor.from_local(run_check=False) talks to nobody.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Shard

from ..context import ParallelContext
from ..errors import ParallelCtxError
from ..markers import is_expert, tensor_parallel_dim
from ..mode import SHORT_NAMES, axis_name
from ..nn._common import EXPERT_DIM, TP_MODE_ATTR

Split = tuple[str, int]  # (axis, tensor dim), outermost first


def param_splits(p: torch.Tensor) -> list[Split]:
    """How ``p`` is cut from its full tensor: ``[(axis, dim), ...]``, expert before tensor."""
    out: list[Split] = []
    if is_expert(p):
        out.append(("expert", EXPERT_DIM))
    dim = tensor_parallel_dim(p)
    if dim is not None:
        mode = getattr(p, TP_MODE_ATTR, "tensor")
        try:
            axis = axis_name(mode)
        except Exception as err:  # noqa: BLE001 - re-raised with the fix
            raise ParallelCtxError(
                f"a parameter is split over mode {mode!r}, which is not a mesh axis (tensor, sequence, expert, "
                f"data, pipeline): its shards cannot be presented as a DTensor for a checkpoint. Build the layer "
                f"over one of the axes") from err
        out.append((axis, dim % max(p.dim(), 1)))
    return out


def splits_by_name(module: torch.nn.Module) -> dict[str, list[Split]]:
    """State-dict key -> splits, for every split parameter (tied ones under each of their names)."""
    return {name: s for name, p in module.named_parameters(remove_duplicate=False) if (s := param_splits(p))}


def _full_shape(local: torch.Size, splits: list[Split], ctx: ParallelContext) -> list[int]:
    shape = list(local)
    for axis, dim in splits:
        shape[dim] *= ctx.get_world_size(axis)
    return shape


_SUB_MESHES: "weakref.WeakKeyDictionary[Any, dict[tuple[str, ...], Any]]" = weakref.WeakKeyDictionary()


def _sub_mesh(ctx: ParallelContext, axes: tuple[str, ...]) -> Any:
    # Slicing a DeviceMesh costs milliseconds; a model has hundreds of tensors: once per context.
    mesh = ctx.device_mesh
    cache = _SUB_MESHES.setdefault(mesh, {})
    if axes not in cache:
        names = tuple(SHORT_NAMES[a] for a in axes)
        cache[axes] = mesh[names] if len(names) > 1 else mesh[names[0]]
    return cache[axes]


def to_dtensor(local: torch.Tensor, splits: list[Split], ctx: ParallelContext) -> torch.Tensor:
    """``local`` (this rank's shard) as a DTensor over the split axes of ``ctx.device_mesh``."""
    if isinstance(local, DTensor) or not splits:
        return local
    axes = [axis for axis, _ in splits]
    if all(ctx.get_world_size(a) == 1 for a in axes):
        return local  # not split in this layout: the whole tensor, a plain one
    sub = _sub_mesh(ctx, tuple(axes))
    shape = _full_shape(local.shape, splits, ctx)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local.detach(), sub, [Shard(d) for _, d in splits], run_check=False,
                              shape=torch.Size(shape), stride=stride)


def from_dtensor(value: Any) -> Any:
    return value.to_local() if isinstance(value, DTensor) else value


def local_like(value: Any, live: Any) -> Any:
    """``value`` as the model holds it: a DTensor stays one where the model's own tensor is a DTensor
    (FSDP2 / parallelize_module), the library's presented shards go back to plain local tensors."""
    return value if isinstance(live, DTensor) else from_dtensor(value)


def present(state: Mapping[str, Any], splits: Mapping[str, list[Split]], ctx: ParallelContext) -> dict[str, Any]:
    """A state dict with every split tensor as a DTensor (the rest unchanged)."""
    return {k: to_dtensor(v, splits[k], ctx) if k in splits and isinstance(v, torch.Tensor) else v
            for k, v in state.items()}


# ------------------------------------------------------------------ optimizer states
def _index_to_name(optimizer: torch.optim.Optimizer, module: torch.nn.Module) -> dict[int, str]:
    """torch's optimizer state dict numbers parameters in param_groups order; name them."""
    names = {id(p): n for n, p in module.named_parameters()}
    out: dict[int, str] = {}
    i = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise ParallelCtxError(f"optimizer parameter #{i} (shape {tuple(p.shape)}) is not a parameter of the "
                                       f"LightningModule; only the module's parameters can be checkpointed")
            out[i] = names[id(p)]
            i += 1
    return out


def optimizer_to_named(osd: Mapping[str, Any], optimizer: torch.optim.Optimizer, module: torch.nn.Module,
                       ctx: ParallelContext) -> dict[str, Any]:
    """torch's index-keyed optimizer state dict -> name-keyed (the layout ``torch.distributed.
    checkpoint.state_dict.get_optimizer_state_dict`` uses), moments as DTensors like their parameters."""
    names = _index_to_name(optimizer, module)
    splits = splits_by_name(module)
    params = dict(module.named_parameters())
    state: dict[str, dict[str, Any]] = {}
    for idx, entry in osd["state"].items():
        name = names[int(idx)]
        state[name] = {k: to_dtensor(v, splits.get(name, []), ctx) if _param_shaped(v, params[name]) else v
                       for k, v in entry.items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
              for g in osd["param_groups"]]
    return {"state": state, "param_groups": groups}


def _param_shaped(v: Any, p: torch.Tensor) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape == p.shape


def named_to_optimizer(named: Mapping[str, Any], optimizer: torch.optim.Optimizer,
                       module: torch.nn.Module) -> dict[str, Any]:
    """The inverse of :func:`optimizer_to_named` for this rank's ``optimizer`` (local tensors)."""
    index = {n: i for i, n in _index_to_name(optimizer, module).items()}
    missing = [n for g in named["param_groups"] for n in g["params"] if n not in index]
    if missing:
        raise ParallelCtxError(f"the checkpoint's optimizer holds parameters {missing[:5]} that this model's "
                               f"optimizer does not; is it the same model?")
    params = dict(module.named_parameters())
    return {
        "state": {index[n]: {k: local_like(v, params[n]) for k, v in entry.items()} for n, entry in named["state"].items()},
        "param_groups": [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[n] for n in g["params"]]}
                         for g in named["param_groups"]],
    }


def empty_like_saved(module: torch.nn.Module, names: Iterable[str], ctx: ParallelContext) -> dict[str, torch.Tensor]:
    """Zero tensors shaped like ``module``'s parameters ``names`` (DTensors where split), for a load
    to fill in place."""
    params = dict(module.named_parameters(remove_duplicate=False))
    splits = splits_by_name(module)
    return {n: to_dtensor(torch.zeros_like(params[n].detach()), splits.get(n, []), ctx) for n in names}
