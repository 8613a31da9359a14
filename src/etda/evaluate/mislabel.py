"""Mislabel detection: flip a seeded fraction of training labels, train, rank by self-influence.

The self-influence of training example ``i`` is the diagonal entry ``tau_i(z_i)`` of the
attribution with test set = training set: how much the example supports its own (possibly
wrong) label. Flipped labels should rank high. Every report carries two trivial baselines
beside it (SPEC.md, "How quality is measured"):

* ``loss``: the per-example training loss of the noisy-label model(s) under the noisy labels;
* ``random``: a seeded random ranking (AUC about 0.5, found-at-x% about x%).

On a model that does not memorize its flipped labels (fmnist-mlp trained with dropout, 10 %
flips) the plain loss ranks the flips about as well as self-influence: attribution adds
something only where the model fits the noise (no dropout, long training). The report
records ``memorized``, the fraction of flipped examples whose noisy label the model predicts,
so that the reader can tell which regime a number comes from.

The diagonal is computed without the ``n x n`` matrix where the method allows it (Grad-Dot
and TracIn: squared gradient norms; TRAK and influence functions with the eigen solver: the
diagonal of the damped solve); other methods fall back to the full matrix.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from etda.methods import Method, method_takes

FOUND_AT = (0.05, 0.10, 0.20, 0.30)  # fractions of the training set inspected
DYNAMICS_CHECKPOINTS = 5  # checkpoints of each run the training-dynamics detectors read
CURVE_POINTS = 101


# ------------------------------------------------------------------------ label noise


def flip_labels(
    y: Tensor | np.ndarray,
    fraction: float = 0.1,
    num_classes: int | None = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Flip ``round(fraction * n)`` labels, chosen with ``seed``, each to a *different* class.

    Returns ``(y_noisy, flipped)``: int64 labels ``(n,)`` and a bool mask ``(n,)``. The new
    class is uniform over the ``num_classes - 1`` other classes (default: ``max(y) + 1``).
    """
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, Tensor) else y).long()
    if y.ndim != 1 or y.numel() == 0:
        raise ValueError(f"y must be a non-empty 1-D label tensor, got shape {tuple(y.shape)}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    num_classes = int(y.max()) + 1 if num_classes is None else int(num_classes)
    if num_classes < 2:
        raise ValueError(f"flipping labels needs at least 2 classes, got {num_classes}")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]"
        )
    n = y.numel()
    rng = np.random.Generator(np.random.PCG64(seed))
    idx = np.sort(rng.choice(n, size=int(round(fraction * n)), replace=False))
    shift = rng.integers(1, num_classes, size=idx.size)  # 1..C-1: never the same class
    y_noisy = y.clone()
    y_noisy[idx] = (y[idx] + torch.from_numpy(shift)) % num_classes
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[idx] = True
    return y_noisy, flipped


# --------------------------------------------------------------------- self-influence


def self_influence(
    models: nn.Module | Sequence[nn.Module],
    x: Tensor,
    y: Tensor,
    method: str | Method = "trak",
    ensemble: Any = None,
    **options: Any,
) -> np.ndarray:
    """Self-influence ``tau_i(z_i)`` of every training example, float64 ``(n,)``.

    Equals ``np.diag(etda.attribute(models, (x, y), (x, y), method, ensemble).values)`` (for
    per-example dropout masks it uses each example's training mask on both sides); see
    :func:`etda.self_influence`, which returns it as Scores with costs.
    """
    from etda.engine import self_influence as scores_of

    x, y = torch.as_tensor(x), torch.as_tensor(y).long()
    return np.asarray(scores_of(models, (x, y), method, ensemble, **options).values[0], np.float64)


@torch.no_grad()
def training_loss(
    models: nn.Module | Sequence[nn.Module], x: Tensor, y: Tensor, batch_size: int = 1000
) -> np.ndarray:
    """Per-example cross-entropy under labels ``y``, averaged over ``models`` (eval mode)."""
    models = [models] if isinstance(models, nn.Module) else list(models)
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for m in models:
        was = m.training
        m.eval()
        for lo in range(0, x.shape[0], batch_size):
            out = m(x[lo : lo + batch_size])
            loss = nn.functional.cross_entropy(out, y[lo : lo + batch_size], reduction="none")
            total[lo : lo + batch_size] += loss.double()
        m.train(was)
    return (total / len(models)).numpy()


# ---------------------------------------------------------------------------- metrics


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC-AUC of ranking by ``scores`` (higher = more suspicious) for bool ``positive``.

    The Mann-Whitney statistic with average ranks for ties: 1 when every positive outranks
    every negative, 0 when every negative outranks every positive.
    """
    from scipy.stats import rankdata

    scores = np.asarray(scores, np.float64)
    positive = np.asarray(positive, bool)
    if scores.shape != positive.shape or scores.ndim != 1:
        raise ValueError(
            f"scores {scores.shape} and the flipped mask {positive.shape} must be equal 1-D"
        )
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC-AUC needs both flipped and clean examples")
    if not np.isfinite(scores).all():
        raise ValueError("ranking scores contain NaN or inf")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def detection_report(
    scores_for_ranking: np.ndarray,
    flipped_mask: np.ndarray | Tensor,
    found_at: Sequence[float] = FOUND_AT,
    points: int = CURVE_POINTS,
) -> dict:
    """How well ranking by ``scores_for_ranking`` (high first) finds the flipped labels.

    Returns ``{"auc", "found_at": {"5%": fraction of flips found in the top 5 %, ...},
    "curve": {"inspected": [...], "found": [...]}}`` (the curve at ``points`` fractions of the
    training set inspected, 0..1). Ties are broken by index (stable).
    """
    s = np.asarray(scores_for_ranking, np.float64)
    flipped = np.asarray(flipped_mask, bool)
    auc = roc_auc(s, flipped)
    order = np.argsort(-s, kind="stable")
    hits = np.concatenate([[0], np.cumsum(flipped[order])]) / flipped.sum()  # (n + 1,)
    n = s.size

    def found(frac: float) -> float:
        return float(hits[int(np.ceil(frac * n - 1e-9))])

    grid = np.linspace(0.0, 1.0, points)
    return {
        "auc": auc,
        "found_at": {f"{round(100 * f)}%": found(f) for f in found_at},
        "curve": {"inspected": grid.tolist(), "found": [found(f) for f in grid]},
    }


def random_ranking(n: int, seed: int = 0) -> np.ndarray:
    """A seeded random ranking score ``(n,)`` (the trivial baseline)."""
    return np.random.Generator(np.random.PCG64([seed, 0x5EED])).random(n)


# -------------------------------------------------------------------- noisy settings


def _noisy_data(data_fn: Any, fraction: float, seed: int) -> Any:
    bundle = data_fn()
    y_noisy, _ = flip_labels(bundle.y_train, fraction, bundle.num_classes, seed)
    return dataclasses.replace(bundle, y_train=y_noisy, name=f"{bundle.name}-flip")


def noisy_setting(
    setting: Any,
    fraction: float = 0.1,
    seed: int = 0,
    dropout: float | None = None,
    epochs: int | None = None,
) -> Any:
    """``setting`` with a seeded ``fraction`` of training labels flipped (its own model cache).

    ``dropout``/``epochs`` override the model's dropout rate and the recipe's epochs (models
    that memorize the noise: ``dropout=0``, more epochs). The name records every change.
    """
    from etda.settings import Setting, get_setting

    setting = get_setting(setting) if isinstance(setting, str) else setting
    name = f"{setting.name}-flip{fraction:g}-s{seed}"
    kwargs = dict(setting.model_kwargs)
    if dropout is not None:
        if "dropout" not in inspect.signature(_model_class(setting.model_name)).parameters:
            raise ValueError(f"model {setting.model_name!r} has no dropout rate to override")
        kwargs["dropout"] = float(dropout)
        name += f"-p{dropout:g}"
    recipe = setting.recipe
    if epochs is not None:
        recipe = dataclasses.replace(recipe, epochs=int(epochs))
        name += f"-e{epochs}"
    return Setting(
        name=name,
        model_name=setting.model_name,
        model_kwargs=kwargs,
        recipe=recipe,
        data_fn=functools.partial(_noisy_data, setting.data_fn, fraction, seed),
        description=f"{setting.description}; {fraction:.0%} labels flipped (seed {seed})",
    )


def _model_class(name: str) -> Any:
    from etda.models.registry import MODELS

    return MODELS[name]


def run_mislabel(
    setting: Any,
    method: str = "trak",
    ensemble: str = "none",
    fraction: float = 0.1,
    seed: int = 0,
    *,
    k_models: int = 1,
    members: int | None = None,
    p: float | None = None,
    rank: int | None = None,
    lora_epochs: int | None = None,
    dropout: float | None = None,
    epochs: int | None = None,
    model_dir: str | None = None,
    progress: bool = False,
    **options: Any,
) -> dict:
    """Flip labels, train ``k_models`` noisy models with the setting's recipe (cached in
    ``model_dir``), rank training examples by self-influence and report detection.

    ``ensemble``: a kind of ``etda.experiment.ENSEMBLES`` (with ``members``, ``p``, ``rank``,
    ``lora_epochs``); ``dropout``/``epochs``: see :func:`noisy_setting`; ``options``: method
    and attribution options (``damping``, ``proj_dim``, ...).

    Returns a JSON-ready dict: ``self_influence``, ``loss``, ``loss_normalized``
    (self-influence / loss), the checkpoint detectors and ``random`` detection reports
    (:func:`detection_report`), ``memorized`` (fraction of flips whose noisy label the model
    predicts), test accuracy, costs and the chosen configuration.
    """
    from etda.compat import check
    from etda.experiment import (
        accuracy,
        checkpoint_schedule,
        damping_summary,
        default_members,
        make_ensemble,
        prepare_models,
    )
    from etda.methods import get_method
    from etda.settings import get_setting
    from etda.zoo import trained_models

    base = get_setting(setting) if isinstance(setting, str) else setting
    noisy = noisy_setting(base, fraction, seed, dropout, epochs)
    data, clean = noisy.data(), base.data()
    flipped = (data.y_train != clean.y_train).numpy()
    ens = make_ensemble(ensemble, members, p=p, rank=rank, lora_epochs=lora_epochs)
    method_options = {k: options.pop(k) for k in list(options) if method_takes(method, k)}
    method_obj = get_method(method, **method_options)
    check(method_obj, ens, checkpoints=[])
    n_ckpt = (members or default_members(ensemble)) if ens.members_are_checkpoints else 5
    t0 = time.perf_counter()
    # every checkpoint the training-dynamics detectors read, trained (or loaded) once
    dyn_epochs = checkpoint_schedule(noisy.recipe.epochs, DYNAMICS_CHECKPOINTS)
    dyn_models = trained_models(
        noisy, k_models, model_dir, checkpoint_epochs=dyn_epochs, progress=progress
    )
    tms, attr_models, checkpoint_kw = prepare_models(
        noisy, method_obj, ens, k_models, n_ckpt, model_dir, progress=progress
    )
    models = [tm.model for tm in tms]
    options = {**options, **checkpoint_kw}
    x, y = data.x_train, data.y_train
    from etda.engine import self_influence as self_influence_scores

    scores = self_influence_scores(
        attr_models,
        (x, y),
        method_obj,
        ens,
        train_seconds=sum(tm.seconds for tm in tms),
        progress=progress,
        **options,
    )
    si = np.asarray(scores.values[0], np.float64)
    loss = training_loss(models, x, y)
    with torch.no_grad():
        pred = torch.stack([m(x).argmax(-1) for m in models])  # (K, n)
    fits_noisy = (pred == y[None]).double().mean(0).numpy()
    return {
        "setting": base.name,
        "noisy_setting": noisy.name,
        "fraction": fraction,
        "seed": seed,
        "n_train": int(flipped.size),
        "n_flipped": int(flipped.sum()),
        "method": scores.method.removeprefix("self-"),
        "ensemble": ensemble,
        "models": k_models,
        "members": members,
        "dropout": dropout,
        "epochs": noisy.recipe.epochs,
        "model_dropout": noisy.model_kwargs.get("dropout"),
        "self_influence": detection_report(si, flipped),
        "loss": detection_report(loss, flipped),
        "loss_normalized": detection_report(si / np.maximum(loss, 1e-12), flipped),
        **_dynamics_reports(noisy, dyn_models, dyn_epochs, x, y, si, flipped),
        "random": detection_report(random_ranking(flipped.size, seed), flipped),
        "memorized": float(fits_noisy[flipped].mean()),
        "clean_train_accuracy": float(fits_noisy[~flipped].mean()),
        "test_accuracy": float(np.mean([accuracy(m, data.x_test, data.y_test) for m in models])),
        "costs": scores.costs.to_dict(),
        "damping": damping_summary(scores),
        "models_cached": int(sum(tm.cached for tm in tms)),
        "wall_s": time.perf_counter() - t0,
    }


def _dynamics_reports(
    noisy: Any,
    tms: list,
    epochs: list[int],
    x: Tensor,
    y: Tensor,
    si: np.ndarray,
    flipped: Any,
) -> dict:
    """Detection by training dynamics over each run's checkpoints (``etda.detect``): the loss
    accumulated along training, the area under the margin, and the rank fusion of the loss
    with self-influence."""
    from etda.detect import aum_scores, fuse, loss_scores
    from etda.experiment import checkpoint_models

    ckpts = checkpoint_models(noisy, tms)
    loss_ckpt = loss_scores(ckpts, x, y)
    return {
        "loss_checkpoints": detection_report(loss_ckpt, flipped),
        "aum_checkpoints": detection_report(aum_scores(ckpts, x, y), flipped),
        "fusion": detection_report(fuse(si, loss_ckpt), flipped),
        "dynamics_epochs": list(epochs),
    }
