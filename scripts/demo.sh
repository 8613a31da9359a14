#!/usr/bin/env bash
# Set up (idempotent) and run the main job: end-to-end attribution on real
# Fashion-MNIST with a single model, the naive independent ensemble and an efficient
# ensemble, each with its LDS and costs, plus top proponents.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export ETDA_CACHE_DIR="${ETDA_CACHE_DIR:-$PWD/runs}"  # a checkout keeps its caches in runs/
exec .venv/bin/etda demo "$@"
