"""Which ranks each parameter's gradient is reduced over (README, "Who holds what")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ..errors import ParallelCtxError
from ..markers import is_expert, is_sequence_parallel, is_tensor_parallel

if TYPE_CHECKING:
    from ..context import ParallelContext


@dataclass(frozen=True)
class ReductionPlan:
    """A parameter's gradient is summed over ``tensor`` (if any) and over ``replica``, then divided
    by ``divisor``.

    The divisor is the number of data-parallel ranks (DATA x SEQUENCE x EXPERT) for every kind of
    parameter, so that every gradient is that of the loss averaged over the whole batch. For a
    dense parameter it equals the replica count (a plain average). An expert parameter has fewer
    replicas (DATA x SEQUENCE), but each EXPERT rank trained on its own data shard (and the token
    all-to-all already summed the other EXPERT ranks' contributions into it), so averaging over its
    replicas alone would weigh it ``expert_parallel_size`` times too much; Megatron-core scales
    expert gradients by 1 / data-parallel size for the same reason.

    ``None`` stands for a group of one rank (nothing to communicate). A plan can still have work
    without communication: an expert parameter with no replica (tp2-ep2, ep4) is only scaled by
    1 / divisor. The ranks tuples make the plan comparable: parameters of different kinds with the
    same ranks share buckets.
    """

    replica_ranks: tuple[int, ...]
    tensor_ranks: tuple[int, ...]
    replica: dist.ProcessGroup | None
    tensor: dist.ProcessGroup | None
    divisor: int

    @property
    def active(self) -> bool:
        """Whether the handlers have anything to do: communicate, or at least scale."""
        return self.replica is not None or self.tensor is not None or self.divisor != 1

    @property
    def key(self) -> tuple:
        return (self.replica_ranks, self.tensor_ranks, self.divisor)


def param_kind(param: torch.Tensor) -> tuple[bool, bool]:
    """(expert, sequence_parallel) from the markers; contradictory marks are an error."""
    expert, seq = is_expert(param), is_sequence_parallel(param)
    if seq and is_tensor_parallel(param):
        raise ParallelCtxError(
            "a parameter is marked both tensor-parallel (a shard, never reduced over TENSOR) and "
            "sequence-parallel (replicated over TENSOR, summed over it); remove one of the marks"
        )
    return expert, seq


class GroupResolver:
    """Reduction plans per parameter kind, from a ParallelContext or (without one) the whole world."""

    def __init__(self, ctx: ParallelContext | None):
        self.ctx = ctx
        self._plans: dict[tuple[bool, bool], ReductionPlan] = {}

    def plan(self, param: torch.Tensor, name: str = "") -> ReductionPlan:
        kind = param_kind(param)
        if kind not in self._plans:
            self._plans[kind] = self._make(*kind, name=name)
        return self._plans[kind]

    def _make(self, expert: bool, seq: bool, name: str) -> ReductionPlan:
        if self.ctx is None:
            if expert or seq:
                raise ParallelCtxError(
                    f"parameter {name!r} is marked {'expert' if expert else 'sequence-parallel'}, which needs "
                    f"a ParallelContext to know its replica/tensor groups; pass ctx=ParallelContext.from_...(...)"
                )
            if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
                return ReductionPlan((0,), (0,), None, None, 1)
            ranks = tuple(range(dist.get_world_size()))
            return ReductionPlan(ranks, (dist.get_rank(),), dist.group.WORLD, None, len(ranks))
        replica_mode = "expert_replica" if expert else "dense_replica"
        replica_ranks = tuple(self.ctx.get_ranks_in_group(replica_mode))
        tensor_ranks = tuple(self.ctx.get_ranks_in_group("tensor")) if seq else (self.ctx.get_global_rank(),)
        divisor = self.ctx.get_world_size("dense_replica")
        # get_group makes size-1 groups on demand: never ask for one we would not use.
        replica = self.ctx.get_group(replica_mode) if len(replica_ranks) > 1 else None
        tensor = self.ctx.get_group("tensor") if len(tensor_ranks) > 1 else None
        return ReductionPlan(replica_ranks, tensor_ranks, replica, tensor, divisor)
