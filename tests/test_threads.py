"""The same attribution at 1 and at 2 torch threads, each in its own process.

The rest of the suite runs on one thread (``one_thread``), so this is where a second
thread is exercised. What holds (measured with the torch 2.13 CPU build on 2 cores):

* at a fixed thread count a rerun is bit-identical (checked for the TRAK runs);
* across thread counts the results agree to rounding, not bit for bit: intra-op
  parallel matmuls and reductions split their sums differently with 2 threads, so float32
  features differ in their last bits, and the damped solve of TRAK amplifies that. Measured
  (relative to the largest score): TRAK with a float32 Gaussian sketch 1.5e-6, TRAK on the
  exact kernel (float64 Gram) 4.7e-16, IF on the factored sketch 0, Grad-Dot in float64
  7.0e-16. Tolerances: 2e-5 for float32 features (13x the measured 1.5e-6), 1e-12 in
  float64.

Consequence (recorded in the report of issue 19): features computed in process with
several threads are not bit-identical to those of worker processes, which always run one
thread; they are bit-identical when the driver runs one thread too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch

    threads, out = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(threads)
    import etda
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(200, 64, generator=g), torch.randint(0, 10, (200,), generator=g)
    train, test = (x[:160], y[:160]), (x[160:], y[160:])
    RUNS = {
        "trak-exact-f32": dict(method="trak", projection="none", damping="auto"),
        "trak-gaussian-f32": dict(method="trak", projection="gaussian", proj_dim=128,
                                  damping=0.1),
        "if-factored-f32": dict(method="if", projection="factored", proj_dim=128),
        "graddot-identity-f64": dict(method="graddot", projection="identity", dtype="float64"),
    }
    res, same = {}, {}
    for name, kw in RUNS.items():
        res[name] = etda.attribute(model, train, test, chunk_size=64, **kw).values
        if name.startswith("trak"):  # a rerun at the same thread count
            again = etda.attribute(model, train, test, chunk_size=64, **kw).values
            same[name] = bool(np.array_equal(res[name], again))
    np.savez(out, **res)
    print("threads", torch.get_num_threads(), "rerun-identical", same)
    """
)


def test_one_and_two_threads_agree(tmp_path: Path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    procs = {
        t: subprocess.Popen(
            [sys.executable, str(script), str(t), str(tmp_path / f"t{t}.npz")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for t in (1, 2)
    }
    outs = {t: p.communicate(timeout=300)[0] for t, p in procs.items()}
    for t, p in procs.items():
        assert p.returncode == 0, outs[t]
        line = next(ln for ln in outs[t].splitlines() if ln.startswith("threads"))
        assert line.startswith(f"threads {t} "), line  # the count really in force
        assert "False" not in line, f"a rerun at {t} thread(s) was not bit-identical: {line}"
    one, two = np.load(tmp_path / "t1.npz"), np.load(tmp_path / "t2.npz")
    assert sorted(one) == sorted(two) and len(one) == 4
    for name in one:
        a, b = one[name], two[name]
        assert np.isfinite(a).all() and a.shape == (40, 160), name
        tol = 1e-12 if name.endswith("f64") else 2e-5
        rel = float(np.abs(a - b).max() / np.abs(a).max())
        assert rel <= tol, f"{name}: 1 vs 2 threads differ by {rel:.2e} (relative) > {tol:.0e}"
