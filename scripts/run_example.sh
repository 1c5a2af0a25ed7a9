#!/usr/bin/env bash
# The main job: set up, then launch 8 local processes with torchrun and print every rank's place
# in every parallel mode (tp=2, pp=2, dp=2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec python3 -m torch.distributed.run --standalone --nproc_per_node "${NPROC:-8}" \
    examples/show_layout.py --tp "${TP:-2}" --pp "${PP:-2}"
