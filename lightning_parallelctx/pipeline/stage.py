"""torch's ``PipelineStage`` whose shape inference leaves every random generator as it found it.

Without static shapes, torch's stage infers its input/output shapes at the first step of a new
schedule by running the stage once more (forward, and for training the loss and backward) on the
first micro-batch's real tensors. A dropout layer in that extra forward draws from the default
generator, so the real micro-batches then see other masks than they would without it: a pipelined
run with dropout would change with the first batch's shape (every new shape builds new stages,
schedule.py) and would not even repeat itself. Giving torch static shapes instead is not possible
without running another rank's layers (no rank holds them), so the inference runs as torch wrote
it, between a save and a restore of the default CPU (and CUDA) generators and of the library's
named streams (:mod:`lightning_parallelctx.random`), which a layer may fork.

:func:`in_shape_inference` tells a loss function that it is being called by the inference (its
value is discarded), so per-micro-batch work such as Lightning's ``on_before_backward`` runs only
for the real micro-batches.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch.distributed.pipelining import PipelineStage

from ..random import get_rng_state, set_rng_state

__all__ = ["RngNeutralStage", "in_shape_inference", "rng_neutral"]

_local = threading.local()


def in_shape_inference() -> bool:
    """Whether the calling thread is inside a stage's shape inference (the results are thrown away)."""
    return getattr(_local, "depth", 0) > 0


@contextmanager
def rng_neutral() -> Iterator[None]:
    """Run the block, then put every generator (default CPU/CUDA and the named streams) back."""
    saved = get_rng_state()
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1
        set_rng_state(saved)


class RngNeutralStage(PipelineStage):
    """A ``PipelineStage`` whose shape inference draws no random numbers (see the module's doc).

    It overrides the two private inference methods of torch 2.13's stage; a torch without them
    fails loudly at construction instead of silently drawing again."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        for name in ("_forward_metadata_inference", "_backward_metadata_inference"):
            if not callable(getattr(PipelineStage, name, None)):
                raise RuntimeError(f"torch.distributed.pipelining.PipelineStage has no {name}: this torch infers stage "
                                   f"shapes differently; lightning_parallelctx.pipeline.stage needs an update")
        super().__init__(*args, **kwargs)

    def _forward_metadata_inference(self, *args: Any, **kwargs: Any) -> Any:
        with rng_neutral():
            return super()._forward_metadata_inference(*args, **kwargs)

    def _backward_metadata_inference(self, *args: Any, **kwargs: Any) -> Any:
        with rng_neutral():
            return super()._backward_metadata_inference(*args, **kwargs)
