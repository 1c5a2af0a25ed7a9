"""Meta-device initialisation: ``trainer.init_module(empty_init=True)`` and meta ``configure_model``.

A model built on the meta device holds no memory; the strategy materialises it in ``setup`` module
by module (``to_empty`` of that module's own tensors, then its ``reset_parameters``), in
registration order, as Lightning's ``_materialize_meta_tensors`` does, keeping the parameters'
attributes (the library's marks). The library's layers draw
their full weight exactly as ``torch.nn.Linear``/``nn.Embedding`` would and keep their shard, so a
model built on meta under a seed materialises to the same weights as the unsplit model built
eagerly under that seed, for any layout, while only one layer's full weight exists at a time.

The random state matters: the eager model draws its weights when it is constructed. For
``trainer.init_module(empty_init=True)`` the strategy records the generator state on entry and
materialises from it (then puts the generator back, since Lightning re-seeds at fit start anyway).
For a model built on meta inside ``configure_model`` nothing draws between construction and
``setup``, so the current state is the one the eager model would have seen.
"""

from __future__ import annotations

import contextlib

import torch
from lightning.fabric.utilities.init import _has_meta_device_parameters_or_buffers

__all__ = ["materialize_meta"]


@torch.no_grad()
def materialize_meta(module: torch.nn.Module, device: torch.device, rng_state: torch.Tensor | None = None) -> None:
    """Materialise ``module``'s meta tensors on ``device`` (no-op without any)."""
    if not _has_meta_device_parameters_or_buffers(module):
        return
    restore = torch.random.fork_rng(devices=[]) if rng_state is not None else contextlib.nullcontext()
    with restore:
        if rng_state is not None:
            torch.set_rng_state(rng_state)
        for sub in module.modules():
            if _has_meta_device_parameters_or_buffers(sub, recurse=False):
                _materialize_keeping_marks(sub, device)


def _materialize_keeping_marks(module: torch.nn.Module, device: torch.device) -> None:
    # to_empty() from meta makes new Parameter objects, and the attributes of the old ones (the
    # library's tensor-parallel/expert marks) would vanish: clipping would then count the shards
    # as replicas, silently (seen: final weights off by 2e-3 after 6 steps). Carry them over.
    marks = {name: dict(p.__dict__) for name, p in module.named_parameters(recurse=False)}
    module.to_empty(device=device, recurse=False)
    for name, p in module.named_parameters(recurse=False):
        for attr, value in marks.get(name, {}).items():
            if not hasattr(p, attr):
                setattr(p, attr, value)
    reset = getattr(module, "reset_parameters", None)
    if not callable(reset):
        raise TypeError(
            f"{type(module).__name__} has parameters or buffers on the meta device but no reset_parameters() to "
            f"initialise them after materialisation. Fix: give it a reset_parameters() that (re)draws its own "
            f"tensors, or build it off the meta device"
        )
    reset()
