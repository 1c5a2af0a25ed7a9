"""Initialise a sharded model without ever building the full one.

Build the model on the meta device (no memory), then :func:`init_sharded_` draws each parameter
whole, one at a time, in registration order, and keeps this rank's shard: every layout gets the
weights of the unsplit model drawn in the same order, while a rank holds at most its shards plus
one full parameter. For a 7B model that is the difference between ~28 GB fp32 on every process
before sharding and the largest single matrix.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..distributed._state import ContextLike
from ..errors import ParallelCtxError
from .state_dict import full_shape, shard_tensor

__all__ = ["init_sharded_"]

#: ``init(name, full_shape) -> full tensor`` for one parameter of the unsplit model.
FullInit = Callable[[str, torch.Size], torch.Tensor]


@torch.no_grad()
def init_sharded_(module: torch.nn.Module, init: FullInit, context: ContextLike | None = None,
                  device: torch.device | str | None = None) -> torch.nn.Module:
    """Give every parameter of ``module`` (on meta or not) this rank's shard of ``init(name, full_shape)``.

    Parameters are replaced by new ones on ``device`` (default: the parameter's own device, or CPU
    for meta), keeping their attributes (the library's marks). Buffers must not be on meta.
    """
    for name, p in list(module.named_parameters()):
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        target = torch.device(device) if device is not None else (torch.device("cpu") if p.is_meta else p.device)
        full = init(name, full_shape(p, context))
        shard = shard_tensor(full, p, context, name).to(device=target, dtype=p.dtype).clone()
        new = torch.nn.Parameter(shard, requires_grad=p.requires_grad)
        new.__dict__.update(p.__dict__)
        setattr(owner, leaf, new)
    meta = [n for n, b in module.named_buffers() if b.is_meta]
    if meta:
        raise ParallelCtxError(
            f"buffers {meta[:3]} are still on the meta device: init_sharded_ draws parameters only. Fix: "
            f"register those buffers off meta, or materialise them (module.to_empty + their init) before"
        )
    return module
