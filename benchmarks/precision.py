"""Mixed-precision kernels on fmnist-mlp: the exact gradient kernel (one TRAK / IF member,
5000 training examples) with its Gram products in float64, float32 and bfloat16
(``kernel_dtype``), and the damped factorization and solves in float64 or float32
(``solve_dtype``). LDS and serving seconds (median of 5, side by side in one run: the
configurations take turns in every repeat, so machine load falls on all alike; one torch
thread). The target of the fast exact path: one member in <= 2 s with LDS within 0.001.

    python -m benchmarks.precision   -> benchmarks/results/precision.{json,md}
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from benchmarks.common import RESULTS, machine, setup

os.environ.setdefault("ETDA_CACHE_DIR", "runs")
# (kernel_dtype, solve_dtype)
DTYPES = (
    ("float64", "float64"),
    ("float32", "float64"),
    ("float32", "float32"),
    ("bfloat16", "float64"),
)
METHODS = ("trak", "if")
REPEATS = 5


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
        times: dict = {d: [] for d in DTYPES}
        score_times: dict = {d: [] for d in DTYPES}
        values: dict = {}
        for _ in range(REPEATS):
            for d in DTYPES:
                blocks._GRAM_CACHE.clear()  # every repeat computes its input Grams afresh
                t0 = time.perf_counter()
                s = etda.attribute(
                    model,
                    train,
                    test,
                    method=method,
                    kernel_dtype=d[0],
                    solve_dtype=d[1],
                    progress=False,
                )
                times[d].append(time.perf_counter() - t0)
                score_times[d].append(s.costs.score_s)
                values[d] = s.values
        ref = values[DTYPES[0]]
        for d in DTYPES:
            res = lds(values[d], gt)
            rows.append(
                {
                    "method": method,
                    "kernel_dtype": d[0],
                    "solve_dtype": d[1],
                    "lds": res.mean,
                    "sem": res.sem,
                    "wall_s": float(np.median(times[d])),
                    "score_s": float(np.median(score_times[d])),
                    "wall_all_s": times[d],
                    "max_rel_diff": float(np.abs(values[d] - ref).max() / np.abs(ref).max()),
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
        f"{REPEATS}, the configurations taking turns in every repeat, the input-Gram cache "
        "cleared before each). One model, exact gradient kernel, 5000 train / 500 test. "
        "*serve s*: the whole `etda.attribute` call; *vs float64*: its ratio to the float64 "
        "row of the same method; LDS difference against that row.",
        "",
        "| method | kernel_dtype | solve_dtype | LDS ± s.e. | LDS diff | serve s | vs float64 "
        "| score s | max diff / max |score| |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = {row["method"]: row for row in r["rows"] if row["kernel_dtype"] == "float64"}
    for row in r["rows"]:
        b = base[row["method"]]
        lines.append(
            f"| {row['method']} | {row['kernel_dtype']} | {row.get('solve_dtype', 'float64')} | "
            f"{row['lds']:.4f} ± {row['sem']:.4f} | {row['lds'] - b['lds']:+.4f} | "
            f"{row['wall_s']:.2f} | {row['wall_s'] / b['wall_s']:.2f} | {row['score_s']:.2f} | "
            f"{row['max_rel_diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
