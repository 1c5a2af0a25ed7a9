"""Rank math of a pipeline: which layers form which stage, and which pipeline rank holds it.

Pure functions, no process talk, so the planner and the tests can use them without a world.

- Layers are split into ``num_stages`` contiguous runs as evenly as possible (earlier stages take
  the remainder), the split Megatron and torchtitan use for uniform transformer blocks.
- ``"loop"`` placement (GPipe, 1F1B, the interleaved schedules): stage ``s`` is on pipeline rank
  ``s % pp``, so rank ``r`` holds stages ``r, r + pp, r + 2 pp, ...``.
- ``"v"`` placement (ZBV zero bubble, DualPipeV): two stages per rank, rank ``r`` holds stages
  ``r`` and ``2 pp - 1 - r``; the first and the last stage are both on rank 0.
"""

from __future__ import annotations

from typing import Literal

from ..errors import ParallelConfigError

Placement = Literal["loop", "v"]

__all__ = ["Placement", "last_stage_rank", "layer_ranges", "stage_rank", "stages_of_rank"]


def layer_ranges(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of the layers of each stage."""
    if num_stages > num_layers:
        raise ParallelConfigError(
            f"the pipeline has {num_stages} stages (pipeline_parallel_size x virtual_pipeline_size) but the model "
            f"declares only {num_layers} layers: every stage needs at least one layer. Fix: declare more (finer) "
            f"layers, or lower pipeline_parallel_size / virtual_pipeline_size"
        )
    base, extra = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for s in range(num_stages):
        stop = start + base + (1 if s < extra else 0)
        ranges.append((start, stop))
        start = stop
    return ranges


def stage_rank(stage: int, pp: int, num_stages: int, placement: Placement) -> int:
    """The pipeline rank that holds ``stage``."""
    if placement == "loop":
        return stage % pp
    if num_stages != 2 * pp:
        raise ParallelConfigError(
            f"V placement puts exactly 2 stages on each of the {pp} pipeline ranks, got {num_stages} stages. "
            f"Fix: virtual_pipeline_size=2 for this schedule"
        )
    return stage if stage < pp else 2 * pp - 1 - stage


def stages_of_rank(rank: int, pp: int, num_stages: int, placement: Placement) -> list[int]:
    """The stage ids pipeline rank ``rank`` holds, in increasing order."""
    return [s for s in range(num_stages) if stage_rank(s, pp, num_stages, placement) == rank]


def last_stage_rank(pp: int, num_stages: int, placement: Placement) -> int:
    """The pipeline rank that computes the loss (rank 0 for V placement)."""
    return stage_rank(num_stages - 1, pp, num_stages, placement)
