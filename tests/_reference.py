"""The recorded training run that the equivalence tests compare: a seeded ``Trainer.fit`` with a
recorder, run once in a single process (the reference) and once per parallel layout.

Used by tests/test_pipeline.py and tests/test_strategy_experts.py (children of ``spawn`` import it
from the tests folder). What is recorded, on every rank:

- ``losses``: the synced ``train_loss`` after every batch (micro-batch of an accumulation window);
- ``norms``: the full model's gradient norm before each optimizer step (before clipping);
- ``state10`` / ``local10``: the full (gathered) and this rank's state dict after optimizer step 10;
- ``zero_grads`` / ``after_backward``: how often Lightning's hooks ran;
- ``final``: this rank's state dict after fit (the full model in a single process).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

SEED = 1234


def recorder(out: dict[str, Any]) -> Any:
    import lightning.pytorch as pl

    from lightning_parallelctx.lightning import gather_full_state_dict, grad_norm

    class Recorder(pl.Callback):
        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            out.setdefault("losses", []).append(float(trainer.callback_metrics["train_loss"]))
            acc = trainer.accumulate_grad_batches
            if trainer.global_step == 10 and "state10" not in out and batch_idx % acc == acc - 1:
                out["local10"] = {k: v.detach().clone() for k, v in module.state_dict().items()}
                out["state10"] = gather_full_state_dict(module, module.parallel_context)  # collective

        def on_before_optimizer_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
            out.setdefault("norms", []).append(float(grad_norm(module.parameters(), module.parallel_context)))

        def on_before_zero_grad(self, trainer: Any, module: Any, optimizer: Any) -> None:
            out["zero_grads"] = out.get("zero_grads", 0) + 1

        def on_after_backward(self, trainer: Any, module: Any) -> None:
            out["after_backward"] = out.get("after_backward", 0) + 1

    return Recorder()


def fit_recorded(make_model: Callable[[], Any], make_trainer: Callable[[list], Any], data: Any, *,
                 callbacks: Sequence[Any] = (), ckpt_path: str | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """Seed, build the model, fit with :func:`recorder` (plus ``callbacks``); ``make_trainer`` gets
    the callback list. Returns the model, the trainer and the record (``final`` included)."""
    import lightning.pytorch as pl

    pl.seed_everything(SEED)
    rec: dict[str, Any] = {}
    model = make_model()
    trainer = make_trainer([recorder(rec), *callbacks])
    trainer.fit(model, data, ckpt_path=ckpt_path)
    rec["final"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model, trainer, rec


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference over two state dicts with the same names."""
    assert set(a) == set(b), set(a) ^ set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)
