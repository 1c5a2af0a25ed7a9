#!/usr/bin/env bash
# The whole test suite on a fresh machine: Python set-up, Debian's Slurm and Open MPI, a real local
# Slurm cluster for the launcher tests, then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/local_cluster.sh install
CLUSTER_DIR="${PCTX_SLURM_DIR:-/tmp/pctx-slurm}"
bash scripts/local_cluster.sh start "$CLUSTER_DIR"
trap 'bash scripts/local_cluster.sh stop "$CLUSTER_DIR" || true' EXIT
export PCTX_SLURM_DIR="$CLUSTER_DIR" SLURM_CONF="$CLUSTER_DIR/slurm.conf"
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184
set +e
# Three workers on two cores: many cases wait (for a timeout, a launcher, a Slurm job) rather than
# compute. loadscope keeps each test module (and its module-scoped worlds) on one worker.
# --durations: the slowest cases are named at the end, so the 15-minute budget can be watched.
python3 -m pytest -q -p no:cacheprovider -n "${PCTX_TEST_WORKERS:-3}" --dist loadscope --durations=12 "$@"
status=$?
set -e
# pytest's 5 means no test ran: that is a failure of the suite, not a pass.
exit $status
