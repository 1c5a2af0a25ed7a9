"""Lightning integration: ``ParallelCtxStrategy`` (registered as ``"parallelctx"``) and
``ParallelCtxEnvironment``."""

from .checkpoint import (
    consolidate_checkpoint,
    consolidate_to_file,
    gather_full_state_dict,
    shard_state_dict,
)
from .environment import LaunchMismatchError, ParallelCtxEnvironment
from .grad_norm import clip_grad_norm_, grad_norm
from .strategy import ParallelCtxStrategy, register

register()

__all__ = [
    "LaunchMismatchError",
    "ParallelCtxEnvironment",
    "ParallelCtxStrategy",
    "clip_grad_norm_",
    "consolidate_checkpoint",
    "consolidate_to_file",
    "gather_full_state_dict",
    "grad_norm",
    "shard_state_dict",
]
