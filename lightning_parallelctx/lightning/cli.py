"""``python -m lightning_parallelctx fit --config configs/X.yaml``: LightningCLI with this library.

Any LightningModule / LightningDataModule is named by ``class_path`` in the YAML; the strategy is
``class_path: lightning_parallelctx.ParallelCtxStrategy`` (or the registered name ``parallelctx``).
The working directory is importable, and so is the clone the package was installed from: the
examples' configs (``class_path: examples.gpt.model.GPTLightning``) run from any directory after
``pip install -e`` of a clone.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI


def main(argv: Sequence[str] | None = None, **cli_kwargs: Any) -> LightningCLI:
    """Run LightningCLI on ``argv`` (``["fit", "--config", "configs/cpu-tp2-dp2.yaml", ...]``)."""
    # Under `python -m` the working directory is on sys.path, under a console script it is not.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    _add_clone_root()
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
    try:
        cli = LightningCLI(**options)
    except SystemExit:
        _explain_missing_examples(args)
        raise
    except ValueError as err:
        reasons = config_errors(str(err))
        if not reasons:
            raise
        # jsonargparse ends with the whole parsed Namespace (hundreds of characters) and buries the
        # class's own message above it: print its traceback, then the reason as the last line.
        traceback.print_exc()
        print(f"lightning-parallelctx: the config was refused: {'; '.join(reasons)}", file=sys.stderr)
        raise SystemExit(1) from None
    if args and args[0] == "fit" and cli.trainer.is_global_zero:
        _print_final_loss(cli.trainer)
    return cli


def _add_clone_root() -> None:
    """Make the clone's ``examples`` package importable wherever the CLI runs.

    Appended, not prepended: a user's own ``examples`` package in the working directory wins.
    An installed wheel has no clone beside it; then the configs' ``examples.*`` class paths need
    the clone on PYTHONPATH, which the error below says.
    """
    root = Path(__file__).resolve().parents[2]
    if (root / "examples").is_dir() and (root / "pyproject.toml").is_file() and str(root) not in sys.path:
        sys.path.append(str(root))


def _explain_missing_examples(args: Sequence[str]) -> None:
    """LightningCLI reports an unimportable class_path as a parse error several lines long; say
    the fix first when it is this library's examples package that is missing."""
    try:
        import examples  # noqa: F401
    except ImportError:
        configs = [a for a in args if a.endswith((".yaml", ".yml"))]
        text = " ".join(Path(c).read_text() for c in configs if Path(c).is_file())
        if "examples." in text:
            print("lightning-parallelctx: this config names classes of the repository's 'examples' package, "
                  "which is not importable here (the package was not installed from a clone). Fix: run from "
                  "the clone's root, or export PYTHONPATH=/path/to/clone", file=sys.stderr)


def config_errors(message: str) -> list[str]:
    """The classes' own messages in jsonargparse's "Does not validate against any of the Union
    subtypes ... Errors: - ..." report; without the other members' type mismatches ("Expected a
    <class 'str'>"), which only say that the value is not a string."""
    if "Errors:" not in message:
        return []
    listed = message.split("Errors:", 1)[1].split("\nGiven value", 1)[0]
    items = [line.strip()[2:].strip() for line in listed.splitlines() if line.strip().startswith("- ")]
    return [item for item in items if not item.startswith("Expected a ")]


def _print_final_loss(trainer: Any) -> None:
    """The run's last line: the final training loss (synced over ranks when logged with sync_dist),
    printed after the progress bar has finished drawing."""
    metrics = trainer.callback_metrics
    key = "train_loss" if "train_loss" in metrics else next((k for k in metrics if "loss" in k), None)
    if key is None:
        return
    sys.stderr.flush()
    print(f"final loss: {float(metrics[key]):.6f} (step {trainer.global_step})", flush=True)
