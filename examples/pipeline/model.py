"""A small pipelined LightningModule: an MLP declared as ordered layers (see docs/pipeline.md).

The same class trains on one process, or with any ``pipeline_parallel_size`` / schedule: the layers
are built on the meta device, each rank materialises only its stages' layers, and every layer's
initial weights are drawn from a generator seeded by its index, so every layout starts from the
same model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning.pytorch as pl
from lightning_parallelctx.pipeline import PipelineSequential, stage_plan

from . import schedules as _schedules  # noqa: F401  (registers the example schedule "counting_gpipe")


class Dense(nn.Module):
    def __init__(self, d_in: int, d_out: int, act: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return torch.tanh(y) if self.act else y


def init_layer(index: int, layer: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed * 1000 + index)
    for p in layer.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() > 1 else 0.1))


class PipelinedMLP(pl.LightningModule):
    """``n_layers`` Dense layers (first d_in -> width, last width -> d_out), mean-squared error."""

    def __init__(self, d_in: int = 8, width: int = 16, d_out: int = 4, n_layers: int = 8, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()

    def make_layers(self) -> list[nn.Module]:
        h = self.hparams
        dims = [h.d_in] + [h.width] * (h.n_layers - 1) + [h.d_out]
        return [Dense(dims[i], dims[i + 1], act=i < h.n_layers - 1) for i in range(h.n_layers)]

    def configure_model(self) -> None:
        if hasattr(self, "pipe"):  # fit, then validate: the stages stay
            return
        with torch.device("meta"):
            layers = self.make_layers()
        self.pipe = PipelineSequential(layers, stage_plan(self), init=init_layer)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.pipe.loss(x, y, F.mse_loss)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.pipe.loss(x, y, F.mse_loss)
        self.log("val_loss", loss, sync_dist=True)
        return loss

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.pipe(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def regression_data(n: int = 160, d_in: int = 8, d_out: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    w = torch.randn(d_in, d_out, generator=g)
    return TensorDataset(x, torch.tanh(x @ w))


def loader(batch_size: int = 8, n: int = 160) -> DataLoader:
    return DataLoader(regression_data(n), batch_size=batch_size)


class RegressionData(pl.LightningDataModule):
    """The regression data as a DataModule (for LightningCLI configs); ``batch_size`` per data shard."""

    def __init__(self, batch_size: int = 8, num_samples: int = 160) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader:
        return loader(self.hparams.batch_size, self.hparams.num_samples)
