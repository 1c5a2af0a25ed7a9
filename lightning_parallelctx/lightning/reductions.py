"""Which ranks Lightning's reductions run over on the user's behalf: the ranks holding distinct data.

Under tensor (or pipeline) parallelism several ranks see the same batch. A reduction over the whole
world (``self.log(..., sync_dist=True)``, ``self.all_gather``, a torchmetrics metric) would then count
every sample once per model-parallel peer: a sum ``tp`` times too large, a gathered tensor ``tp``
times too long, a confusion matrix with doubled totals (a mean happens to be right). So the default
group is the ranks whose data differ: DATA x EXPERT (``data_shard``, the ranks the
DistributedSampler splits the batches over) and, under sequence parallelism, SEQUENCE too (each
SEQUENCE rank holds its own slice of the tokens, so its loss is that slice's). That product is the
``dense_replica`` mode (DATA x SEQUENCE x EXPERT); without sequence parallelism it is exactly
``data_shard``, and with pure data parallelism the whole world, so nothing changes there.

A value computed from whole samples under sequence parallelism (e.g. after gathering the sequence)
is the same on every SEQUENCE rank: reduce it with ``sync_dist_group="data_shard"``. A mode name
(``"data_shard"``, ``"tensor"``, ``"global"``...) or a process group given explicitly is used as given.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..context import ParallelContext
from ..mode import ParallelMode

__all__ = ["DEFAULT_REDUCTION_MODE", "default_metric_groups", "resolve_group"]

DEFAULT_REDUCTION_MODE = ParallelMode.DENSE_REPLICA


def resolve_group(group: Any, ctx: ParallelContext) -> Any:
    """``None`` (and WORLD, which ``LightningModule.all_gather`` substitutes for ``None``) ->
    the default group (DATA x SEQUENCE x EXPERT); a :class:`ParallelMode` or its name -> that mode's group; anything else
    as given. To reduce over every rank, name the mode ``"global"``."""
    if group is None or group is dist.group.WORLD:
        return ctx.get_group(DEFAULT_REDUCTION_MODE)
    if isinstance(group, (ParallelMode, str)):
        return ctx.get_group(group)
    return group


def default_metric_groups(module: torch.nn.Module, ctx: ParallelContext) -> int:
    """Give every torchmetrics ``Metric`` in ``module`` without a ``process_group`` the default
    group (torchmetrics syncs over the world otherwise). Returns how many were set. A metric built
    with ``process_group=...`` keeps its own."""
    try:
        from torchmetrics import Metric
    except ImportError:  # torchmetrics is optional
        return 0
    if ctx.get_world_size(DEFAULT_REDUCTION_MODE) == dist.get_world_size():
        return 0  # the default group is the world: torchmetrics' default is already right
    group = ctx.get_group(DEFAULT_REDUCTION_MODE)
    count = 0
    for m in module.modules():
        if isinstance(m, Metric) and getattr(m, "process_group", None) is None:
            m.process_group = group
            count += 1
    return count
