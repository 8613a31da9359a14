"""Record the golden outputs: ``python -m tests.golden.make`` (one torch thread).

Writes ``golden.safetensors`` (inputs and every case's outputs) and ``golden.json`` (the
environment that produced them and the case list). Rerun only on purpose: the point of the
fixture is that a refactor reproduces what the engine computed before it.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from tests.golden.cases import build_inputs, cases, run_case

HERE = Path(__file__).parent


def environment() -> dict:
    """What bit-for-bit reproduction depends on (CPU kernels, library versions)."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu or platform.processor(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def main() -> None:
    torch.set_num_threads(1)
    inputs = build_inputs()
    tensors = {f"input.{k}": v for k, v in inputs.tensors.items()}
    listed = []
    t0 = time.perf_counter()
    for case in cases():
        t = time.perf_counter()
        out = run_case(case, inputs)
        for k, v in out.items():
            tensors[f"case.{case.name}.{k}"] = torch.from_numpy(np.ascontiguousarray(v))
        listed.append({"name": case.name, "outputs": sorted(out), "s": time.perf_counter() - t})
        print(f"{case.name}: {time.perf_counter() - t:.2f} s", flush=True)
    save_file(tensors, HERE / "golden.safetensors")
    meta = {
        "environment": environment(),
        "checkpoint_lrs": inputs.lrs,
        "cases": listed,
        "seconds": time.perf_counter() - t0,
        "recorded": time.strftime("%Y-%m-%d"),
    }
    (HERE / "golden.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()
