"""Vocabulary-parallel embedding (Megatron): the vocabulary rows split over the group."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..distributed import collectives as C
from ..distributed._state import ContextLike
from ..mode import ParallelMode
from ._common import InitFn, _ParallelLayer, is_meta, mark_shard, shard_size


class VocabParallelEmbedding(_ParallelLayer):
    """``torch.nn.Embedding`` whose weight is ``full.chunk(tp, 0)[tp_rank]``.

    Each rank looks up the ids that fall in its rows (others give zeros) and the partial results
    are summed over the group (reduce-scattered along ``sequence_dim`` with
    ``sequence_parallel=True``). ``num_embeddings`` must divide by the group size: pad the
    vocabulary (Megatron's ``make_vocab_size_divisible_by``). Initialised like ``nn.Embedding``
    (N(0, 1) on the full table, padding row zeroed), so equal to slicing it under the same seed.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, *,
                 sequence_parallel: bool = False, sequence_dim: int = 0, init_method: InitFn | None = None,
                 mode: "ParallelMode | str" = ParallelMode.TENSOR, context: ContextLike | None = None,
                 device: "torch.device | str | None" = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self._setup_group(mode, context)
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx={padding_idx} must be within num_embeddings={num_embeddings}")
            padding_idx %= num_embeddings
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.sequence_parallel, self.sequence_dim = sequence_parallel, sequence_dim
        self.rows_per_rank = shard_size(num_embeddings, self.world_size, "num_embeddings", self.mode)
        self.vocab_start = self.rank * self.rows_per_rank
        self.vocab_end = self.vocab_start + self.rows_per_rank
        self.weight = torch.nn.Parameter(torch.empty(self.rows_per_rank, embedding_dim, device=device, dtype=dtype))
        mark_shard(self.weight, 0, num_embeddings, self.mode)
        self.init_method = init_method
        if not is_meta(device):
            self.reset_parameters()

    @property
    def _local_padding_idx(self) -> int | None:
        p = self.padding_idx
        return None if p is None or not self.vocab_start <= p < self.vocab_end else p - self.vocab_start

    @torch.no_grad()
    def reset_parameters(self) -> None:
        full = torch.empty(self.num_embeddings, self.embedding_dim, device=self.weight.device, dtype=self.weight.dtype)
        (self.init_method or torch.nn.init.normal_)(full)
        if self.padding_idx is not None:
            full[self.padding_idx].zero_()
        self.init_from_full(full)

    @torch.no_grad()
    def init_from_full(self, weight: torch.Tensor) -> None:
        """Load this rank's rows of a full (num_embeddings, embedding_dim) table."""
        self.weight.copy_(weight.chunk(self.world_size, 0)[self.rank])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        g = self._group()
        if g.size == 1:
            return F.embedding(ids, self.weight, self.padding_idx)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight, self._local_padding_idx)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)  # also stops gradient to row 0 for them
        if self.sequence_parallel:
            return C.reduce_scatter(out, self.sequence_dim, self.mode, context=self._context)
        return C.reduce(out, self.mode, context=self._context)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim} (rows {self.vocab_start}:{self.vocab_end} on "
                f"rank {self.rank} of {self.world_size} in {self.mode!r}), padding_idx={self.padding_idx}")
