"""Counterfactual removal on fmnist-mlp: remove each sampled test example's top-k proponents
(TRAK and IF, each with one model and with 5 checkpoints of its run), or k random examples,
or the k nearest training examples in input space; retrain with 2 seeds and report how often
the prediction flips and how much the margin drops (k = 0.5 %, 2 % and 10 % of the training
set). Retrainings run on local worker processes and are cached (runs/retrain-cache).

    python -m benchmarks.counterfactual   -> benchmarks/results/counterfactual.{json,md,png}
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from benchmarks.common import RESULTS, machine

TESTS = 12  # test examples, spread over the test set
PERCENTS = (0.5, 2.0, 10.0)
SEEDS = (0, 1)
RANKINGS = (  # label, method, ensemble, members, method options
    ("TRAK", "trak", "none", None, {}),
    ("IF", "if", "none", None, {}),
    ("TRAK, 5 checkpoints", "trak", "checkpoints", 5, {}),
    ("IF, 5 checkpoints", "if", "checkpoints", 5, {}),
    ("IF, 5 checkpoints, margin", "if", "checkpoints", 5, {"measure": "output"}),
)


def plot(out: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, per_k in out["methods"].items():
        style = "--" if name in ("random", "nearest neighbours") else "-"
        for ax, key in zip(axes, ("flip_rate", "margin_drop"), strict=True):
            ax.plot(
                out["percents"],
                [per_k[str(k)][key] for k in out["ks"]],
                style,
                marker="o",
                label=name,
            )
    for ax, title in zip(axes, ("prediction flip rate", "mean margin drop"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("top-k removed (% of the training set)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("fmnist-mlp: removing a test example's top proponents, retrained")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    from etda.evaluate.counterfactual import counterfactual
    from etda.experiment import run_attribution
    from etda.settings import get_setting

    torch.set_num_threads(2)
    meta = {**machine(), "load_before": os.getloadavg()}
    setting = get_setting("fmnist-mlp")
    scores, costs = {}, {}
    for name, method, ens, members, opts in RANKINGS:
        s, _ = run_attribution(
            setting, method, ens, 1, members=members, method_options=opts, progress=False
        )
        scores[name] = np.asarray(s.values)
        costs[name] = s.costs.to_dict()
    t0 = time.perf_counter()
    out = counterfactual(setting, scores, TESTS, PERCENTS, SEEDS, executor="process", workers=2)
    meta.update(wall_s=time.perf_counter() - t0, load_after=os.getloadavg())
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "attribution_costs": costs, **out}
    (RESULTS / "counterfactual.json").write_text(json.dumps(payload, indent=1))
    plot(out, RESULTS / "counterfactual.png")
    c = out["costs"]
    lines = [
        "# Counterfactual removal on fmnist-mlp",
        "",
        f"Measured {meta['date']} with `python -m benchmarks.counterfactual` (load "
        f"{meta['load_before'][0]:.1f} before, {meta['load_after'][0]:.1f} after): "
        f"{len(out['tests'])} test examples, their top-k proponents removed, {len(SEEDS)} "
        f"retraining seeds each, against the same seeds on the full training set; "
        f"{c['models']} models, {c['train_seconds']:.0f} s of training on 2 worker processes "
        f"({meta['wall_s']:.0f} s wall). Random removals use seed {out['random_seed']}. Cells: "
        "prediction flip rate / mean margin drop. Curves: `counterfactual.png`.",
        "",
        "| removed by | "
        + " | ".join(f"k = {k} ({p:g} %)" for k, p in zip(out["ks"], out["percents"], strict=True))
        + " |",
        "|---|" + "---|" * len(out["ks"]),
    ]
    for name, per_k in out["methods"].items():
        cells = [
            f"{per_k[str(k)]['flip_rate']:.2f} / {per_k[str(k)]['margin_drop']:+.2f}"
            for k in out["ks"]
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (RESULTS / "counterfactual.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
