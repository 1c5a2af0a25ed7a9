"""Lightning integration: ``ParallelCtxStrategy`` (registered as ``"parallelctx"``) and
``ParallelCtxEnvironment``."""

from .checkpoint import (
    consolidate_checkpoint,
    consolidate_to_file,
    gather_full_state_dict,
    shard_state_dict,
)
from .environment import LaunchMismatchError, ParallelCtxEnvironment
from .fsdp import fully_shard
from .grad_norm import clip_grad_norm_, grad_norm
from .mesh import lightning_device_mesh
from .strategy import ParallelCtxStrategy, register

register()

__all__ = [
    "LaunchMismatchError",
    "ParallelCtxEnvironment",
    "ParallelCtxStrategy",
    "clip_grad_norm_",
    "consolidate_checkpoint",
    "consolidate_to_file",
    "fully_shard",
    "gather_full_state_dict",
    "grad_norm",
    "lightning_device_mesh",
    "shard_state_dict",
]
