"""Mislabel detection: which detector wins where (fmnist-mlp in two regimes, fmnist2-cnn).

For each setting, 10 % of the training labels are flipped (seed 0) and the noisy models are
trained with the setting's recipe and in a regime that memorizes more of the flips
(fmnist-mlp without dropout and with 3x the epochs; fmnist2-cnn, which has no dropout, with 3x
the epochs). Every detector ranks the training set: self-influence (IF, TRAK, one model, 5
checkpoints of the run, 10 dropout masks), self-influence / loss, the training loss, the loss
and the area under the margin over 5 checkpoints of the run, and the rank fusion of
self-influence with the checkpoint loss. Reported: ROC-AUC, precision at the flip rate, and
the fraction of flips found in the top 10 %.

    python -m benchmarks.mislabel   -> benchmarks/results/mislabel.{json,md}
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from benchmarks.common import RESULTS, machine

RUNS = [  # (label, setting, dropout override, epochs factor)
    ("fmnist-mlp (fits few flips)", "fmnist-mlp", None, None),
    ("fmnist-mlp (memorizes: no dropout, 3x epochs)", "fmnist-mlp", 0.0, 3),
    ("fmnist2-cnn (recipe)", "fmnist2-cnn", None, None),
    ("fmnist2-cnn (memorizes: 3x epochs)", "fmnist2-cnn", None, 3),
]
# self-influence configurations: (method, ensemble kind, members)
CONFIGS = [
    ("if", "none", None),
    ("trak", "none", None),
    ("if", "checkpoints", 5),
    ("trak", "checkpoints", 5),
    ("if", "dropout", 10),
]
DROPOUT_P = 0.1  # the masks' rate (fmnist-mlp's own; models trained without dropout need one)
DETECTORS = [
    "self_influence",
    "loss_normalized",
    "loss",
    "loss_checkpoints",
    "aum_checkpoints",
    "fusion",
    "random",
]


def config_label(method: str, ensemble: str, members: int | None) -> str:
    return method if ensemble == "none" else f"{method}, {ensemble} {members}"


def precision_at_rate(report: dict) -> float:
    """Precision when inspecting as many examples as there are flips (= recall there)."""
    curve = report["curve"]
    return float(np.interp(0.1, curve["inspected"], curve["found"]))


def main() -> None:
    from etda.evaluate.mislabel import run_mislabel
    from etda.settings import get_setting

    torch.set_num_threads(2)
    meta = {**machine(), "load_before": os.getloadavg()}
    rows = []
    for label, name, dropout, factor in RUNS:
        epochs = get_setting(name).recipe.epochs * factor if factor else None
        for method, ensemble, members in CONFIGS:
            t0 = time.perf_counter()
            rep = run_mislabel(
                name,
                method,
                ensemble,
                0.1,
                0,
                members=members,
                p=DROPOUT_P if ensemble == "dropout" else None,
                dropout=dropout,
                epochs=epochs,
            )
            row = {
                "run": label,
                "method": config_label(method, ensemble, members),
                "ensemble": ensemble,
                "memorized": rep["memorized"],
                "wall_s": time.perf_counter() - t0,
            }
            for d in DETECTORS:
                row[d] = {
                    "auc": rep[d]["auc"],
                    "precision_at_rate": precision_at_rate(rep[d]),
                    "found_10": rep[d]["found_at"]["10%"],
                }
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta["load_after"] = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mislabel.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# Mislabel detection: which detector wins where",
        "",
        f"Measured {meta['date']} with `python -m benchmarks.mislabel` (2 torch threads, load "
        f"{meta['load_before'][0]:.1f} before). 10 % of labels flipped (seed 0). Cells: ROC-AUC "
        "/ precision at the flip rate. `self-influence` uses the row's method; the dynamics "
        "detectors read 5 checkpoints of the same run; `loss_normalized` = self-influence / "
        "loss; `fusion` = rank mean of self-influence and the checkpoint loss. Columns other "
        "than the two self-influence ones do not depend on the row's method.",
        "",
        "| run | method | memorized | " + " | ".join(DETECTORS) + " |",
        "|---|---|---|" + "---|" * len(DETECTORS),
    ]
    for r in rows:
        cells = [f"{r[d]['auc']:.3f} / {r[d]['precision_at_rate']:.2f}" for d in DETECTORS]
        lines.append(
            f"| {r['run']} | {r['method']} | {r['memorized']:.0%} | " + " | ".join(cells) + " |"
        )
    (RESULTS / "mislabel.md").write_text("\n".join(lines) + "\n")
    print("wrote benchmarks/results/mislabel.md")


if __name__ == "__main__":
    main()
