"""The strategy's pipeline glue: what Lightning's automatic optimization needs around a schedule.

Lightning's closure runs ``training_step``, then ``zero_grad``, then ``backward`` (docs/traps.md #19).
A pipeline schedule computes the gradients inside ``training_step``, so the strategy

- sets the fit loop's ``_skip_backward`` (Lightning then skips its own zero_grad and backward, as
  for its SWA callback) and runs ``on_before_zero_grad`` / ``optimizer_zero_grad`` itself, before
  ``training_step``, on the first batch of each accumulation window;
- runs ``training_step`` inside :func:`backward_scope` with each micro-batch loss scaled by
  1 / accumulate_grad_batches (torch's ``scale_grads`` is off, docs/traps.md #21), and inside the
  gradient handler's ``no_sync()``: the schedule accumulates several micro-batches into one
  parameter (docs/traps.md #25); the strategy's ``optimizer_step`` synchronises once afterwards;
- after a zero-bubble schedule, which assigns weight gradients outside autograd's accumulation so
  post-accumulate-grad hooks never fire (docs/traps.md #22), replays one zero accumulation per
  parameter: every hook-based gradient handler then knows the parameter has a gradient;
- calls ``on_before_backward`` on the last stage with each micro-batch's scaled loss (graph
  attached) just before torch runs its backward, from the schedule's loss function: the losses one
  batch passes sum to the loss Lightning passes at pp = 1 (its closure loss, divided by the
  accumulation); the other stages hold no loss and get no call. ``on_after_backward`` runs once per
  batch on every rank, after the schedule (the gradients exist then).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.trainer import call

from ..errors import ParallelConfigError
from ..pipeline import PipelineConfig, PipelineSequential, StagePlan, backward_scope
from ..random import derive_seed

__all__ = ["PipelineRuntime", "find_pipes", "is_ddp_handler"]


def find_pipes(module: torch.nn.Module) -> list[PipelineSequential]:
    return [m for m in module.modules() if isinstance(m, PipelineSequential)]


def is_ddp_handler(spec: Any) -> bool:
    from ..grad_sync import DDPGradientHandler

    if isinstance(spec, dict):
        spec = spec.get("class_path", "")
    if isinstance(spec, str):
        return spec == "ddp" or spec.endswith("DDPGradientHandler")
    return isinstance(spec, DDPGradientHandler) or (isinstance(spec, type) and issubclass(spec, DDPGradientHandler))


class PipelineRuntime:
    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.plan: StagePlan | None = None
        self._ctx: Any = None

    @property
    def active(self) -> bool:
        return self.config.size > 1

    def plan_for(self, ctx: Any) -> StagePlan:
        """One plan per context: a later validate/test reuses the stages fit built."""
        if self.plan is None or self._ctx is not ctx:
            import copy

            self.plan = StagePlan.build(ctx, copy.deepcopy(self.config.schedule), self.config.num_microbatches,
                                        self.config.virtual)
            self._ctx = ctx
        return self.plan

    def check_module(self, module: Any, fitting: bool, precision: Any = None) -> None:
        """pp > 1 needs the model declared as stages, automatic optimization and no loss scaler
        (checked on every rank, before any process talks)."""
        if not self.active:
            return
        if fitting and getattr(precision, "scaler", None) is not None:
            # The scaler multiplies the loss in Lightning's backward, which the schedule replaces:
            # the optimizer step would then unscale gradients that were never scaled.
            raise ParallelConfigError(
                f"precision with a gradient scaler ({type(precision).__name__}, e.g. '16-mixed') cannot run under a "
                f"pipeline schedule (pipeline_parallel_size={self.config.size}): the schedule runs backward without "
                f"the scaler. Fix: precision='bf16-mixed' or '32-true', or pipeline_parallel_size=1"
            )
        pipes = find_pipes(module)
        if not pipes:
            raise ParallelConfigError(
                f"pipeline_parallel_size={self.config.size} but {type(module).__name__} holds no PipelineSequential: "
                f"every rank would run the whole model. Fix: declare the layers in configure_model as "
                f"self.pipe = PipelineSequential(layers, stage_plan(self), init=...) (docs/pipeline.md), or "
                f"pipeline_parallel_size=1"
            )
        if fitting and not module.automatic_optimization:
            raise ParallelConfigError(
                f"manual optimization (automatic_optimization=False) with pipeline_parallel_size={self.config.size} "
                f"is not supported: the schedule runs backward inside training_step, so manual_backward has "
                f"nothing to do. Fix: automatic optimization, or pipeline_parallel_size=1"
            )

    def setup_fit(self, trainer: Any) -> None:
        if self.active:
            trainer.fit_loop._skip_backward = True
            assert self.plan is not None
            _decorrelate_stages(self.plan.pp_rank)
            for pipe in find_pipes(trainer.lightning_module):
                pipe.sync_tied_weights()  # tied copies on the first and last stage start equal

    def teardown(self, trainer: Any) -> None:
        if self.active and trainer is not None:
            trainer.fit_loop._skip_backward = False

    def training_step(self, trainer: Any, handler: Any, optimizers: list, run: Callable[[], Any]) -> Any:
        loop = trainer.fit_loop.epoch_loop
        accumulate = trainer.accumulate_grad_batches
        if optimizers and loop.batch_idx % accumulate == 0:
            auto = loop.automatic_optimization
            auto._on_before_zero_grad(optimizers[0])
            auto._optimizer_zero_grad(loop.batch_idx, optimizers[0])
        sync_off = handler.no_sync() if handler is not None else _null()

        def before_backward(loss: torch.Tensor) -> None:
            call._call_callback_hooks(trainer, "on_before_backward", loss)
            call._call_lightning_module_hook(trainer, "on_before_backward", loss)

        with sync_off, backward_scope(1.0 / accumulate, before_backward):
            output = run()
            assert self.plan is not None
            if self.plan.schedule.writes_weight_grads_directly:
                _replay_accumulation(trainer.lightning_module)
            if not trainer.fit_loop._should_accumulate():
                for pipe in find_pipes(trainer.lightning_module):
                    pipe.reduce_tied_grads()  # once per optimizer step: each stage saw its own use
        loss = output.get("loss") if isinstance(output, dict) else output
        if isinstance(loss, torch.Tensor):
            call._call_callback_hooks(trainer, "on_after_backward")
            call._call_lightning_module_hook(trainer, "on_after_backward")
        return output


def _decorrelate_stages(pp_rank: int) -> None:
    """Pipeline rank r > 0 re-seeds its default generator from (seed, r), as Megatron offsets its
    seed by the pipeline rank: seeded alike (seed_everything), every stage would draw the same
    numbers, so dropout layers of equal shape on different stages would drop the same units. Done
    after the model is built (initial weights are unchanged); a resumed fit then restores each
    rank's saved generators."""
    if pp_rank > 0:
        torch.manual_seed(derive_seed(torch.initial_seed(), "pipeline", (pp_rank,)))


def _replay_accumulation(module: torch.nn.Module) -> None:
    params = [p for p in module.parameters() if p.requires_grad and p.grad is not None]
    if params:
        # Adding zeros through autograd fires each parameter's post-accumulate-grad hooks.
        torch.autograd.backward(params, grad_tensors=[torch.zeros_like(p) for p in params])


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None
