"""Trajectory members against the naive ensemble: checkpoints of one run, snapshots of its
tail (cyclic rate) and forks of its second half, on fmnist-mlp, TRAK and IF, with LDS and
every cost measured in one run (issue: cheap ensembles).

    python -m benchmarks.trajectory [--setting fmnist-mlp] [--methods trak if]
        -> benchmarks/results/trajectory-<setting>.{json,md}

Training is reported in runs (epochs of training over the recipe's epochs, exact by
construction: snapshots replace the run's last quarter, forks add their continuations to the
run up to the fork point) and in seconds (cached models report their original training
time; members train now, so their seconds follow the machine's load). Models, ground truth
and members are seeded (seed 0 onwards). ``--only LABEL ...`` reruns some configurations
and keeps the other rows; ``--markdown-only`` rewrites the table from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import torch

from benchmarks.common import RESULTS, machine

os.environ.setdefault("ETDA_CACHE_DIR", "runs")

# (label, ensemble kind, trained models, members, epochs of training in units of one run)
CONFIGS = [
    ("1 model", "none", 1, None, 1.0),
    ("naive 5", "none", 5, None, 5.0),
    ("checkpoints 5", "checkpoints", 1, 5, 1.0),
    ("snapshots 5 (tail 25 %)", "snapshots", 1, 5, 1.0),  # the tail replaces the run's end
    ("forks 5 (from 50 %)", "forks", 1, 5, 0.5 + 5 * 0.5),
    ("forks 5 (from 75 %)", "forks-75", 1, 5, 0.75 + 5 * 0.25),
    ("naive 5, shared solve", "none", 5, None, 5.0),
    ("checkpoints 5, shared solve", "checkpoints", 1, 5, 1.0),
]
SHARED = ", shared solve"  # TRAK(solve="shared"): one solve for the members' mean kernel


def run(
    setting: str,
    methods: list[str],
    only: list[str] | None,
    old: list[dict],
    save: Callable[[dict], None] = lambda result: None,
) -> dict:
    """Every configuration of ``methods`` (``only``: these labels), ``save``d after each."""
    import etda
    from etda.bench.sweeps import get_sweep
    from etda.evaluate.lds import LDSConfig
    from etda.experiment import run_attribution

    # the ground truth and featurizer of the setting's own sweep (text: 2 seeds per subset,
    # factored sketches of 2048)
    sweep = get_sweep(setting=setting)
    gt_config = LDSConfig(n_subsets=sweep.n_subsets, seeds_per_subset=sweep.seeds_per_subset)
    first = sweep.configs[0]
    featurizer = {"proj_dim": first.proj_dim, "projection": first.projection}

    rows = [r for r in old if (only and r["config"] not in only) or r["method"] not in methods]
    load_before = os.getloadavg()[0]
    for method in methods:
        for label, kind, k, members, runs in CONFIGS:
            if only and label not in only or label.endswith(SHARED) and method != "trak":
                continue
            ens = etda.Forks(members, at=0.75) if kind == "forks-75" else kind
            t0 = time.perf_counter()
            scores, res = run_attribution(
                setting,
                method,
                ens,
                k,
                members=members if isinstance(ens, str) else None,
                lds_config=gt_config,
                **featurizer,
                executor="process",
                workers=2,
                progress=False,
                method_options={"solve": "shared"} if label.endswith(SHARED) else None,
            )
            c = scores.costs
            rows.append(
                {
                    "method": method,
                    "config": label,
                    "lds": res.mean,
                    "sem": res.sem,
                    "train_runs": runs,
                    "train_s": c.train_s,
                    "serve_s": c.serve_s,
                    "weights_bytes": c.weights_bytes,
                    "feature_bytes": c.feature_bytes,
                    "wall_s": time.perf_counter() - t0,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            save(_result(setting, load_before, rows))  # a killed run keeps its rows
    return _result(setting, load_before, rows)


def _result(setting: str, load_before: float, rows: list[dict]) -> dict:
    return {
        "setting": setting,
        "machine": machine(),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "rows": rows,
    }


def markdown(r: dict) -> str:
    lines = [
        f"# Trajectory members on {r['setting']}",
        "",
        f"Measured {r['machine']['date']} with `python -m benchmarks.trajectory --setting "
        f"{r['setting']}` ({r['machine']['threads']} torch threads, load "
        f"{r['load_before']:.1f} before, {r['load_after']:.1f} after). LDS over 50 retrained "
        "half subsets; ratios against the naive 5-model ensemble of the same method. Rows may "
        "come from several invocations (`--only`): their seconds follow each invocation's load "
        "on a shared machine, so read serve ratios as rough; the training column (in runs of "
        "the recipe) is exact. Model MB: the weights an ensemble keeps (checkpoints, snapshots "
        "and forks are whole models; snapshots and forks also keep the base).",
        "",
        "| method | configuration | LDS ± s.e. | training (runs) | train s | serve s | model MB "
        "| training / naive 5 | serve / naive 5 | model bytes / naive 5 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = [c[0] for c in CONFIGS]
    for method in dict.fromkeys(row["method"] for row in r["rows"]):
        rows = [row for row in r["rows"] if row["method"] == method]
        rows.sort(key=lambda row: order.index(row["config"]))
        naive = next(row for row in rows if row["config"] == "naive 5")
        for row in rows:
            runs = row.get("train_runs", dict((c[0], c[4]) for c in CONFIGS)[row["config"]])
            lines.append(
                f"| {method} | {row['config']} | {row['lds']:.3f} ± {row['sem']:.3f} | "
                f"{runs:.2f} | {row['train_s']:.1f} | {row['serve_s']:.1f} | "
                f"{row['weights_bytes'] / 1e6:.1f} | {runs / 5:.2f} | "
                f"{row['serve_s'] / naive['serve_s']:.2f} | "
                f"{row['weights_bytes'] / naive['weights_bytes']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", default="fmnist-mlp")
    parser.add_argument("--methods", nargs="+", default=["trak", "if"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="+", help="configuration labels to (re)run; kept rows")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the .md only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = RESULTS / f"trajectory-{args.setting}.json"
    old = json.loads(path.read_text()) if path.exists() else None
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.markdown_only and old is not None:
        result = old
    else:
        kept = old["rows"] if old and args.only else []
        result = run(
            args.setting,
            args.methods,
            args.only,
            kept,
            lambda partial: path.write_text(json.dumps(partial, indent=1)),
        )
    path.write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (RESULTS / f"trajectory-{args.setting}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
