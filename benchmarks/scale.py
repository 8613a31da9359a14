"""Scaling benchmark: out-of-core TRAK as the training set and the ensemble grow.

    python -m benchmarks.scale            # every section (about 20 minutes on 2 cores)
    python -m benchmarks.scale --only n   # one section: n | members | big | executors | storage

Every run is a fresh child process (so its peak RSS is its own) attributing 1000 Fashion-MNIST
test images to ``n`` training images (up to all 60000) with the fmnist-mlp model (trained on
its 5000 examples; featurization and scoring cost does not depend on the weights), TRAK with
factored TensorSketch features (k = 2048), features on disk and scores written block by block
to an ``.npy`` file under ``--max-memory 2GB``, top-10 kept in memory. Sections:

* ``n``: n = 5000, 20000, 60000 (one model) -> featurize and score seconds, peak RSS, and
  the fitted growth exponent (seconds ~ n^b);
* ``members``: 1, 10, 50 dropout members at n = 5000 -> the same against members;
* ``big``: 60000 examples x 10 members at k = 2048 -> must hold 2 GB peak RSS;
* ``executors``: featurizing 60000 examples x 8 members in process (2 threads) vs local
  processes vs Ray (2 workers each) -> speed-up;
* ``storage``: LDS of TRAK (one model, k = 2048) with features stored as float32, float16
  and bfloat16 on fmnist-mlp (cached ground truth), with feature bytes.

Writes ``benchmarks/results/scale.json`` and ``scale.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
N_TEST, K, BUDGET = 1000, 2048, "2GB"
SECTIONS = {
    "n": [{"n": n, "members": 1} for n in (5000, 20000, 60000)],
    "members": [{"n": 5000, "members": m} for m in (1, 10, 50)],
    "big": [{"n": 60000, "members": 10}],
    "executors": [
        {"n": 60000, "members": 8, "executor": e, "featurize_only": True}
        for e in ("inprocess", "process", "ray")
    ],
}


def child(spec: dict) -> dict:
    """One run in this (fresh) process; returns its figures."""
    import torch

    import etda
    from etda.data.bundle import fmnist
    from etda.settings import get_setting
    from etda.zoo import trained_models

    torch.set_num_threads(spec.get("threads", 2))
    setting = get_setting("fmnist-mlp")
    model = trained_models(setting, 1, progress=False)[0].model
    data = fmnist(n_train=spec["n"], n_test=N_TEST, seed=0)
    m = spec["members"]
    ensemble = etda.Dropout(members=m, seed=0) if m > 1 else None
    with tempfile.TemporaryDirectory(prefix="etda-scale-") as tmp:
        t0 = time.perf_counter()
        scores = etda.attribute(
            model,
            train=(data.x_train, data.y_train),
            test=(data.x_test, data.y_test),
            method="trak",
            ensemble=ensemble,
            proj_dim=K,
            projection="factored",
            memory_budget=BUDGET,
            out_of_core=True,
            store=Path(tmp) / "features",
            scores_out=Path(tmp) / "scores.npy",
            top_k=10,
            executor=spec.get("executor", "inprocess"),
            workers=2,
        )
        wall = time.perf_counter() - t0
        c = scores.costs
        top = scores.top(1)[0]["proponents"][0]
        values_finite = bool(np.isfinite(np.asarray(scores.values[:8])).all())
    return {
        **spec,
        "n_test": N_TEST,
        "proj_dim": K,
        "featurize_s": c.featurize_train_s + c.featurize_test_s,
        "score_s": c.score_s,
        "serve_s": c.serve_s,
        "wall_s": wall,
        "feature_bytes": c.feature_bytes,
        "scores_bytes": 4 * N_TEST * spec["n"],
        "score_block": scores.config["score_block"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "children_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "top1_test0": top,
        "finite": values_finite,
    }


def run_child(spec: dict) -> dict:
    print(f"  run {spec} ...", flush=True)
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.scale", "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    if out.returncode != 0:
        raise RuntimeError(f"child {spec} failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"    featurize {res['featurize_s']:.1f} s, score {res['score_s']:.1f} s, "
        f"peak RSS {res['peak_rss_mb']:.0f} MB, block {res['score_block']}",
        flush=True,
    )
    return res


def exponent(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y on log x (the growth exponent)."""
    lx, ly = np.log(xs), np.log(ys)
    return float(np.polyfit(lx, ly, 1)[0])


def storage_section() -> list[dict]:
    import torch

    import etda
    from etda.evaluate.lds import LDSConfig, lds, load_ground_truth
    from etda.settings import get_setting
    from etda.zoo import trained_models

    torch.set_num_threads(2)
    setting = get_setting("fmnist-mlp")
    data = setting.data()
    model = trained_models(setting, 1, progress=False)[0].model
    gt = load_ground_truth(setting, LDSConfig(), "runs/lds-cache")
    rows = []
    for storage in ("float32", "float16", "bfloat16"):
        s = etda.attribute(
            model,
            (data.x_train, data.y_train),
            (data.x_test, data.y_test),
            method="trak",
            proj_dim=K,
            projection="factored",
            storage=storage,
        )
        r = lds(s.values, gt)
        rows.append(
            {
                "storage": storage,
                "lds": r.mean,
                "sem": r.sem,
                "feature_bytes": s.costs.feature_bytes,
                "values": s.values,
            }
        )
        print(f"  storage {storage}: LDS {r.mean:.4f} ± {r.sem:.4f}", flush=True)
    ref = rows[0].pop("values")
    for row in rows[1:]:
        v = row.pop("values")
        row["max_rel_score_diff"] = float(np.abs(v - ref).max() / np.abs(ref).max())
        row["lds_diff"] = row["lds"] - rows[0]["lds"]
    return rows


def markdown(res: dict) -> str:
    mb = 1024**2
    lines = [
        "# Scaling benchmark (`python -m benchmarks.scale`)",
        "",
        f"TRAK, factored TensorSketch k = {K}, {N_TEST} test images, features on disk, scores "
        f"streamed to an .npy file under a {BUDGET} memory budget with top-10 kept; fmnist-mlp "
        "model; each run a fresh process (peak RSS its own). Machine: "
        f"{res['machine']['cpus']} cores, torch {res['machine']['torch']}, shared and "
        "noisy (other jobs ran alongside), so seconds are indicative; exponents come from "
        "one run each.",
        "",
        "| section | n train | members | featurize s | score s | serve s | peak RSS MB | "
        "features on disk | score block |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for sec in ("n", "members", "big"):
        for r in res.get(sec, []):
            lines.append(
                f"| {sec} | {r['n']} | {r['members']} | {r['featurize_s']:.1f} | "
                f"{r['score_s']:.1f} | {r['serve_s']:.1f} | {r['peak_rss_mb']:.0f} | "
                f"{r['feature_bytes'] / mb:.0f} MB | {r['score_block']} |"
            )
    g = res.get("growth", {})
    if g:
        lines += ["", "Growth exponents (serve seconds ~ x^b, least squares on log-log):", ""]
        for k, v in g.items():
            lines.append(f"- {k}: b = {v:.2f}")
    if res.get("big"):
        b = res["big"][0]
        ok = "holds" if b["peak_rss_mb"] < 2048 else "EXCEEDS"
        lines += [
            "",
            f"60000 x 10 members x k = {K}: peak RSS {b['peak_rss_mb']:.0f} MB ({ok} 2 GB), "
            f"{b['feature_bytes'] / 1024**3:.2f} GB of features on disk, "
            f"{b['scores_bytes'] / 1024**3:.2f} GB of scores written, serve {b['serve_s']:.0f} s.",
        ]
    ex = res.get("executors", [])
    if ex:
        base = next(r for r in ex if r["executor"] == "inprocess")["featurize_s"]
        lines += [
            "",
            "Featurization of 60000 examples x 8 dropout members (bit-identical results; "
            "pool or Ray start counted):",
            "",
            "| executor | featurize s | speed-up vs in-process |",
            "|---|---|---|",
        ]
        for r in ex:
            lines.append(
                f"| {r['executor']} | {r['featurize_s']:.1f} | {base / r['featurize_s']:.2f}x |"
            )
    st = res.get("storage", [])
    if st:
        lines += [
            "",
            "Storage precision (fmnist-mlp, TRAK one model, k = 2048, 50-subset LDS):",
            "",
            "| storage | LDS | LDS change | max relative score change | feature bytes |",
            "|---|---|---|---|---|",
        ]
        for r in st:
            lines.append(
                f"| {r['storage']} | {r['lds']:.4f} ± {r['sem']:.4f} | "
                f"{r.get('lds_diff', 0.0):+.4f} | {r.get('max_rel_score_diff', 0.0):.2e} | "
                f"{r['feature_bytes'] / mb:.1f} MB |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--only", choices=[*SECTIONS, "storage"], action="append")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    import torch

    path = RESULTS / "scale.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    res["machine"] = {
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    todo = args.only or [*SECTIONS, "storage"]
    for sec in todo:
        print(f"[{sec}]", flush=True)
        res[sec] = storage_section() if sec == "storage" else [run_child(s) for s in SECTIONS[sec]]
        growth = res.setdefault("growth", {})
        if sec == "n":
            growth["serve vs n (1 member)"] = exponent(
                [r["n"] for r in res["n"]], [r["serve_s"] for r in res["n"]]
            )
            growth["peak RSS vs n"] = exponent(
                [r["n"] for r in res["n"]], [r["peak_rss_mb"] for r in res["n"]]
            )
        if sec == "members":
            growth["serve vs members (n = 5000)"] = exponent(
                [r["members"] for r in res["members"]], [r["serve_s"] for r in res["members"]]
            )
            growth["peak RSS vs members"] = exponent(
                [r["members"] for r in res["members"]],
                [r["peak_rss_mb"] for r in res["members"]],
            )
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1, default=float))
        (RESULTS / "scale.md").write_text(markdown(res))
    print((RESULTS / "scale.md").read_text())
    assert all(math.isfinite(r["serve_s"]) for s in SECTIONS if s in res for r in res[s])


if __name__ == "__main__":
    main()
