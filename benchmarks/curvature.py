"""Curvature for influence on a named setting: Gram (exact), K-FAC and EK-FAC, one model, five
models and five checkpoints of one run, against TRAK; LDS, wall seconds and peak RSS.

Every configuration runs in its own process (its peak RSS is its own), one after the other,
with 2 torch threads, on the setting's cached models and LDS ground truth (built first if
missing). kronfluence on the same models and ground truth is in ``benchmarks/peers/``.

    python -m benchmarks.curvature [--setting fmnist-mlp] [--only NAME ...]
        -> benchmarks/results/curvature-<setting>.{json,md}
    python -m benchmarks.curvature --one NAME --setting S     (one configuration, JSON out)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks.common import RESULTS, machine, peak_rss_mb

BUDGET = "8GB"  # exact (unprojected) preconditioned gradients of 5500 examples fit
# name: (method, ensemble, models, members, options)
CONFIGS: dict[str, tuple[str, str, int, int | None, dict]] = {
    "trak-1": ("trak", "none", 1, None, {}),
    "if-gram-1": ("if", "none", 1, None, {}),
    "if-kfac-1": ("if", "none", 1, None, {"curvature": "kfac"}),
    "if-ekfac-1": ("if", "none", 1, None, {"curvature": "ekfac"}),
    "if-ekfac-empirical-1": ("if", "none", 1, None, {"curvature": "ekfac", "fisher": "empirical"}),
    "if-gram-output-1": ("if", "none", 1, None, {"measure": "output"}),
    "if-ekfac-output-1": ("if", "none", 1, None, {"curvature": "ekfac", "measure": "output"}),
    "if-ekfac-empirical-output-1": (
        "if",
        "none",
        1,
        None,
        {"curvature": "ekfac", "fisher": "empirical", "measure": "output"},
    ),
    "if-gram-output-ckpt5": ("if", "checkpoints", 1, 5, {"measure": "output"}),
    "if-ekfac-2GB-1": ("if", "none", 1, None, {"curvature": "ekfac", "budget": "2GB"}),
    "if-ekfac-sketch-1": (
        "if",
        "none",
        1,
        None,
        {"curvature": "ekfac", "budget": "2GB", "proj_dim": 2048},
    ),
    "trak-5": ("trak", "none", 5, None, {}),
    "if-gram-5": ("if", "none", 5, None, {}),
    "if-kfac-5": ("if", "none", 5, None, {"curvature": "kfac"}),
    "if-ekfac-5": ("if", "none", 5, None, {"curvature": "ekfac"}),
    "if-ekfac-empirical-5": ("if", "none", 5, None, {"curvature": "ekfac", "fisher": "empirical"}),
    "trak-ckpt5": ("trak", "checkpoints", 1, 5, {}),
    "if-gram-ckpt5": ("if", "checkpoints", 1, 5, {}),
    "if-kfac-ckpt5": ("if", "checkpoints", 1, 5, {"curvature": "kfac"}),
    "if-ekfac-ckpt5": ("if", "checkpoints", 1, 5, {"curvature": "ekfac"}),
    "if-ekfac-empirical-ckpt5": (
        "if",
        "checkpoints",
        1,
        5,
        {"curvature": "ekfac", "fisher": "empirical"},
    ),
}


def run_one(name: str, setting: str) -> dict:
    import torch

    from etda.evaluate.lds import LDSConfig
    from etda.experiment import run_attribution

    torch.set_num_threads(2)
    method, ensemble, k, members, options = CONFIGS[name]
    options = dict(options)
    budget = options.pop("budget", BUDGET)
    proj_dim = options.pop("proj_dim", None)
    t0 = time.perf_counter()
    scores, result = run_attribution(
        setting,
        method,
        ensemble,
        k,
        members=members,
        lds_config=LDSConfig(),
        method_options=options,
        proj_dim=proj_dim,
        attribute_options={"memory_budget": budget},
        progress=False,
        executor="process",
    )
    wall = time.perf_counter() - t0
    c = scores.costs
    return {
        "name": name,
        "method": method,
        "ensemble": ensemble,
        "models": k,
        "members": len(scores.config["members"]),
        "options": options,
        "memory_budget": budget,
        "projection": scores.config["projection"],
        "out_of_core": scores.config["out_of_core"],
        "lds": result.mean,
        "sem": result.sem,
        "attribute_wall_s": scores.config["wall_s"],
        "wall_s": wall,
        "serve_s": c.serve_s,
        "train_s": c.train_s,
        "bytes": c.bytes,
        "peak_rss_mb": peak_rss_mb(),
        "curvature": scores.config["members"][0].get("curvature"),
    }


def table(rows: list[dict], setting: str, meta: dict) -> str:
    lines = [
        f"# Curvature for influence on {setting}",
        "",
        f"Measured {meta['date']} with `python -m benchmarks.curvature --setting {setting}`, one "
        f"configuration per process, 2 torch threads; load average before the run "
        f"{meta['load_before']}. LDS over the setting's 50 retrained half subsets "
        "(test-margin ground truth). Wall seconds = the attribution (serving) only; the "
        "models come from the cache (their training seconds are in `train s`)."
        + (
            " Rows merged from runs started "
            + ", ".join(m["date"] for m in meta["earlier_runs"])
            + f" and {meta['date']} (`--only` reruns), on the same models and ground truth."
            if meta.get("earlier_runs")
            else ""
        ),
        "",
        "| configuration | LDS ± s.e. | serve s | train s | peak RSS MB | features |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} | | | | |")
            continue
        lines.append(
            f"| {r['name']} | {r['lds']:.3f} ± {r['sem']:.3f} | {r['serve_s']:.1f} | "
            f"{r['train_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['projection']}"
            f"{' (out of core)' if r.get('out_of_core') else ''} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--setting", default="fmnist-mlp")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--one")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.setting)))
        return
    from benchmarks.common import setup

    setup(args.setting, n_models=5)  # models and ground truth cached before timing anything
    meta = {**machine(), "load_before": os.getloadavg()}
    out = RESULTS / f"curvature-{args.setting}"
    rows = []
    if args.only and out.with_suffix(".json").exists():  # rerun some, keep the others
        kept = json.loads(out.with_suffix(".json").read_text())
        rows = [r for r in kept["rows"] if r["name"] not in args.only and r["name"] in CONFIGS]
        meta["earlier_runs"] = kept["meta"].get("earlier_runs", []) + [kept["meta"]]
    for name in args.only or list(CONFIGS):
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.curvature",
            "--one",
            name,
            "--setting",
            args.setting,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append({"name": name, "error": proc.stderr.strip().splitlines()[-1][:200]})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    meta["load_after"] = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows.sort(key=lambda r: list(CONFIGS).index(r["name"]))
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(table(rows, args.setting, meta))
    print(f"wrote {out}.md")


if __name__ == "__main__":
    main()
