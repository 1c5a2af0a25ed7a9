"""One random stream per layer: dropout masks that do not depend on the pipeline layout (opt-in).

At pp = 1 every dropout layer draws its mask for the whole batch from the one default generator,
layer after layer; at pp > 1 each stage's process draws from its own generator, one micro-batch
at a time. With ``PipelineSequential(..., layer_rng_seed=s)`` each layer's forward runs with the
default generator swapped for the layer's own stream (seeded by ``(s, layer index)``, kept in the
library's RNG tracker, so checkpoints save it and shape inference leaves it alone). A stage runs a
layer's micro-batches in order, and on CPU torch draws a dropout mask element by element, so the
micro-batches' masks concatenate to the whole batch's: every pipeline size, schedule and
micro-batch count then draws the same masks (tests/test_pipeline_rng.py). Not on CUDA (Philox
advances per call), and with data parallelism each replica starts its stream where the others do.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ..random import derive_seed, get_rng_tracker

__all__ = ["LayerStreams"]


class LayerStreams:
    """The streams of one model's layers; :meth:`around` runs a block on layer ``index``'s stream."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def name(self, index: int) -> str:
        return f"pipeline_layer.{self.seed}.{index}"

    @contextmanager
    def around(self, index: int) -> Iterator[None]:
        tracker = get_rng_tracker()
        name = self.name(index)
        if name not in tracker.names:  # first use, or model_parallel_seed() reset the tracker: (re)seed
            tracker.add(name, derive_seed(self.seed, "pipeline_layer", (index,)))
        with tracker.fork(name):
            yield
