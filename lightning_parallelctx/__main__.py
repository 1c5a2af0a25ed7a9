"""Command line: `python -m lightning_parallelctx plan ...` and `python -m lightning_parallelctx fit ...`."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("plan", "fit", "validate", "test", "predict")
    if not argv or argv[0] not in commands:
        print(f"usage: python -m lightning_parallelctx {{{','.join(commands)}}} ...\n"
              f"  plan     show the process groups of a layout without starting any process\n"
              f"  fit ...  train with LightningCLI and the parallelctx strategy (--config configs/X.yaml)",
              file=sys.stderr)
        return 2
    if argv[0] == "plan":
        from .plan import main as plan_main

        return plan_main(argv[1:])
    from .lightning.cli import main as cli_main

    cli_main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
