"""Tensor-, sequence- and expert-parallel layers built on :mod:`lightning_parallelctx.distributed`.

Weights keep ``torch.nn.Linear``'s (out, in) layout; column shards are ``full.chunk(tp, 0)[rank]``,
row shards ``full.chunk(tp, 1)[rank]``; sharded parameters carry the markers of
:mod:`lightning_parallelctx.markers`, which drive :func:`shard_state_dict` / :func:`gather_state_dict`.
"""

from ._common import EXPERT_DIM
from .cross_entropy import VocabParallelCrossEntropy, vocab_parallel_cross_entropy
from .embedding import VocabParallelEmbedding
from .linear import ColumnParallelLinear, RowParallelLinear
from .moe import ExpertParallelMoE
from .init import init_sharded_
from .state_dict import full_shape, gather_state_dict, load_full_state_dict, shard_state_dict, shard_tensor

__all__ = [
    "EXPERT_DIM",
    "ColumnParallelLinear",
    "ExpertParallelMoE",
    "RowParallelLinear",
    "VocabParallelCrossEntropy",
    "VocabParallelEmbedding",
    "full_shape",
    "gather_state_dict",
    "init_sharded_",
    "load_full_state_dict",
    "shard_state_dict",
    "shard_tensor",
    "vocab_parallel_cross_entropy",
]
