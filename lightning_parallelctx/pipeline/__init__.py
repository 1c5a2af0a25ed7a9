"""Pipeline parallelism: declare a model as ordered layers, run it with any schedule.

- :class:`PipelineSequential` — the layers; each rank builds only its stages' layers (see docs/pipeline.md).
- :class:`Schedule` and :func:`register_schedule` — the schedule extension point; every schedule
  ``torch.distributed.pipelining`` ships is registered by name ("gpipe", "1f1b", "interleaved_1f1b",
  "looped_bfs", "interleaved_zero_bubble", "zbv_zero_bubble", "dualpipev"), "none" is pp = 1.
- :mod:`.placement` — the rank math (layers -> stages -> ranks), usable without processes.
"""

from .config import PipelineConfig, resolve_pipeline_config
from .placement import last_stage_rank, layer_ranges, stage_rank, stages_of_rank
from .schedule import (
    DEFAULT_SCHEDULE,
    NonPipelineSchedule,
    Schedule,
    ScheduleSpec,
    StepResult,
    TorchSchedule,
    available_schedules,
    get_schedule,
    register_schedule,
)
from .scope import backward_scope, call_before_backward
from .sequential import PipelineSequential, StagePlan, stage_plan

__all__ = [
    "DEFAULT_SCHEDULE",
    "NonPipelineSchedule",
    "PipelineConfig",
    "PipelineSequential",
    "Schedule",
    "ScheduleSpec",
    "StagePlan",
    "StepResult",
    "TorchSchedule",
    "available_schedules",
    "backward_scope",
    "call_before_backward",
    "get_schedule",
    "last_stage_rank",
    "layer_ranges",
    "register_schedule",
    "resolve_pipeline_config",
    "stage_plan",
    "stage_rank",
    "stages_of_rank",
]
