"""A small GPT-style language model written with tensor-parallel layers and ``self.parallel_context``.

Token embedding (vocab-parallel), causal self-attention (heads split over TENSOR, the sequence
split over SEQUENCE with keys/values all-gathered), an MLP (column- then row-parallel) or, with
``num_experts > 0``, a dropless top-k mixture of experts (experts split over EXPERT, tokens routed
with all-to-alls), and a vocab-parallel LM head. The same class runs on one process (every size 1)
or any layout, pipeline stages included: the model is declared as named layers (``gpt_layers``)
in a ``PipelineSequential``, and each rank builds only its stages' layers.
Initial weights are drawn per parameter from ``init_seed`` and its name, for the full tensor, and
cut to this rank's shards, so every layout starts from, and trains, the same model.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_parallelctx.distributed import LocalContext, all_gather, gather
from lightning_parallelctx.nn import (
    ColumnParallelLinear,
    ExpertParallelMoE,
    RowParallelLinear,
    VocabParallelEmbedding,
    shard_state_dict,
    vocab_parallel_cross_entropy,
)
from lightning_parallelctx.pipeline import PipelineSequential, stage_plan


# ------------------------------------------------------------------ the model
class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, context: Any) -> None:
        super().__init__()
        tp = context.get_world_size("tensor")
        if n_heads % tp:
            raise ValueError(f"n_heads={n_heads} is not divisible by tensor_parallel_size={tp}")
        self.context, self.local_heads, self.head_dim = context, n_heads // tp, d_model // n_heads
        # Separate q/k/v projections keep whole heads together in each column shard.
        self.q = ColumnParallelLinear(d_model, d_model, context=context)
        # No key bias: softmax ignores a shift shared by all keys, so its gradient is exactly zero
        # and an adaptive optimizer would only amplify rounding noise in it.
        self.k = ColumnParallelLinear(d_model, d_model, bias=False, context=context)
        self.v = ColumnParallelLinear(d_model, d_model, context=context)
        self.out = RowParallelLinear(d_model, d_model, context=context)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        offset = _offset(self.context, t)
        q, k, v = (proj(x).view(b, t, self.local_heads, self.head_dim).transpose(1, 2) for proj in (self.q, self.k, self.v))
        if self.context.get_world_size("sequence") > 1:
            # Context parallelism: this rank's queries attend to the keys/values of the whole sequence.
            k = all_gather(k, dim=2, mode="sequence", context=self.context)
            v = all_gather(v, dim=2, mode="sequence", context=self.context)
        q_pos = torch.arange(offset, offset + t, device=x.device)
        k_pos = torch.arange(k.shape[2], device=x.device)
        mask = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, t, self.local_heads * self.head_dim))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, context: Any, num_experts: int = 0, moe_top_k: int = 1) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads, context)
        if num_experts > 0:
            # Experts split over EXPERT (each holds whole experts: not split over TENSOR, where the
            # tokens are replicated); the router is a dense replicated Linear.
            self.moe = ExpertParallelMoE(d_model, 4 * d_model, num_experts, moe_top_k, context=context)
        else:
            self.fc = ColumnParallelLinear(d_model, 4 * d_model, context=context)
            self.proj = RowParallelLinear(4 * d_model, d_model, context=context)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        if hasattr(self, "moe"):
            return x + self.moe(self.ln2(x))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


def _offset(context: Any, local_len: int) -> int:
    """Where this rank's slice of the sequence starts (SEQUENCE ranks hold consecutive slices)."""
    return context.get_local_rank("sequence") * local_len


class PositionalEmbedding(nn.Embedding):
    """Adds learned positions to the token embeddings of this rank's sequence slice."""

    def __init__(self, seq_len: int, d_model: int, context: Any) -> None:
        super().__init__(seq_len, d_model)
        self.context = context

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        t = h.shape[1]
        offset = _offset(self.context, t)
        return h + super().forward(torch.arange(offset, offset + t, device=h.device))


def gpt_layers(vocab_size: int, seq_len: int, d_model: int, n_heads: int, n_layers: int, context: Any,
               num_experts: int = 0, moe_top_k: int = 1) -> dict[str, nn.Module]:
    """The GPT as ordered, named layers: ids -> tok -> pos -> blocks.0 ... -> ln_f -> head (vocab-split
    logits). Pipeline stages cut this list; the names are the state-dict names at every layout."""
    layers: dict[str, nn.Module] = {"tok": VocabParallelEmbedding(vocab_size, d_model, context=context),
                                    "pos": PositionalEmbedding(seq_len, d_model, context)}
    for i in range(n_layers):
        layers[f"blocks.{i}"] = Block(d_model, n_heads, context, num_experts, moe_top_k)
    layers["ln_f"] = nn.LayerNorm(d_model)
    layers["head"] = ColumnParallelLinear(d_model, vocab_size, bias=False, context=context)
    return layers


def initial_value(name: str, shape: torch.Size, n_layers: int, seed: int) -> torch.Tensor:
    """The full (unsharded) initial value of parameter ``name``, drawn from its own generator, so a
    rank builds its stages' weights without drawing (or holding) any other layer's."""
    if name.endswith(("bias", "moe.b1", "moe.b2")) or ".ln" in name or name.startswith("ln_"):
        return torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("out.weight", "proj.weight", "moe.w2")) else 0.02
    return torch.randn(shape, generator=g) * std


class GPTLightning(pl.LightningModule):
    """The GPT above as a LightningModule; any ParallelCtxStrategy layout, or a plain Trainer."""

    def __init__(self, vocab_size: int = 64, seq_len: int = 32, d_model: int = 32, n_heads: int = 4, n_layers: int = 2,
                 lr: float = 3e-3, optimizer: Literal["adamw", "sgd"] = "adamw", weight_decay: float = 0.0,
                 init_seed: int = 0, num_experts: int = 0, moe_top_k: int = 1, tie_embeddings: bool = False) -> None:
        """``num_experts > 0``: every block's MLP is an :class:`ExpertParallelMoE` of that many experts
        (top-``moe_top_k`` routing), split over the EXPERT group; 0 keeps the dense MLP.
        ``tie_embeddings``: the LM head reuses the token embedding's weight (on the first and the last
        pipeline stage when they differ: copies kept equal, gradients summed)."""
        super().__init__()
        self.save_hyperparameters()

    def configure_model(self) -> None:
        if hasattr(self, "gpt"):  # fit, then validate/test: the sharded model stays
            return
        h = self.hparams
        ctx = getattr(self, "parallel_context", None) or LocalContext()
        moe = {"num_experts": h.get("num_experts", 0), "moe_top_k": h.get("moe_top_k", 1)}
        sizes = (h.vocab_size, h.seq_len, h.d_model, h.n_heads, h.n_layers)
        # Shapes only (meta): the full model's layers give the unsharded shapes, this layout's the shards.
        with torch.device("meta"):
            full = gpt_layers(*sizes, LocalContext(), **moe)
            layers = gpt_layers(*sizes, ctx, **moe)
        names = list(layers)

        def init(index: int, layer: nn.Module) -> None:
            # The full model's initial weights, the same for every layout, cut to this rank's shards.
            prefix = names[index]
            values = {k: initial_value(f"{prefix}.{k}", p.shape, h.n_layers, h.init_seed)
                      for k, p in full[prefix].named_parameters()}
            layer.load_state_dict(shard_state_dict(values, layer, ctx))

        # pp = 1: every layer here; pp > 1: this rank's stages only (n_layers blocks + 4 layers are split).
        tied = [["tok.weight", "head.weight"]] if h.get("tie_embeddings", False) else []
        self.gpt = PipelineSequential(layers, stage_plan(self), init=init, tied=tied)
        self.gpt.context = ctx

    def _slice(self, *tensors: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
        """Every SEQUENCE rank gets the same batch and keeps its slice of the positions."""
        ctx = self.gpt.context
        sp, length = ctx.get_world_size("sequence"), tensors[0].shape[1]
        if length % sp:
            raise ValueError(f"sequence length {length} is not divisible by sequence_parallel_size={sp}")
        t = length // sp
        offset = ctx.get_local_rank("sequence") * t
        return offset, [x[:, offset:offset + t] for x in tensors]

    def _cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, targets, context=self.gpt.context)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        _, (ids, targets) = self._slice(*batch)
        # The mean of the per-slice losses (averaged by the gradient sync) is the full sequence's loss.
        # With pipeline stages the schedule runs it (and, in training_step, the backward pass).
        return self.gpt.loss(ids, targets, self._cross_entropy)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """The most likely next token at every position (whole vocabulary, whole sequence)."""
        ctx = self.gpt.context
        _, (ids,) = self._slice(batch[0])
        logits = gather(self.gpt(ids), dim=-1, mode="tensor", context=ctx)
        return gather(logits.argmax(-1), dim=1, mode="sequence", context=ctx)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("test_loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        h = self.hparams
        if h.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=h.lr, momentum=0.9)
        return torch.optim.AdamW(self.parameters(), lr=h.lr, weight_decay=h.weight_decay)
