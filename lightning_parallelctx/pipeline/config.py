"""The strategy's pipeline arguments, checked at construction (a bad YAML value fails at once)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ParallelConfigError
from .schedule import NonPipelineSchedule, Schedule, ScheduleSpec, get_schedule

__all__ = ["PipelineConfig", "resolve_pipeline_config"]


@dataclass(frozen=True)
class PipelineConfig:
    size: int
    schedule: Schedule  # a template: each context gets a copy (a schedule holds stages)
    num_microbatches: int
    virtual: int


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ParallelConfigError(f"{name}={value!r} must be an int >= 1 (or left unset for the default)")
    return value


def resolve_pipeline_config(size: int, schedule: ScheduleSpec | None, num_microbatches: int | None,
                            virtual: int | None) -> PipelineConfig:
    """Resolve the schedule, fill the defaults and check the layout the schedule can run."""
    if num_microbatches is not None:
        _positive_int("num_microbatches", num_microbatches)
    if virtual is not None:
        _positive_int("virtual_pipeline_size", virtual)
    template = get_schedule(schedule)  # unknown names / bad class paths fail here
    if size == 1:
        if (num_microbatches or 1) > 1 or (virtual or 1) > 1:
            raise ParallelConfigError(
                f"num_microbatches={num_microbatches} / virtual_pipeline_size={virtual} need pipeline stages, but "
                f"pipeline_parallel_size=1 runs the whole model on each rank (no schedule). Fix: "
                f"pipeline_parallel_size > 1, or leave num_microbatches and virtual_pipeline_size unset"
            )
        return PipelineConfig(1, NonPipelineSchedule(), 1, 1)
    if isinstance(template, NonPipelineSchedule):
        template.check(size, 1, 1)  # raises: 'none' with pp > 1
    v = virtual if virtual is not None else template.default_virtual_stages
    m = num_microbatches if num_microbatches is not None else template.default_microbatches(size, v)
    template.check(size, v, m)
    return PipelineConfig(size, template, m, v)
