"""What a training step tells the schedule it runs: the loss scale and who hears each loss.

The strategy runs ``training_step`` inside :func:`backward_scope`; there
:meth:`PipelineSequential.loss` runs the schedule with backward, each micro-batch loss multiplied
by the scope's ``loss_scale`` and handed, just before its backward, to the scope's
``before_backward`` (the strategy's runs Lightning's ``on_before_backward`` hooks). A schedule of
your own that runs backward itself calls :func:`call_before_backward` with each micro-batch's
scaled loss before its backward.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

__all__ = ["backward_scope", "backward_scale", "call_before_backward"]

BeforeBackward = Callable[[torch.Tensor], None]
_scope = threading.local()


@contextmanager
def backward_scope(loss_scale: float = 1.0, before_backward: BeforeBackward | None = None) -> Iterator[None]:
    """Inside, :meth:`PipelineSequential.loss` at pp > 1 runs the schedule with backward, each
    micro-batch loss multiplied by ``loss_scale`` (the strategy passes 1 / accumulate_grad_batches)
    and given to ``before_backward`` before its backward (graph attached, on the last stage)."""
    previous = (getattr(_scope, "scale", None), getattr(_scope, "hook", None))
    _scope.scale, _scope.hook = float(loss_scale), before_backward
    try:
        yield
    finally:
        _scope.scale, _scope.hook = previous


def backward_scale() -> float | None:
    """The scope's loss scale; ``None`` outside :func:`backward_scope` (forward only)."""
    return getattr(_scope, "scale", None)


def call_before_backward(loss: torch.Tensor) -> None:
    """Hand one micro-batch's scaled loss to the scope's ``before_backward`` (no-op without one)."""
    hook = getattr(_scope, "hook", None)
    if hook is not None:
        hook(loss)
