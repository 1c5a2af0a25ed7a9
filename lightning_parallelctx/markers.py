"""Marks on parameters that say who holds what (README, "Who holds what").

Layers set them; the gradient hook, gradient clipping, checkpointing and the full <-> sharded
state-dict conversion read them. Plain attributes on the Parameter, so they survive ``.to()``,
``deepcopy`` and pickling, and cost nothing.

- tensor-parallel: the parameter is one shard of a larger one, split along ``dim`` over TENSOR
  (never reduced over TENSOR).
- expert: sharded over EXPERT (each rank holds different experts), replicated over DATA x SEQUENCE.
- sequence-parallel: replicated over TENSOR but fed sequence-sharded inputs (Megatron sequence
  parallelism, e.g. LayerNorm): its gradient is summed over TENSOR as well.
"""

from __future__ import annotations

import torch

_TP_DIM = "_pctx_tensor_parallel_dim"
_TP_SIZE = "_pctx_tensor_parallel_full_size"
_EXPERT = "_pctx_expert"
_SEQ = "_pctx_sequence_parallel"


def mark_tensor_parallel(param: torch.Tensor, dim: int, full_size: int | None = None) -> torch.Tensor:
    """``param`` is this TENSOR rank's slice along ``dim`` (``full.chunk(tp, dim)[tp_rank]``)."""
    setattr(param, _TP_DIM, dim)
    if full_size is not None:
        setattr(param, _TP_SIZE, full_size)
    return param


def tensor_parallel_dim(param: torch.Tensor) -> int | None:
    return getattr(param, _TP_DIM, None)


def tensor_parallel_full_size(param: torch.Tensor) -> int | None:
    return getattr(param, _TP_SIZE, None)


def is_tensor_parallel(param: torch.Tensor) -> bool:
    return tensor_parallel_dim(param) is not None


def mark_expert(param: torch.Tensor) -> torch.Tensor:
    setattr(param, _EXPERT, True)
    return param


def is_expert(param: torch.Tensor) -> bool:
    return bool(getattr(param, _EXPERT, False))


def mark_sequence_parallel(param: torch.Tensor) -> torch.Tensor:
    setattr(param, _SEQ, True)
    return param


def is_sequence_parallel(param: torch.Tensor) -> bool:
    return bool(getattr(param, _SEQ, False))


def mark_module(module: torch.nn.Module, *, expert: bool = False, sequence_parallel: bool = False) -> torch.nn.Module:
    """Mark every parameter of ``module`` at once (an expert MLP, a LayerNorm under Megatron SP)."""
    for p in module.parameters():
        if expert:
            mark_expert(p)
        if sequence_parallel:
            mark_sequence_parallel(p)
    return module
