#!/usr/bin/env bash
# Create the isolated environment for the peer libraries (TRAK = `traker`, `dattri` and
# `kronfluence`).
# It never touches etda's own .venv. torch is pinned to 2.13.0 (CPU) by the repository's
# constraints file, so no peer can pull a newer (CUDA) torch.
#
#   bash benchmarks/peers/setup.sh            (from the repository root)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${PEERS_VENV:-$here/.venv-peers}"
python="${PYTHON:-python3.11}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install -c "$root/constraints.txt")
"${pip[@]}" --upgrade pip
"${pip[@]}" torch==2.13.0 numpy safetensors
# traker: its CPU path (BasicProjector) needs no fast_jl / CUDA extension.
"${pip[@]}" traker
# dattri: without the [fast_jl] extra (CUDA only).
"${pip[@]}" dattri
# kronfluence: --no-deps, then its runtime dependencies by hand. Its metadata requires
# torchvision, which it never imports; the torchvision that resolves against torch 2.13.0
# (0.28.0) fails on import with this CPU torch ("operator torchvision::nms does not exist"),
# and a broken torchvision in the venv would break any library that imports it.
"${pip[@]}" --no-deps kronfluence==1.0.1
"${pip[@]}" "accelerate>=0.31.0" "einops>=0.8.0" "einconv>=0.1.0" "opt-einsum>=3.3.0" \
    "safetensors>=0.4.2" "tqdm>=4.66.4"
# never leave a torchvision behind (an earlier install without --no-deps pulled one)
"$venv/bin/python" -m pip uninstall -y torchvision >/dev/null 2>&1 || true
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("torch", "numpy", "traker", "dattri", "kronfluence", "accelerate", "einops",
             "einconv", "opt_einsum", "safetensors", "tqdm"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}: not installed")
import torch
assert torch.__version__.startswith("2.13.0") and not torch.cuda.is_available(), torch.__version__
import dattri, kronfluence, trak  # noqa: F401  (all three import with this torch)
PY
