"""Featurization speed, memory and quality of the projections on fmnist-mlp.

Each configuration runs in its own process (so peak RSS is its own): TRAK on one model,
5000 train + 500 test examples; featurization of train and test and scoring are timed
over three runs (median; a configuration slower than a minute is timed once), with the
LDS of the scores against the setting's ground truth and the process's peak RSS. All
configurations run side by side in one invocation, one torch thread each.

    python -m benchmarks.featurize          # writes benchmarks/results/featurize.{json,md}
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

CONFIGS = [
    # name, attribute() options
    ("dense-gaussian (vmap grads)", {"projection": "gaussian", "use_hooks": False}),
    ("dense-gaussian", {"projection": "gaussian"}),
    ("dense-rademacher", {"projection": "rademacher"}),
    ("sparse (count sketch)", {"projection": "sparse"}),
    ("factored (TensorSketch)", {"projection": "factored"}),
]
DIMS = [512, 2048]
REPEATS = 3
SLOW_S = 60.0  # configurations slower than this are timed once
THREADS = 1  # one thread per configuration: steadier timings on a shared 2-core machine


def one(name: str, opts: dict) -> dict:
    import torch

    import etda
    from benchmarks.common import peak_rss_mb, setup
    from etda.evaluate.lds import lds

    _, data, models, gt = setup("fmnist-mlp", n_models=1, threads=THREADS)
    model = models[0].model
    runs = []
    for _ in range(REPEATS):
        s = etda.attribute(
            model, (data.x_train, data.y_train), (data.x_test, data.y_test), method="trak", **opts
        )
        runs.append(s.costs)
        if s.costs.serve_s > SLOW_S:  # a slow reference: one run tells its cost well enough
            break
    res = lds(s.values, gt)
    med = {
        f: statistics.median(getattr(c, f) for c in runs)
        for f in ("featurize_train_s", "featurize_test_s", "score_s")
    }
    return {
        "name": name,
        "options": opts,
        "proj_dim": opts.get("proj_dim"),
        **med,
        "featurize_s": med["featurize_train_s"] + med["featurize_test_s"],
        "feature_bytes": runs[-1].feature_bytes,
        "lds": res.mean,
        "sem": res.sem,
        "peak_rss_mb": peak_rss_mb(),
        "threads": torch.get_num_threads(),
        "repeats": len(runs),
    }


def table(rows: list[dict]) -> str:
    base = {r["proj_dim"]: r["featurize_s"] for r in rows if r["name"] == "dense-gaussian"}
    lines = [
        "| projection | k | featurize s (train+test) | speed-up vs dense | score s | "
        "peak RSS MB | LDS ± s.e. | runs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        k = r["proj_dim"] or "exact"
        ref = base.get(r["proj_dim"])
        speed = f"{ref / r['featurize_s']:.1f}x" if ref else "-"
        lines.append(
            f"| {r['name']} | {k} | {r['featurize_s']:.2f} | {speed} | {r['score_s']:.2f} | "
            f"{r['peak_rss_mb']:.0f} | {r['lds']:.3f} ± {r['sem']:.3f} | {r['repeats']} |"
        )
    return "\n".join(lines)


def main() -> None:
    from benchmarks.common import RESULTS, machine, write

    rows = []
    configs = [
        (n, {**o, "proj_dim": k})
        for k in DIMS
        for n, o in CONFIGS
        # the dense variants cost the same per k; at 2048 one of them is enough
        if not (k == 2048 and n in ("dense-gaussian (vmap grads)", "dense-rademacher"))
    ]
    configs.append(("exact kernel (no projection)", {"projection": "none"}))
    for name, opts in configs:
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.featurize", "--one", json.dumps([name, opts])],
            capture_output=True,
            text=True,
            check=True,
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{name:32s} k={opts.get('proj_dim') or '-':>5} featurize {row['featurize_s']:.2f}s "
            f"score {row['score_s']:.2f}s RSS {row['peak_rss_mb']:.0f}MB "
            f"LDS {row['lds']:.3f}±{row['sem']:.3f}",
            flush=True,
        )
    write("featurize", {"machine": machine(), "repeats": REPEATS, "rows": rows})
    (RESULTS / "featurize.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        name, opts = json.loads(sys.argv[2])
        print(json.dumps(one(name, opts)))
    else:
        main()
