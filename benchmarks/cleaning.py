"""Data cleaning on fmnist-mlp, with 10 % injected label noise and without: rank training
examples by their summed influence on a validation half of the test set (most harmful
first: IF, TRAK, and IF over 5 checkpoints of the run), by their training loss over 5
checkpoints, or at random; remove the top 2 % / 5 % / 10 %, retrain with 2 seeds (on 2 worker
processes, cached and resumable) and report accuracy and loss on the other half.

    python -m benchmarks.cleaning   -> benchmarks/results/cleaning.{json,md}
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from benchmarks.common import RESULTS, machine

FRACTIONS = (0.02, 0.05, 0.10)
HARM_RANKINGS = [  # (label, method, ensemble): influence summed over the validation half
    ("IF harm", "if", "none"),
    ("TRAK harm", "trak", "none"),
    ("IF harm, 5 checkpoints", "if", "checkpoints"),
]


def rankings(setting, val: np.ndarray) -> dict:
    from etda.detect import loss_scores
    from etda.experiment import checkpoint_models, checkpoint_schedule, run_attribution
    from etda.zoo import trained_models

    data = setting.data()
    out: dict = {"random": None}
    for name, method, ensemble in HARM_RANKINGS:
        s, _ = run_attribution(setting, method, ensemble, 1, progress=False)
        out[name] = -np.asarray(s.values)[val].sum(0)  # most harmful to validation first
    epochs = checkpoint_schedule(setting.recipe.epochs, 5)
    tms = trained_models(setting, 1, checkpoint_epochs=epochs, progress=False)
    out["loss over checkpoints"] = loss_scores(
        checkpoint_models(setting, tms), data.x_train, data.y_train
    )
    return out


def main() -> None:
    from etda.evaluate.counterfactual import cleaning_effects
    from etda.evaluate.mislabel import noisy_setting
    from etda.settings import get_setting

    torch.set_num_threads(2)
    meta = {**machine(), "load_before": os.getloadavg()}
    t0 = time.perf_counter()
    base = get_setting("fmnist-mlp")
    n_test = base.data().n_test
    val, held = np.arange(0, n_test, 2), np.arange(1, n_test, 2)
    rows = {}
    for label, setting in (("clean labels", base), ("10 % flipped", noisy_setting(base, 0.1, 0))):
        rows[label] = cleaning_effects(
            setting, rankings(setting, val), FRACTIONS, held, executor="process", workers=2
        )
        print(label, json.dumps(rows[label]["methods"]), flush=True)
    meta.update(load_after=os.getloadavg(), wall_s=time.perf_counter() - t0)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cleaning.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# Data cleaning on fmnist-mlp",
        "",
        f"Measured {meta['date']} with `python -m benchmarks.cleaning`: rankings from one model "
        "(influence summed over 250 validation test examples; the loss over 5 checkpoints), "
        "the top fraction removed, 2 retraining seeds, accuracy / loss on the other 250 test "
        f"examples; {meta['wall_s']:.0f} s wall in all (load {meta['load_before'][0]:.1f} before, "
        f"{meta['load_after'][0]:.1f} after).",
        "",
    ]
    for label, r in rows.items():
        none = r["methods"]["none"]["0"]
        lines += [
            f"**{label}** (nothing removed: accuracy {none['accuracy']:.3f}, loss "
            f"{none['loss']:.3f})",
            "",
            "| removed by | " + " | ".join(f"{f:.0%}" for f in FRACTIONS) + " |",
            "|---|" + "---|" * len(FRACTIONS),
        ]
        for name, per in r["methods"].items():
            if name == "none":
                continue
            cells = [
                f"{per[f'{f:g}']['accuracy']:.3f} / {per[f'{f:g}']['loss']:.3f}" for f in FRACTIONS
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        c = r["costs"]
        lines += [
            "",
            f"Retraining: {c['models']} models, {c['train_seconds']:.0f} s of training.",
            "",
        ]
    (RESULTS / "cleaning.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
