"""Counterfactual removal on fmnist-mlp: remove each sampled test example's top-k proponents
(by TRAK, IF, IF over 5 checkpoints measuring the test margin) or k random examples,
retrain with 2 seeds, and report how often the prediction flips and how much the margin
drops (k = 1 % and 5 % of the training set).

    python -m benchmarks.counterfactual   -> benchmarks/results/counterfactual.{json,md}
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from benchmarks.common import RESULTS, machine

TESTS = 8  # test examples, spread over the test set
KS = (50, 250)  # 1 % and 5 % of 5000
SEEDS = (0, 1)


def main() -> None:
    from etda.evaluate.counterfactual import removal_effects
    from etda.experiment import run_attribution
    from etda.settings import get_setting

    torch.set_num_threads(2)
    meta = {**machine(), "load_before": os.getloadavg()}
    setting = get_setting("fmnist-mlp")
    n_test = setting.data().n_test
    tests = [int(i) for i in np.linspace(0, n_test - 1, TESTS).round()]
    scores: dict = {"random": None}
    for name, method, ens, members, opts in (
        ("TRAK", "trak", "none", None, {}),
        ("IF", "if", "none", None, {}),
        ("IF, 5 checkpoints, margin", "if", "checkpoints", 5, {"measure": "output"}),
    ):
        s, _ = run_attribution(
            setting, method, ens, 1, members=members, method_options=opts, progress=False
        )
        scores[name] = np.asarray(s.values)
    t0 = time.perf_counter()
    out = removal_effects(setting, scores, tests, KS, SEEDS)
    meta.update(wall_s=time.perf_counter() - t0, load_after=os.getloadavg())
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "counterfactual.json").write_text(json.dumps({"meta": meta, **out}, indent=1))
    lines = [
        "# Counterfactual removal on fmnist-mlp",
        "",
        f"Measured {meta['date']} with `python -m benchmarks.counterfactual`: {TESTS} test "
        f"examples, their top-k proponents removed, {len(SEEDS)} retraining seeds each, "
        f"against the same seeds on the full training set ({meta['wall_s']:.0f} s). Cells: "
        "prediction flip rate / mean margin drop.",
        "",
        "| removed by | " + " | ".join(f"k = {k} ({k / 50:.0f} %)" for k in KS) + " |",
        "|---|" + "---|" * len(KS),
    ]
    for name, per_k in out["methods"].items():
        cells = [
            f"{per_k[str(k)]['flip_rate']:.2f} / {per_k[str(k)]['margin_drop']:+.2f}" for k in KS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (RESULTS / "counterfactual.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
