"""Mixed-precision kernels on fmnist-mlp: the exact gradient kernel (one TRAK / IF member,
5000 training examples) with its Gram products in float64, float32 and bfloat16, sums and
solves in float64 (``kernel_dtype``). LDS and serving seconds (median of 3, side by side in
one run, one torch thread).

    python -m benchmarks.precision   -> benchmarks/results/precision.{json,md}
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from benchmarks.common import RESULTS, machine, setup

os.environ.setdefault("ETDA_CACHE_DIR", "runs")
DTYPES = ("float64", "float32", "bfloat16")
METHODS = ("trak", "if")
REPEATS = 3


def main() -> dict:
    import etda
    import etda.features.blocks as blocks
    from etda.evaluate.lds import lds

    setting, data, models, gt = setup("fmnist-mlp", 1, threads=1)
    model = models[0].model
    train, test = (data.x_train, data.y_train), (data.x_test, data.y_test)
    load_before = os.getloadavg()[0]
    rows = []
    for method in METHODS:
        ref = None
        for dtype in DTYPES:
            times, score_times = [], []
            for _ in range(REPEATS):
                blocks._GRAM_CACHE.clear()  # every repeat computes its input Grams afresh
                t0 = time.perf_counter()
                s = etda.attribute(
                    model, train, test, method=method, kernel_dtype=dtype, progress=False
                )
                times.append(time.perf_counter() - t0)
                score_times.append(s.costs.score_s)
            ref = s.values if dtype == "float64" else ref
            res = lds(s.values, gt)
            rows.append(
                {
                    "method": method,
                    "kernel_dtype": dtype,
                    "lds": res.mean,
                    "sem": res.sem,
                    "wall_s": float(np.median(times)),
                    "score_s": float(np.median(score_times)),
                    "max_rel_diff": float(np.abs(s.values - ref).max() / np.abs(ref).max()),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    result = {
        "machine": machine(),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "rows": rows,
    }
    (RESULTS / "precision.json").write_text(json.dumps(result, indent=1))
    (RESULTS / "precision.md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(r: dict) -> str:
    lines = [
        "# Mixed-precision kernels on fmnist-mlp",
        "",
        f"Measured {r['machine']['date']} with `python -m benchmarks.precision` (1 torch thread, "
        f"load {r['load_before']:.1f} before, {r['load_after']:.1f} after; medians of "
        f"{REPEATS}, the input-Gram cache cleared before each). One model, exact gradient "
        "kernel, 5000 train / 500 test.",
        "",
        "| method | kernel_dtype | LDS ± s.e. | serve s | score s | max diff / max |score| |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['method']} | {row['kernel_dtype']} | {row['lds']:.4f} ± {row['sem']:.4f} | "
            f"{row['wall_s']:.2f} | {row['score_s']:.2f} | {row['max_rel_diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
