"""Full (unsharded) <-> sharded state dicts, for any module, driven by the parameter markers.

A parameter marked tensor-parallel along ``dim`` holds ``full.chunk(n, dim)[rank]`` of its mode's
group (TENSOR unless the layer was built over another mode); an expert parameter holds
``full.chunk(ep, 0)[ep_rank]`` (experts stacked on dim 0). Everything else - buffers, replicated
parameters, sequence-parallel-marked ones - is the same on every rank and passes through.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .. import markers
from ..distributed import _comm
from ..distributed._state import ContextLike, group_info
from ..errors import ParallelCtxError
from ..mode import ParallelMode
from ._common import EXPERT_DIM, TP_MODE_ATTR


def _params_by_key(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    # remove_duplicate=False: a tied parameter appears under every name state_dict() uses.
    return dict(model.named_parameters(remove_duplicate=False))


def _splits(p: torch.Tensor) -> list[tuple[str, int]]:
    """(mode, dim) of every split of ``p``, outermost first (expert, then tensor)."""
    out = []
    if markers.is_expert(p):
        out.append((ParallelMode.EXPERT.value, EXPERT_DIM))
    dim = markers.tensor_parallel_dim(p)
    if dim is not None:
        out.append((getattr(p, TP_MODE_ATTR, ParallelMode.TENSOR.value), dim))
    return out


def shard_state_dict(full_state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module,
                     context: ContextLike | None = None) -> dict[str, torch.Tensor]:
    """This rank's state dict for ``model`` from a full one (e.g. saved by the tp=1 model).

    Pure slicing, no communication. Each shard is a copy, so the full tensors can be freed.
    """
    params = _params_by_key(model)
    out: dict[str, torch.Tensor] = {}
    for key, value in full_state_dict.items():
        p = params.get(key)
        out[key] = value if p is None or not _splits(p) else shard_tensor(value, p, context, key).clone()
    return out


def shard_tensor(full: torch.Tensor, p: torch.Tensor, context: ContextLike | None = None, key: str = "") -> torch.Tensor:
    """This rank's piece of ``full`` for parameter ``p`` (a view; ``full`` itself if ``p`` is unsplit)."""
    v = full
    for mode, dim in _splits(p):
        g = group_info(mode, context)
        if v.shape[dim] % g.size:
            raise ParallelCtxError(
                f"{key}: full size {v.shape[dim]} along dim {dim} is not divisible by the {mode!r} "
                f"group size {g.size}"
            )
        v = v.chunk(g.size, dim)[g.rank]
    if v.shape != p.shape:
        raise ParallelCtxError(
            f"{key}: the full tensor {tuple(full.shape)} gives a shard {tuple(v.shape)} but the "
            f"model's parameter is {tuple(p.shape)}; is the full state dict from the same architecture?"
        )
    return v


def full_shape(p: torch.Tensor, context: ContextLike | None = None) -> torch.Size:
    """The shape of the unsplit tensor ``p`` is a piece of (``p.shape`` if it is not split)."""
    shape = list(p.shape)
    for mode, dim in _splits(p):
        shape[dim] *= group_info(mode, context).size
    return torch.Size(shape)


def gather_state_dict(model: torch.nn.Module, context: ContextLike | None = None) -> dict[str, torch.Tensor]:
    """The full state dict of a sharded ``model``, on every rank (loadable by the tp=1 model).

    A collective: every rank of the groups involved must call it (same model, same order).
    """
    params = _params_by_key(model)
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        p = params.get(key)
        v = value.detach()
        for mode, dim in reversed(_splits(p) if p is not None else []):
            g = group_info(mode, context)
            if g.size > 1:
                v = _comm.all_gather(v, dim, [v.shape[dim]] * g.size, g)
        out[key] = v
    return out


def load_full_state_dict(model: torch.nn.Module, full_state_dict: Mapping[str, torch.Tensor],
                         context: ContextLike | None = None, strict: bool = True) -> "torch.nn.modules.module._IncompatibleKeys":
    """``model.load_state_dict(shard_state_dict(full_state_dict, model, context), strict)``."""
    return model.load_state_dict(shard_state_dict(full_state_dict, model, context), strict=strict)
