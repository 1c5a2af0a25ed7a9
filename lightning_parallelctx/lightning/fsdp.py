"""FSDP2 ``fully_shard`` over the context's data ranks, keeping the library's parameter marks.

torch's ``fully_shard`` replaces every parameter with a new ``nn.Parameter`` holding a DTensor,
and the marks the library's layers put on their parameters (tensor-parallel shard, expert,
sequence-parallel; :mod:`lightning_parallelctx.markers`) are plain attributes of the old
Parameter: they vanish. Gradient clipping would then count a column-parallel shard as a replica
of TENSOR rank 0's and clip by a wrong norm, silently. This wrapper carries the marks over, and
:func:`check_marks_kept` turns torch's own ``fully_shard`` on a library layer into a clear error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..dtensor import fsdp_managed
from ..errors import ParallelCtxError
from ..markers import _EXPERT, _SEQ, _TP_DIM, _TP_SIZE
from ..nn._common import TP_MODE_ATTR, _ParallelLayer

if TYPE_CHECKING:
    from ..context import ParallelContext

__all__ = ["check_marks_kept", "fully_shard"]

_MARKS = (_TP_DIM, _TP_SIZE, _EXPERT, _SEQ, TP_MODE_ATTR)


def fully_shard(module: torch.nn.Module, *, mesh: Any = None, context: ParallelContext | None = None,
                **kwargs: Any) -> torch.nn.Module:
    """``torch.distributed.fsdp.fully_shard(module, mesh=..., **kwargs)`` that keeps the marks.

    ``mesh`` defaults to the context's ``"data_parallel"`` mesh (DATA x SEQUENCE x EXPERT, where dense
    gradients are averaged); ``context`` defaults to the current one.
    """
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    if mesh is None:
        from ..distributed._state import resolve
        from .mesh import lightning_device_mesh

        mesh = lightning_device_mesh(resolve(context))["data_parallel"]  # type: ignore[arg-type]
    marks = {(id(sub), name): {a: getattr(p, a) for a in _MARKS if hasattr(p, a)}
             for sub in module.modules() for name, p in sub.named_parameters(recurse=False)}
    torch_fully_shard(module, mesh=mesh, **kwargs)
    group = module._get_fsdp_state()._fsdp_param_group  # type: ignore[operator]
    for fsdp_param in group.fsdp_params if group is not None else ():
        info = fsdp_param._module_info
        # On the FSDPParam, which lives as long as the sharding: FSDP2 replaces the Parameter
        # object itself on module.to()/_apply (seen: the marks vanished after Lightning's
        # model_to_device). dtensor.fsdp_managed() puts them back on the current Parameter.
        fsdp_param._pctx_marks = marks.get((id(info.module), info.param_name), {})
    fsdp_managed(module)
    return module


def check_marks_kept(module: torch.nn.Module, fsdp: dict[int, Any]) -> None:
    """Raise if torch's ``fully_shard`` dropped the marks of a library tensor-parallel layer."""
    for name, sub in module.named_modules():
        if not isinstance(sub, _ParallelLayer) or getattr(sub, "world_size", 1) == 1:
            continue
        params = list(sub.parameters(recurse=False))
        if params and all(id(p) in fsdp for p in params) and not any(hasattr(p, a) for p in params for a in _MARKS):
            raise ParallelCtxError(
                f"{type(sub).__name__} {name!r} was sharded by torch's fully_shard, which drops the library's "
                f"tensor-parallel marks from its parameters: gradient clipping would count its shards as "
                f"replicas. Fix: use lightning_parallelctx.lightning.fully_shard (same arguments; the mesh "
                f"defaults to self.device_mesh['data_parallel'])"
            )
