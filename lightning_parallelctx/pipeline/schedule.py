"""The schedule extension point: the base class, the registry, the non-pipeline schedule and the
schedules of ``torch.distributed.pipelining`` by name.

A :class:`Schedule` runs one training (or evaluation) step of a :class:`PipelineSequential` over a
whole batch: ``forward_backward_step`` splits it into micro-batches, runs forward (and backward)
through this rank's stages and returns the batch's loss. The torch-backed schedules drive
``PipelineStage`` objects over the context's PIPELINE group with torch's own schedule classes; this
module only adds what a Lightning strategy needs around them:

- ``scale_grads=False`` and each micro-batch loss divided by (micro-batches x accumulation), because
  torch's ``scale_grads=True`` divides the whole ``.grad`` and is wrong across accumulation steps
  (docs/traps.md #21);
- the batch's true loss on every pipeline rank (the loss exists only on the last stage, which is
  pipeline rank 0 for the V schedules, docs/traps.md #24);
- stages built per input signature: torch fixes shapes at a stage's first step (docs/traps.md #23), so a
  batch of another shape (the last, smaller batch of an epoch; validation batches) gets its own
  stages instead of aborting gloo.

Register a schedule of your own with :func:`register_schedule` and name it in
``ParallelCtxStrategy(pipeline_schedule="my_schedule")`` (YAML too).
"""

from __future__ import annotations

import copy
import importlib
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
import torch.distributed as dist
from torch.distributed import pipelining as _pp

from ..errors import ParallelConfigError
from ..registry import default_name, register_class
from .placement import Placement
from .scope import call_before_backward
from .stage import RngNeutralStage, in_shape_inference

if TYPE_CHECKING:
    from .sequential import PipelineSequential

__all__ = [
    "DEFAULT_SCHEDULE",
    "NonPipelineSchedule",
    "Schedule",
    "ScheduleSpec",
    "StepResult",
    "TorchSchedule",
    "available_schedules",
    "get_schedule",
    "register_schedule",
]

DEFAULT_SCHEDULE = "1f1b"
LossFn = Callable[[Any, torch.Tensor], torch.Tensor]


@dataclass
class StepResult:
    """What one step returns.

    ``loss``: the batch's loss (mean over micro-batches), the same tensor value on every pipeline
    rank; detached when ``backward_done``. ``backward_done``: gradients are already in ``.grad``
    (pipeline schedules); otherwise ``loss`` carries the graph and the caller runs backward (the
    non-pipeline schedule leaves it to Lightning, so precision plugins and hooks work as usual).
    ``output``: the last stage's output, for forward-only calls without a target (predict).
    """

    loss: torch.Tensor | None
    backward_done: bool
    output: Any = None


class Schedule(ABC):
    """How micro-batches flow through the stages. Subclass it, implement :meth:`forward_backward_step`,
    register it with :func:`register_schedule`.

    Class attributes describe the stage layout the schedule needs; the strategy checks the user's
    ``num_microbatches`` / ``virtual_pipeline_size`` against them at construction:

    - ``placement``: ``"loop"`` (stage ``s`` on pipeline rank ``s % pp``) or ``"v"``;
    - ``multi_stage``: whether a rank may hold several stages (``virtual_pipeline_size > 1``);
    - ``default_virtual_stages``: stages per rank when ``virtual_pipeline_size`` is not given;
    - ``writes_weight_grads_directly``: weight gradients are assigned to ``.grad`` outside autograd's
      accumulation, so post-accumulate-grad hooks never fire (zero-bubble, docs/traps.md #22) and the
      strategy must tell the data-parallel gradient hook.
    """

    name: ClassVar[str] = ""
    placement: ClassVar[Placement] = "loop"
    multi_stage: ClassVar[bool] = False
    default_virtual_stages: ClassVar[int] = 1
    writes_weight_grads_directly: ClassVar[bool] = False

    def check(self, pp: int, virtual: int, num_microbatches: int) -> None:
        """Raise :class:`ParallelConfigError` for a layout this schedule cannot run."""
        if not self.multi_stage and virtual != 1:
            raise ParallelConfigError(
                f"pipeline_schedule={self.name!r} runs one stage per rank, got virtual_pipeline_size={virtual}. "
                f"Fix: leave virtual_pipeline_size unset (1), or pick a multi-stage schedule such as "
                f"'interleaved_1f1b', 'looped_bfs' or 'interleaved_zero_bubble'"
            )

    def default_microbatches(self, pp: int, virtual: int) -> int:
        """The micro-batch count when ``num_microbatches`` is not given: one per stage, the fewest
        that keeps every stage busy in the steady state."""
        return pp * virtual

    @abstractmethod
    def forward_backward_step(self, pipe: PipelineSequential, args: tuple[Any, ...], target: torch.Tensor | None,
                              loss_fn: LossFn | None, *, backward: bool, loss_scale: float = 1.0) -> StepResult:
        """One step over a whole batch ``args`` (split along dim 0 into micro-batches).

        ``backward``: compute gradients (training); otherwise forward only. ``loss_scale``: the
        factor every micro-batch loss is multiplied by before its backward (1 / accumulation).
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NonPipelineSchedule(Schedule):
    """pp = 1: the whole model on this rank, one forward over the whole batch; the caller (Lightning)
    runs backward on the returned loss."""

    name = "none"

    def check(self, pp: int, virtual: int, num_microbatches: int) -> None:
        super().check(pp, virtual, num_microbatches)
        if pp != 1:
            raise ParallelConfigError(
                f"pipeline_schedule='none' runs the whole model on one rank, got pipeline_parallel_size={pp}. "
                f"Fix: a pipeline schedule such as '1f1b', or pipeline_parallel_size=1"
            )

    def default_microbatches(self, pp: int, virtual: int) -> int:
        return 1

    def forward_backward_step(self, pipe: PipelineSequential, args: tuple[Any, ...], target: torch.Tensor | None,
                              loss_fn: LossFn | None, *, backward: bool, loss_scale: float = 1.0) -> StepResult:
        output = pipe.run_layers(*args)
        if target is None or loss_fn is None:
            return StepResult(None, False, output)
        return StepResult(loss_fn(output, target), False)


# ---------------------------------------------------------------------------------- torch schedules
class TorchSchedule(Schedule):
    """A schedule class of ``torch.distributed.pipelining`` driven over this rank's stages."""

    torch_class: ClassVar[type | None] = None
    _MAX_SIGNATURES = 4  # stages kept per (mode, input shapes); a new shape builds new ones

    def __init__(self, torch_class: type | None = None) -> None:
        if torch_class is not None:
            self.torch_class = torch_class  # type: ignore[misc]
        if self.torch_class is None:
            raise TypeError(f"{type(self).__name__} needs a torch.distributed.pipelining schedule class")
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self._loss_fn: LossFn | None = None
        self._scale = 1.0
        self._backward = False

    def __deepcopy__(self, memo: dict) -> TorchSchedule:
        # A template: a copy starts without stages (they hold process groups and modules).
        new = copy.copy(self)
        new._cache, new._loss_fn = OrderedDict(), None
        return new

    @property
    def is_single_stage(self) -> bool:
        return issubclass(self.torch_class, _pp.schedules.PipelineScheduleSingle)  # type: ignore[arg-type]

    # -- the loss torch calls on the last stage: the user's, scaled once
    def _scaled_loss(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        assert self._loss_fn is not None
        loss = self._loss_fn(output, target) * self._scale
        if self._backward and not in_shape_inference():
            call_before_backward(loss)  # torch runs this micro-batch's backward right after
        return loss

    def _build(self, pipe: PipelineSequential, mode: str) -> Any:
        plan = pipe.plan
        # Shape inference must not draw random numbers (dropout masks would change, stage.py).
        stages = [
            RngNeutralStage(module, stage_id, plan.num_stages, pipe.device, group=plan.group)
            for stage_id, module in pipe.local_stages()
        ]
        loss_fn = self._scaled_loss if mode != "predict" else None
        if self.is_single_stage:
            return self.torch_class(stages[0], plan.num_microbatches, loss_fn=loss_fn, scale_grads=False)  # type: ignore[misc]
        return self.torch_class(stages, plan.num_microbatches, loss_fn=loss_fn, scale_grads=False)  # type: ignore[misc]

    def _schedule_for(self, pipe: PipelineSequential, mode: str, args: tuple[Any, ...]) -> Any:
        key = (mode, id(pipe), tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else repr(a) for a in args))
        sched = self._cache.get(key)
        if sched is None:
            sched = self._build(pipe, mode)
            self._cache[key] = sched
            while len(self._cache) > self._MAX_SIGNATURES:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return sched

    def forward_backward_step(self, pipe: PipelineSequential, args: tuple[Any, ...], target: torch.Tensor | None,
                              loss_fn: LossFn | None, *, backward: bool, loss_scale: float = 1.0) -> StepResult:
        plan = pipe.plan
        pipe.check_batch(args, target)
        with_loss = target is not None and loss_fn is not None
        if backward and not with_loss:
            raise ValueError("a pipeline training step needs a target and a loss function (the loss exists only "
                             "on the last stage); call pipe.loss(inputs, target, loss_fn) in training_step")
        mode = "train" if backward else ("eval" if with_loss else "predict")
        sched = self._schedule_for(pipe, mode, args)
        # Each micro-batch loss is a mean over its samples: dividing by the micro-batch count makes
        # the summed gradients those of the whole batch's mean, once (scale_grads=False, docs/traps.md #21).
        self._loss_fn, self._scale, self._backward = loss_fn, float(loss_scale) / plan.num_microbatches, backward
        kwargs: dict[str, Any] = {"target": target} if with_loss else {}
        losses: list[torch.Tensor] = []
        try:
            if backward:
                output = sched.step(*args, **kwargs, losses=losses, return_outputs=False)
            else:
                output = sched.eval(*args, **kwargs, losses=losses if with_loss else None)
        finally:
            self._loss_fn, self._backward = None, False
        holder = plan.last_stage_group_rank
        if not with_loss:
            return StepResult(None, backward, _broadcast_object(output, holder, plan))
        if losses:  # only on the last stage; torch's list, not every call of the loss (shape inference calls it too)
            loss = torch.stack([x.detach().float() for x in losses]).sum() / (self._scale * plan.num_microbatches)
        else:
            loss = torch.zeros((), dtype=torch.float32, device=pipe.device)
        # Every pipeline rank reports the true loss (progress bar, sync_dist, the CLI's last line).
        dist.broadcast(loss, src=plan.group_ranks[holder], group=plan.group)
        return StepResult(loss, backward)


def _broadcast_object(obj: Any, holder: int, plan: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=plan.group_ranks[holder], group=plan.group)
    return box[0]


class _MultiLoop(TorchSchedule):
    multi_stage = True
    default_virtual_stages = 2


class _Rounds(_MultiLoop):
    """The interleaved schedules run micro-batches in rounds of ``pp``."""

    def check(self, pp: int, virtual: int, num_microbatches: int) -> None:
        super().check(pp, virtual, num_microbatches)
        rounds = max(1, num_microbatches // pp)
        if num_microbatches % rounds:
            raise ParallelConfigError(
                f"pipeline_schedule={self.name!r} runs micro-batches in rounds of pipeline_parallel_size={pp}: "
                f"num_microbatches={num_microbatches} must be a multiple of {rounds} rounds. Fix: num_microbatches="
                f"{rounds * pp} (a multiple of {pp})"
            )


class _VShape(TorchSchedule):
    placement = "v"
    multi_stage = True
    default_virtual_stages = 2
    writes_weight_grads_directly = True

    def check(self, pp: int, virtual: int, num_microbatches: int) -> None:
        if virtual != 2:
            raise ParallelConfigError(
                f"pipeline_schedule={self.name!r} places exactly 2 stages on each rank in a V, got "
                f"virtual_pipeline_size={virtual}. Fix: virtual_pipeline_size=2 (or leave it unset)"
            )


class GPipeSchedule(TorchSchedule):
    name, torch_class = "gpipe", _pp.ScheduleGPipe


class OneFOneBSchedule(TorchSchedule):
    name, torch_class = "1f1b", _pp.Schedule1F1B

    def check(self, pp: int, virtual: int, num_microbatches: int) -> None:
        super().check(pp, virtual, num_microbatches)
        _at_least(self.name, num_microbatches, pp, "pipeline_parallel_size")


class Interleaved1F1BSchedule(_Rounds):
    name, torch_class = "interleaved_1f1b", _pp.ScheduleInterleaved1F1B


class LoopedBFSSchedule(_MultiLoop):
    name, torch_class = "looped_bfs", _pp.ScheduleLoopedBFS


class InterleavedZeroBubbleSchedule(_Rounds):
    name, torch_class = "interleaved_zero_bubble", _pp.ScheduleInterleavedZeroBubble
    writes_weight_grads_directly = True


class ZBVZeroBubbleSchedule(_VShape):
    name, torch_class = "zbv_zero_bubble", _pp.ScheduleZBVZeroBubble


class DualPipeVSchedule(_VShape):
    name, torch_class = "dualpipev", _pp.ScheduleDualPipeV

    def check(self, pp: int, virtual: int, num_microbatches: int) -> None:
        super().check(pp, virtual, num_microbatches)
        _at_least(self.name, num_microbatches, 2 * pp, "the number of stages (2 x pipeline_parallel_size)")


def _at_least(name: str, m: int, need: int, what: str) -> None:
    if m < need:
        raise ParallelConfigError(
            f"pipeline_schedule={name!r} needs at least one micro-batch per stage: num_microbatches={m} is below "
            f"{what} = {need}. Fix: num_microbatches={need} or more (and a batch size divisible by it)"
        )


# ---------------------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[Schedule]] = {}
S = TypeVar("S", bound=type[Schedule])
ScheduleSpec = str | type | Schedule | Mapping[str, Any]


def register_schedule(name: str | None = None, cls: type[Schedule] | None = None, *, override: bool = False) -> Any:
    """Register a :class:`Schedule` subclass under ``name`` (default: its ``name`` attribute, else its
    lower-cased class name).

    ``register_schedule("mine", MySchedule)`` or as a decorator, ``@register_schedule("mine")``.
    """
    if isinstance(name, type):
        return _register(default_name(name), name, override)
    if cls is not None:
        return _register(name or default_name(cls), cls, override)
    return lambda klass: _register(name or default_name(klass), klass, override)


def _register(name: str, cls: Any, override: bool) -> Any:
    return register_class(_REGISTRY, name, cls, Schedule, "schedule", "lightning_parallelctx.pipeline.Schedule",
                          override)


for _cls in (NonPipelineSchedule, GPipeSchedule, OneFOneBSchedule, Interleaved1F1BSchedule, LoopedBFSSchedule,
             InterleavedZeroBubbleSchedule, ZBVZeroBubbleSchedule, DualPipeVSchedule):
    register_schedule(_cls)


def available_schedules() -> list[str]:
    return sorted(_REGISTRY)


def _wrap_torch_class(cls: type) -> Schedule:
    """A torch schedule class given directly: its layout follows from its base class."""
    known = {c.torch_class: c for c in _REGISTRY.values() if issubclass(c, TorchSchedule)}
    if cls in known:
        return known[cls]()
    if issubclass(cls, _pp.schedules.PipelineScheduleSingle):
        return TorchSchedule(cls)
    return type(f"Torch{cls.__name__}", (_MultiLoop,), {"name": cls.__name__})(cls)


def _import(path: str) -> Any:
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ParallelConfigError(
            f"pipeline_schedule={path!r} is neither a registered schedule ({', '.join(available_schedules())}) nor "
            f"an importable class path: {err}. Fix: one of those names, or 'package.module.MySchedule' after "
            f"register_schedule"
        ) from err


def get_schedule(spec: ScheduleSpec | None = None) -> Schedule:
    """A fresh :class:`Schedule` from a registered name, a dotted class path, a :class:`Schedule`
    class or instance (a template: copied), a torch schedule class, or ``{"class_path", "init_args"}``."""
    if spec is None:
        spec = DEFAULT_SCHEDULE
    if isinstance(spec, Schedule):
        return copy.deepcopy(spec)
    if isinstance(spec, Mapping):
        if "class_path" not in spec or set(spec) - {"class_path", "init_args"}:
            raise ParallelConfigError(f"pipeline_schedule mapping needs 'class_path' (and optionally 'init_args'), "
                                      f"got keys {sorted(spec)}")
        cls = _import(spec["class_path"])
        if not (isinstance(cls, type) and issubclass(cls, Schedule)):
            raise ParallelConfigError(f"pipeline_schedule class_path {spec['class_path']!r} is not a Schedule subclass")
        return cls(**dict(spec.get("init_args") or {}))
    if isinstance(spec, str):
        cls = _REGISTRY.get(spec) or _REGISTRY.get(spec.lower())
        if cls is None:
            if "." not in spec:
                raise ParallelConfigError(
                    f"pipeline_schedule={spec!r} is not a registered schedule. The names are "
                    f"{', '.join(available_schedules())}; a schedule of your own needs register_schedule first "
                    f"(or a class path 'package.module.MySchedule')"
                )
            cls = _import(spec)
        spec = cls
    if isinstance(spec, type):
        if issubclass(spec, Schedule):
            return spec()
        if issubclass(spec, _pp.schedules._PipelineSchedule):
            return _wrap_torch_class(spec)
    raise ParallelConfigError(
        f"pipeline_schedule={spec!r} ({type(spec).__name__}) must be a schedule name ({', '.join(available_schedules())}), "
        f"a Schedule class or instance, a torch.distributed.pipelining schedule class, or a class path"
    )


def _torch_schedule_getstate(self: TorchSchedule) -> dict[str, Any]:
    # Built stages hold process groups and modules: a pickled copy (docs/traps.md #9) starts without them.
    return {**self.__dict__, "_cache": OrderedDict(), "_loss_fn": None}


TorchSchedule.__getstate__ = _torch_schedule_getstate  # type: ignore[method-assign]
