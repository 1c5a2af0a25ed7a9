"""A reference mixture-of-experts layer with its experts split over the EXPERT group."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .. import markers
from ..distributed import expert as E
from ..distributed._state import ContextLike
from ..mode import ParallelMode
from ._common import EXPERT_DIM, _ParallelLayer, is_meta, shard_size


class ExpertParallelMoE(_ParallelLayer):
    """Top-k routed MLP experts, dropless (no capacity limit, so the result is exact).

    ``num_experts`` experts, each ``Linear(d_model, d_hidden) -> activation -> Linear(d_hidden,
    d_model)``, stored stacked (expert index on dim 0: ``w1`` (E, d_model, d_hidden), ``b1``
    (E, d_hidden), ``w2`` (E, d_hidden, d_model), ``b2`` (E, d_model)); this rank holds
    ``full.chunk(ep, 0)[ep_rank]`` and its expert parameters are marked with
    :func:`~lightning_parallelctx.markers.mark_expert`. The router (``gate``) is dense and
    replicated. Tokens go to their experts' ranks with :func:`~lightning_parallelctx.distributed.dispatch`
    and come back with :func:`~lightning_parallelctx.distributed.combine`.

    Gradients: an expert's weight gradient sums the contributions of the tokens of every EXPERT
    rank (they flow back through the all-to-all); the router's gradient covers this rank's tokens
    only (it is averaged with the other data shards by the gradient hook).

    Initialised from the global RNG like ``nn.Linear`` per expert (drawn for all experts, then
    sliced), so ep=n equals ep=1 under the same seed.
    """

    def __init__(self, d_model: int, d_hidden: int, num_experts: int, top_k: int = 1, *,
                 activation: Callable[[torch.Tensor], torch.Tensor] = F.gelu, normalize_weights: bool = True,
                 mode: "ParallelMode | str" = ParallelMode.EXPERT, context: ContextLike | None = None,
                 device: "torch.device | str | None" = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self._setup_group(mode, context)
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        self.d_model, self.d_hidden, self.num_experts, self.top_k = d_model, d_hidden, num_experts, top_k
        self.activation, self.normalize_weights = activation, normalize_weights
        self.experts_per_rank = shard_size(num_experts, self.world_size, "num_experts", self.mode)
        kw = {"device": device, "dtype": dtype}
        self.gate = torch.nn.Linear(d_model, num_experts, bias=False, **kw)
        n = self.experts_per_rank
        self.w1 = torch.nn.Parameter(torch.empty(n, d_model, d_hidden, **kw))
        self.b1 = torch.nn.Parameter(torch.empty(n, d_hidden, **kw))
        self.w2 = torch.nn.Parameter(torch.empty(n, d_hidden, d_model, **kw))
        self.b2 = torch.nn.Parameter(torch.empty(n, d_model, **kw))
        for p in (self.w1, self.b1, self.w2, self.b2):
            markers.mark_expert(p)
        if not is_meta(device):
            self.reset_expert_parameters()

    @torch.no_grad()
    def reset_expert_parameters(self) -> None:
        """Draw every expert (uniform(+-1/sqrt(fan_in)), as nn.Linear), keep this rank's block."""
        full = {}
        for name, fan_in in (("w1", self.d_model), ("b1", self.d_model), ("w2", self.d_hidden), ("b2", self.d_hidden)):
            p = getattr(self, name)
            t = torch.empty((self.num_experts, *p.shape[1:]), device=p.device, dtype=p.dtype)
            bound = 1 / math.sqrt(fan_in)
            full[name] = torch.nn.init.uniform_(t, -bound, bound)
        self.init_from_full(**full)

    @torch.no_grad()
    def init_from_full(self, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> None:
        """Load this rank's experts from the stacked tensors of all experts."""
        for name, full in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
            getattr(self, name).copy_(full.chunk(self.world_size, EXPERT_DIM)[self.rank])

    def _experts(self, tokens: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        # Group the received tokens by local expert, run each expert on its block, restore order.
        order = torch.argsort(local_ids, stable=True)
        counts = torch.bincount(local_ids, minlength=self.experts_per_rank).tolist()
        blocks = tokens.index_select(0, order).split(counts)
        outs = [self.activation(blk @ self.w1[e] + self.b1[e]) @ self.w2[e] + self.b2[e]
                for e, blk in enumerate(blocks)]
        out = torch.cat(outs) if outs else tokens
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return out.index_select(0, inverse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._group()  # fails clearly if the context changed under the layer
        shape = x.shape
        flat = x.reshape(-1, self.d_model)
        probs = torch.softmax(self.gate(flat).float(), dim=-1).to(flat.dtype)
        weights, experts = probs.topk(self.top_k, dim=-1)  # (N, k)
        if self.normalize_weights and self.top_k > 1:
            weights = weights / weights.sum(-1, keepdim=True)
        routed = flat.unsqueeze(1).expand(-1, self.top_k, -1).reshape(-1, self.d_model)
        received, local_ids, handle = E.dispatch(routed, experts.reshape(-1), self.num_experts, self.mode,
                                                 context=self._context)
        out = E.combine(self._experts(received, local_ids), handle)
        out = (out.view(-1, self.top_k, self.d_model) * weights.unsqueeze(-1)).sum(1)
        return out.reshape(shape)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_hidden={self.d_hidden}, num_experts={self.num_experts} "
                f"({self.experts_per_rank} on rank {self.rank} of {self.world_size} in {self.mode!r}), "
                f"top_k={self.top_k}")
