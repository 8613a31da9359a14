#!/usr/bin/env bash
# Create the isolated environment for the peer libraries (TRAK = `traker`, and `dattri`).
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
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("torch", "numpy", "traker", "dattri", "safetensors"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}: not installed")
PY
