"""A schedule of your own, registered from Python and named from YAML.

    from examples.pipeline.schedules import CountingGPipe   # importing registers "counting_gpipe"
    ParallelCtxStrategy(pipeline_parallel_size=2, pipeline_schedule="counting_gpipe")

or in a LightningCLI config (the model's module imports this one, so the name exists when the
strategy is built)::

    strategy:
      class_path: lightning_parallelctx.ParallelCtxStrategy
      init_args: {pipeline_parallel_size: 2, pipeline_schedule: counting_gpipe}

A schedule implements ``forward_backward_step``; this one reuses torch's GPipe through
``GPipeSchedule`` and counts the micro-batches it ran, the place to add timing or logging.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_parallelctx.pipeline import register_schedule
from lightning_parallelctx.pipeline.schedule import GPipeSchedule, StepResult


@register_schedule("counting_gpipe")
class CountingGPipe(GPipeSchedule):
    name = "counting_gpipe"

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0
        self.microbatches = 0

    def forward_backward_step(self, pipe: Any, args: tuple[Any, ...], target: torch.Tensor | None, loss_fn: Any, *,
                              backward: bool, loss_scale: float = 1.0) -> StepResult:
        result = super().forward_backward_step(pipe, args, target, loss_fn, backward=backward, loss_scale=loss_scale)
        if backward:
            self.steps += 1
            self.microbatches += pipe.plan.num_microbatches
        return result
