#!/usr/bin/env bash
# Set up etda on a fresh machine: the data packages the tests and settings read
# (Debian: dataset-fashion-mnist, bible-kjv) and a virtual environment with the CPU
# build of torch pinned by constraints.txt. Each data package is installed on its own;
# a package that is missing and cannot be installed stops the set-up with a message
# saying what to install by hand (set ETDA_SKIP_DATA=1 to set up without the data).
set -euo pipefail
cd "$(dirname "$0")/.."

FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
have_fmnist() { [ -e "$FMNIST" ] || [ -n "${ETDA_FASHION_MNIST_DIR:-}" ]; }
have_kjv() { command -v bible >/dev/null 2>&1; }

APT_UPDATED=0
install_package() {  # install_package <debian package>: 0 when installed
  local pkg=$1
  if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null; then
    return 1
  fi
  if [ "$APT_UPDATED" = 0 ]; then
    echo "==> apt-get update"
    apt-get update -qq || return 1
    APT_UPDATED=1
  fi
  echo "==> installing $pkg (apt-get install $pkg)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null
}

need_data() {  # need_data <check function> <debian package> <what it is>
  local check=$1 pkg=$2 what=$3
  "$check" && return 0
  install_package "$pkg" && "$check" && return 0
  if [ "${ETDA_SKIP_DATA:-0}" = 1 ] && [ "${ETDA_REQUIRE_DATA:-0}" = 1 ]; then
    echo "!! $what not found: ETDA_SKIP_DATA=1 conflicts with ETDA_REQUIRE_DATA=1 (CI needs" \
         "every data package; run 'sudo apt-get install -y $pkg')" >&2
    exit 1
  fi
  if [ "${ETDA_SKIP_DATA:-0}" = 1 ]; then
    echo "!! $what not found (ETDA_SKIP_DATA=1: the tests that read it will skip)" >&2
    return 0
  fi
  echo "!! $what not found and could not be installed: run 'sudo apt-get install -y $pkg'" \
       "(or set ETDA_SKIP_DATA=1 to set up without it)" >&2
  exit 1
}

need_data have_fmnist dataset-fashion-mnist "Fashion-MNIST (or ETDA_FASHION_MNIST_DIR)"
need_data have_kjv bible-kjv "the King James Bible (the 'bible' command)"

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PY" -m venv .venv
fi
echo "==> installing etda (torch pinned to the CPU build by constraints.txt)"
.venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/pip install -q -c constraints.txt torch==2.13.0
.venv/bin/pip install -q -c constraints.txt -e ".[all,dev]"
