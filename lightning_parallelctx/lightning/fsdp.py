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
from .mesh import lightning_device_mesh

if TYPE_CHECKING:
    from ..context import ParallelContext

__all__ = ["check_marks_kept", "fully_shard", "shard_model"]

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


def shard_model(module: torch.nn.Module, context: ParallelContext) -> bool:
    """The strategy's ``fsdp=True``: FSDP2 (ZeRO-3) over the dense replicas, as torchtitan and
    Lightning's tensor-parallel example apply it: each layer of a ``PipelineSequential`` and each
    element of every ``nn.ModuleList`` (the transformer blocks) is one unit, then each direct child
    of ``module`` with parameters.

    Expert and sequence-parallel parameters stay out of FSDP2 (``ignored_params``): FSDP2 would
    average them over the dense replicas, but they need the expert replicas / a sum over TENSOR,
    which the strategy's gradient handler does. Returns False (nothing done) if the model already
    holds FSDP2 modules (the user sharded it in configure_model, or an earlier fit did).
    """
    from ..dtensor import is_dtensor
    from ..markers import is_expert, is_sequence_parallel

    if fsdp_managed(module) or any(type(m).__name__.startswith("FSDP") for m in module.modules()):
        return False
    if any(is_dtensor(p) for p in module.parameters()):
        # Parameters made DTensors by parallelize_module: fully_shard composes with them, but the
        # unit choice is the user's (as in Lightning's example); doing it here would guess.
        raise ParallelCtxError(
            "ParallelCtxStrategy(fsdp=True) shards plain models (the library's layers or nn modules); this model "
            "already has DTensor parameters (parallelize_module). Fix: call fully_shard(..., "
            "mesh=self.device_mesh['data_parallel']) yourself in configure_model, as with ModelParallelStrategy, "
            "and leave fsdp=False"
        )
    mesh = lightning_device_mesh(context)["data_parallel"]
    ignored = {p for p in module.parameters() if is_expert(p) or is_sequence_parallel(p)}
    from ..pipeline import PipelineSequential

    # A PipelineSequential's layers are called one by one (run_layers, the schedules), never through
    # its forward: each layer must be a unit, or FSDP2's pre-forward all-gather never runs (seen:
    # "aten.embedding.default got mixed torch.Tensor and DTensor" on the GPT example; docs/traps.md #31).
    units = [layer for sub in module.modules() if isinstance(sub, PipelineSequential)
             for _, stage in sub.local_stages() for layer in stage.chain]
    units += [block for sub in module.modules() if isinstance(sub, torch.nn.ModuleList) for block in sub]
    units += [child for child in module.children() if any(True for _ in child.parameters())]
    for unit in units:
        if any(p not in ignored for p in unit.parameters()):
            fully_shard(unit, mesh=mesh, ignored_params=ignored & set(unit.parameters()) or None)
    return True
