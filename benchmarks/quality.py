"""Attribution quality on fmnist-mlp: damping rules, kernel forms and the LDS targets.

Measures, side by side in one run, TRAK with one model and with five independent models
at proj_dim 512 and 2048 (factored TensorSketch) and without projection (exact
sample-space kernel), under: no damping, the default rule (``auto``: spectral mean),
GCV, and a sweep of ``lam = c * tr/min(n, k)`` (the sweep uses the ground truth only for
this report). Then IF (Gauss-Newton, same machinery) with its peak RSS.

    python -m benchmarks.quality [all|sweeps|defaults]   # -> benchmarks/results/quality.{json,md}
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch

import etda
from benchmarks.common import RESULTS, machine, peak_rss_mb, setup, write
from etda.evaluate.lds import lds
from etda.features import blocks as fb
from etda.features.featurize import FeatureSpec, Featurizer
from etda.methods.solve import DampedSystem, choose_damping
from etda.task import ClassificationTask, select_parameters

SWEEP = [0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0]
FORMS = [("factored", 512), ("factored", 2048), ("none", None)]


def member_features(model, data, proj: str, dim: int | None, seed: int):
    task = ClassificationTask()
    params = select_parameters(model)
    spec = FeatureSpec(proj, dim=dim or 2048, seed=seed, target="output")
    fz = Featurizer(model, task, params, spec, (data.x_train, data.y_train))

    def run(x, y):
        outs = [fz(x[i : i + 512], y[i : i + 512]) for i in range(0, len(x), 512)]
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    return run(data.x_train, data.y_train), run(data.x_test, data.y_test)


def sweep(models, data, gt, proj, dim) -> dict:
    """LDS of the combined TRAK scores for every damping rule, solving each member once
    per lambda (features computed once)."""
    rules = ["none", "auto", "gcv"] + [f"trace:{c}" for c in SWEEP]
    kernel = {r: None for r in rules}
    q_sum = None
    chosen: dict[str, list] = {r: [] for r in rules}
    for i, tm in enumerate(models):
        tr, te = member_features(tm.model, data, proj, dim, seed=i)
        feats = {k: v for k, v in tr.items() if k not in fb.EXTRA}
        tfeats = {k: v for k, v in te.items() if k not in fb.EXTRA}
        system = DampedSystem(feats)
        q = tr["q"][:, 0].double()
        q_sum = q if q_sum is None else q_sum + q
        for r in rules:
            d = choose_damping(system, 0.0 if r == "none" else r, y=q)
            v = system.solve(tfeats, d.lam)
            kernel[r] = v if kernel[r] is None else kernel[r] + v
            chosen[r].append(d.c)
    out = {}
    for r in rules:
        values = (kernel[r] / len(models)) * (q_sum / len(models))[None, :]
        res = lds(values.numpy(), gt)
        out[r] = {"lds": res.mean, "sem": res.sem, "c": chosen[r]}
    return out


def timed_default(models, data, gt, method: str, **kw) -> dict:
    t0 = time.perf_counter()
    s = etda.attribute(
        [tm.model for tm in models],
        (data.x_train, data.y_train),
        (data.x_test, data.y_test),
        method=method,
        **kw,
    )
    wall = time.perf_counter() - t0
    res = lds(s.values, gt)
    return {
        "lds": res.mean,
        "sem": res.sem,
        "wall_s": wall,
        "serve_s": s.costs.serve_s,
        "projection": s.config["projection"],
        "damping": [m.get("damping", {}).get("rule") for m in s.config["members"]][:1],
        "c": [m.get("damping", {}).get("c") for m in s.config["members"]],
    }


def one_default(k_models: int, method: str, kw: dict) -> dict:
    """One default-options attribution, run in its own process so its peak RSS is its own."""
    _, data, models, gt = setup("fmnist-mlp", n_models=k_models)
    out = timed_default(models[:k_models], data, gt, method, **kw)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


DEFAULTS = [
    (k, method, kw)
    for k in (1, 5)
    for method, kw in (("trak", {}), ("trak", {"proj_dim": 2048}), ("if", {}))
]


def table(results: dict) -> str:
    lines = [
        "| models | kernel form | undamped λ=0 | auto (spectral mean) | GCV | best swept λ (c) |",
        "|---|---|---|---|---|---|",
    ]
    for key, r in results["sweeps"].items():
        k, form = key.split(" ", 1)
        best = max(
            (v["lds"], v["sem"], n.split(":")[1]) for n, v in r.items() if n.startswith("trace")
        )
        lines.append(
            f"| {k[:-1]} | {form} | {r['none']['lds']:.3f} ± {r['none']['sem']:.3f} | "
            f"**{r['auto']['lds']:.3f} ± {r['auto']['sem']:.3f}** | {r['gcv']['lds']:.3f} | "
            f"{best[0]:.3f} ({best[2]}) |"
        )
    lines += [
        "",
        "| default call | kernel form | LDS ± s.e. | serve s | peak RSS MB |",
        "|---|---|---|---|---|",
    ]
    for key, d in results.get("defaults", {}).items():
        lines.append(
            f"| {key} | {d['projection']} | {d['lds']:.3f} ± {d['sem']:.3f} | "
            f"{d['serve_s']:.1f} | {d['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def main(part: str = "all") -> None:
    path = RESULTS / "quality.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.update({"machine": machine(), "setting": "fmnist-mlp"})
    if part in ("all", "sweeps"):
        setting, data, models, gt = setup("fmnist-mlp", n_models=5, threads=1)
        results["sweeps"] = {}
        for k_models in (1, 5):
            for proj, dim in FORMS:
                key = f"{k_models}x {proj}{dim or ''}"
                t0 = time.perf_counter()
                results["sweeps"][key] = r = sweep(models[:k_models], data, gt, proj, dim)
                best = max((v["lds"], n) for n, v in r.items() if n.startswith("trace"))
                print(
                    f"{key:18s} undamped {r['none']['lds']:.3f}  auto {r['auto']['lds']:.3f}  "
                    f"gcv {r['gcv']['lds']:.3f}  best {best[0]:.3f} ({best[1]})  "
                    f"[{time.perf_counter() - t0:.0f}s]",
                    flush=True,
                )
    if part in ("all", "defaults"):
        # Defaults through the public API, each in its own process: timing and peak RSS.
        results["defaults"] = {}
        for k_models, method, kw in DEFAULTS:
            key = f"{method}, {k_models} model{'s' if k_models > 1 else ''}, {kw or 'no options'}"
            arg = json.dumps([k_models, method, kw])
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.quality", "--one", arg],
                capture_output=True,
                text=True,
                check=True,
            )
            results["defaults"][key] = d = json.loads(proc.stdout.strip().splitlines()[-1])
            print(
                f"{key:40s} LDS {d['lds']:.3f} ± {d['sem']:.3f}  {d['projection']:8s} "
                f"serve {d['serve_s']:.1f}s  peak RSS {d['peak_rss_mb']:.0f} MB",
                flush=True,
            )
    write("quality", results)
    (RESULTS / "quality.md").write_text(table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        k, method, kw = json.loads(sys.argv[2])
        print(json.dumps(one_default(k, method, kw)))
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else "all")
