#!/usr/bin/env bash
# Set up etda on a fresh machine: the Fashion-MNIST data package (Debian) and a
# virtual environment with the CPU build of torch pinned by constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${ETDA_FASHION_MNIST_DIR:-}" ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "==> installing Fashion-MNIST (apt-get install dataset-fashion-mnist)"
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist bible-kjv >/dev/null
  else
    echo "!! Fashion-MNIST not found: run 'sudo apt-get install -y dataset-fashion-mnist'" \
         "or set ETDA_FASHION_MNIST_DIR (tests that need it are skipped)" >&2
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PY" -m venv .venv
fi
echo "==> installing etda (torch pinned to the CPU build by constraints.txt)"
.venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/pip install -q -c constraints.txt torch==2.13.0
.venv/bin/pip install -q -c constraints.txt -e ".[dev]"
