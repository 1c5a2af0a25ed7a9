"""``python -m lightning_parallelctx fit --config configs/X.yaml``: LightningCLI with this library.

Any LightningModule / LightningDataModule is named by ``class_path`` in the YAML; the strategy is
``class_path: lightning_parallelctx.ParallelCtxStrategy`` (or the registered name ``parallelctx``).
The working directory is importable, so examples run from the repository root
(``class_path: examples.gpt.model.GPTLightning``).
"""

from __future__ import annotations

import os
import warnings
import sys
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.cli import LightningCLI


def main(argv: Sequence[str] | None = None, **cli_kwargs: Any) -> LightningCLI:
    """Run LightningCLI on ``argv`` (``["fit", "--config", "configs/cpu-tp2-dp2.yaml", ...]``)."""
    # Under `python -m` the working directory is on sys.path, under a console script it is not.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    import lightning_parallelctx  # noqa: F401  (registers the "parallelctx" strategy name)

    # Lightning 2.6's pytree helper trips torch 2.13's LeafSpec deprecation once per process and
    # loader: noise for the user, nothing to act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")

    args = list(sys.argv[1:] if argv is None else argv)
    options: dict[str, Any] = {
        "model_class": None,
        "datamodule_class": None,
        "subclass_mode_model": True,
        "subclass_mode_data": True,
        # Every process of a run parses the same YAML; only rank 0 writes config.yaml, and a
        # re-run into the same log directory must not fail on it.
        "save_config_kwargs": {"overwrite": True},
        # The command line itself is read by LightningCLI (which warns when given it twice).
        "args": None if args == sys.argv[1:] else args,
    }
    options.update(cli_kwargs)
    cli = LightningCLI(**options)
    if args and args[0] == "fit" and cli.trainer.is_global_zero:
        _print_final_loss(cli.trainer)
    return cli


def _print_final_loss(trainer: Any) -> None:
    """The run's last line: the final training loss (synced over ranks when logged with sync_dist),
    printed after the progress bar has finished drawing."""
    metrics = trainer.callback_metrics
    key = "train_loss" if "train_loss" in metrics else next((k for k in metrics if "loss" in k), None)
    if key is None:
        return
    sys.stderr.flush()
    print(f"final loss: {float(metrics[key]):.6f} (step {trainer.global_step})", flush=True)
