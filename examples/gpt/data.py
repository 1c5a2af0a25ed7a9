"""Training data generated on the spot: token sequences of a fixed random "bigram language".

Each token has a few likely successors (a peaked random transition table drawn from ``seed``), so
a language model can learn it and its loss falls well below log(vocab_size). Nothing is
downloaded; every process generates the identical dataset from the seed.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset


class BigramText(Dataset):
    """``num_samples`` sequences of ``seq_len + 1`` tokens; item i is (inputs, next-token targets)."""

    def __init__(self, vocab_size: int = 64, seq_len: int = 32, num_samples: int = 512, seed: int = 0,
                 sharpness: float = 4.0) -> None:
        g = torch.Generator().manual_seed(seed)
        table = torch.softmax(torch.randn(vocab_size, vocab_size, generator=g) * sharpness, dim=-1)
        tokens = torch.empty(num_samples, seq_len + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(vocab_size, (num_samples,), generator=g)
        for t in range(seq_len):
            tokens[:, t + 1] = torch.multinomial(table[tokens[:, t]], 1, generator=g).squeeze(1)
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens[i, :-1], self.tokens[i, 1:]


class GPTDataModule(pl.LightningDataModule):
    """Bigram-language data. ``global_batch_size`` is split over the data-shard ranks, so every
    layout (dp4, tp2-dp2, tp4, ...) trains on the same batches."""

    def __init__(self, vocab_size: int = 64, seq_len: int = 32, num_samples: int = 512, num_val_samples: int = 64,
                 global_batch_size: int = 8, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        h = self.hparams
        self.train_set = BigramText(h.vocab_size, h.seq_len, h.num_samples, h.seed)
        # Same language (seed), other sequences (samples drawn after the training ones).
        self.val_set = BigramText(h.vocab_size, h.seq_len, h.num_samples + h.num_val_samples, h.seed)
        self.val_set.tokens = self.val_set.tokens[h.num_samples:]

    def _batch_size(self) -> int:
        strategy = self.trainer.strategy if self.trainer is not None else None
        replicas = strategy.distributed_sampler_kwargs["num_replicas"] if getattr(strategy, "is_distributed", False) else 1
        if self.hparams.global_batch_size % replicas:
            raise ValueError(f"global_batch_size={self.hparams.global_batch_size} is not divisible by the "
                             f"{replicas} data-shard ranks")
        return self.hparams.global_batch_size // replicas

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self._batch_size(), drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self._batch_size(), drop_last=True)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
