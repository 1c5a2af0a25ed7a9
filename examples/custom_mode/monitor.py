"""A callback that uses a plug-in mode's process group during training.

It averages the training loss over the ranks of ``mode`` (whatever initializer made it) and logs
it, and at the start of fit prints every rank's group of that mode, so a run shows the mode at work.
"""

from __future__ import annotations

import sys
from typing import Any

import lightning.pytorch as pl
import torch.distributed as dist


class GroupLossMonitor(pl.Callback):
    def __init__(self, mode: str = "data_interleaved") -> None:
        self.mode = mode

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ctx = pl_module.parallel_context
        ranks = ctx.get_ranks_in_group(self.mode)
        # one write per line: ranks share stdout
        sys.stdout.write(f"mode {self.mode}: rank {ctx.global_rank} group {ranks} local rank "
                         f"{ctx.get_local_rank(self.mode)}\n")
        sys.stdout.flush()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        ctx = pl_module.parallel_context
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        value = loss.detach().float().reshape(1).clone()
        if ctx.get_world_size(self.mode) > 1:
            dist.all_reduce(value, group=ctx.get_group(self.mode))
        pl_module.log(f"loss_{self.mode}", value / ctx.get_world_size(self.mode), prog_bar=False)
