#!/usr/bin/env bash
# Installs the package and its dependencies on a fresh machine. Idempotent and quiet when done.
# torch comes first, pinned to the CPU wheel: a bare `torch` requirement with no torch installed
# would pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
if ! "$PY" -c "import lightning_parallelctx, lightning, jsonargparse, rich, pytest, pytest_timeout" 2>/dev/null \
   || [ pyproject.toml -nt .setup-stamp ]; then
    "$PY" -m pip install -q -e ".[test]"
    touch .setup-stamp
fi
