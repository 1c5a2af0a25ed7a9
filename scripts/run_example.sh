#!/usr/bin/env bash
# The main job: set up, then train the GPT example with 2-way tensor x 2-way data parallelism on 4
# local CPU processes (started by the strategy itself) from a LightningCLI YAML file. The last line
# printed is the final training loss.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec python3 -m lightning_parallelctx fit --config "${CONFIG:-configs/cpu-tp2-dp2.yaml}" "$@"
