"""Are the text settings trustworthy? Training curves and the ground truth's noise ceiling.

For each text setting (the character transformer and the GPT-2 with a BPE tokenizer trained
here): one model trained with the setting's recipe, a checkpoint after every epoch, its mean
training loss per epoch and the held-out test loss per epoch (nats per predicted token), so
convergence and overfitting can be read off; for ``kjv-transformer`` also its former recipe
(Adam 5e-3, linear decay, no clipping). Then the LDS ground truth of the setting's sweep
(50 random halves x 2 retraining seeds, shared with ``etda bench``; the GPT-2's sweep retrains
each subset once, so it has no ceiling here): the Spearman between the two seeds' outputs of
the same subsets (the retrain-noise ceiling) and the LDS a perfect predictor would reach
against the 2-seed average.

    ETDA_CACHE_DIR=runs python -m benchmarks.text_settings
        -> benchmarks/results/text-settings.{json,md}, text-curves.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np
import torch

from benchmarks.common import RESULTS, machine
from etda.train import TrainRecipe

SETTINGS = ("kjv-transformer", "kjv-gpt2")
FORMER = {  # the recipe kjv-transformer had before this benchmark's fix
    "kjv-transformer": TrainRecipe(
        optimizer="adam", lr=5e-3, weight_decay=0.0, epochs=10, batch_size=32, lr_schedule="linear"
    )
}


def token_loss(setting, model, x, y) -> float:
    """Mean negative log-likelihood per counted target token (nats)."""
    ll = setting.output(model, x, y)
    return float(-ll.sum() / (y != -100).sum())


def curves(setting, recipe: TrainRecipe | None = None) -> dict:
    """Training and test loss per epoch of one model (seed 0)."""
    s = setting if recipe is None else dataclasses.replace(setting, recipe=recipe)
    data = s.data()
    result = s.train(0, checkpoint_epochs=range(1, s.recipe.epochs + 1))
    model, test = result.model, []
    for state in result.checkpoints:
        model.load_state_dict(state)
        test.append(token_loss(s, model, data.x_test, data.y_test))
    return {
        "recipe": s.recipe.to_dict(),
        "train_loss": result.losses,
        "test_loss": test,
        "seconds": result.seconds,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def ceiling(setting_name: str, workers: int) -> dict | None:
    """The noise ceiling of the setting's sweep ground truth (computed if missing); None
    where the sweep retrains each subset once."""
    from etda.bench.sweeps import get_sweep
    from etda.evaluate.lds import LDSConfig, ground_truth, noise_ceiling

    sweep = get_sweep(setting=setting_name)
    if sweep.seeds_per_subset < 2:
        return None
    config = LDSConfig(n_subsets=sweep.n_subsets, seeds_per_subset=sweep.seeds_per_subset)
    t0 = time.perf_counter()
    gt = ground_truth(setting_name, config, workers=workers, progress=True)
    nc = noise_ceiling(gt)
    return {
        **nc.to_dict(),
        "config": config.to_dict(),
        "retrain_seconds": gt.train_seconds,
        "wall_seconds": time.perf_counter() - t0,
    }


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.8))
    for ax, (name, runs) in zip(np.atleast_1d(axes), results.items(), strict=True):
        for label, run in runs["curves"].items():
            epochs = range(1, len(run["train_loss"]) + 1)
            ax.plot(epochs, run["train_loss"], "--", label=f"{label}: train")
            ax.plot(epochs, run["test_loss"], "-o", ms=3, label=f"{label}: test")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss (nats / token)")
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: dict, info: dict) -> str:
    lines = [
        "# Text settings: training curves and the ground truth's noise ceiling",
        "",
        f"`python -m benchmarks.text_settings`, {info['date']}; load average at start "
        f"{info['load'][0]:.1f}, at end {info['load_end'][0]:.1f}; torch {info['torch']}.",
        "",
        "![curves](text-curves.png)",
        "",
        "| setting | recipe | parameters | epochs | train loss (last) | test loss (best / last) "
        "| train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, res in results.items():
        for label, run in res["curves"].items():
            r, test = run["recipe"], run["test_loss"]
            desc = f"{label}: {r['optimizer']} {r['lr']:g}, {r['lr_schedule']}"
            if r.get("warmup"):
                desc += f", warm-up {r['warmup']:g}"
            if r.get("grad_clip"):
                desc += f", clip {r['grad_clip']:g}"
            lines.append(
                f"| {name} | {desc} | {run['parameters']:,} | {len(test)} | "
                f"{run['train_loss'][-1]:.3f} | {min(test):.3f} / {test[-1]:.3f} | "
                f"{run['seconds']:.0f} |"
            )
    lines += [
        "",
        "Noise ceiling of each setting's LDS ground truth (random halves, two retraining seeds "
        "per subset): *between seeds* is the Spearman, across subsets, between the two seeds' "
        "outputs of the same subsets (mean ± s.e. over test examples); *max LDS* is what a "
        "perfect predictor of the noise-free effect would reach against the 2-seed average "
        "(Spearman-Brown). Read a setting's LDS against it.",
        "",
        "| setting | subsets x seeds | between seeds | max LDS | retraining s |",
        "|---|---|---|---|---|",
    ]
    for name, res in results.items():
        c = res.get("ceiling")
        if c:
            cfg = c["config"]
            lines.append(
                f"| {name} | {cfg['n_subsets']} x {cfg['seeds_per_subset']} | "
                f"{c['between_repeats']:.3f} ± {c['between_repeats_sem']:.3f} | "
                f"{c['max_lds']:.3f} | {c['retrain_seconds']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-ceiling", action="store_true", help="curves only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from etda.settings import get_setting

    info = {**machine(), "load": os.getloadavg()}
    results: dict = {}
    for name in args.settings:
        setting = get_setting(name)
        runs = {"recipe": curves(setting)}
        if name in FORMER:
            runs["former recipe"] = curves(setting, FORMER[name])
        results[name] = {"curves": runs, "description": setting.description}
        if not args.no_ceiling:
            results[name]["ceiling"] = ceiling(name, args.workers)
    info["load_end"] = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "text-settings.json").write_text(
        json.dumps({"machine": info, "results": results}, indent=1, default=float)
    )
    plot(results, RESULTS / "text-curves.png")
    (RESULTS / "text-settings.md").write_text(markdown(results, info))
    print((RESULTS / "text-settings.md").read_text())


if __name__ == "__main__":
    main()
