"""Mislabel detectors: a suspicion score per training example (higher = more likely wrong).

Two families, ranked by the same metrics (``etda.evaluate.mislabel.detection_report``):

* **training dynamics** (no attribution): ``loss`` (the example's training loss under its
  label, averaged over the given models), ``loss`` over the *checkpoints* of a run (the loss
  summed along training: examples the model only fits late, or never), and ``aum``, the
  area under the margin (Pleiss et al. 2020): minus the margin ``logit_y - max other logit``
  averaged over checkpoints;
* **self-influence** (``etda.self_influence`` with any method, ensemble and curvature): how
  much the example supports its own label; ``loss-normalized`` divides it by the loss.

``fuse`` averages the rank of several detectors (ties broken by the first). On models that
do not memorize their flipped labels the training-dynamics signals win; self-influence wins
only where the model fits the noise (see README, "Mislabel detection").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor, nn

from etda import batch
from etda.task import ClassificationTask, default_task

DETECTORS = ("loss", "aum", "self-influence", "loss-normalized", "fusion")


@torch.no_grad()
def _outputs(model: nn.Module, x: batch.Inputs, task: Any, batch_size: int) -> list[Tensor]:
    was = model.training
    model.eval()
    p = next(model.parameters())
    outs = []
    n = batch.n_rows(x)
    for lo in range(0, n, batch_size):
        xb = batch.cast(batch.take(x, lo, min(lo + batch_size, n)), p.dtype, p.device)
        outs.append(batch.run_model(model, xb, task).cpu())
    model.train(was)
    return outs


def loss_scores(
    models: nn.Module | Sequence[nn.Module],
    x: batch.Inputs,
    y: Tensor,
    task: Any = None,
    batch_size: int = 1000,
) -> np.ndarray:
    """Per-example training loss ``(n,)`` averaged over ``models`` (e.g. a run's checkpoints:
    then the loss accumulated along training)."""
    models = [models] if isinstance(models, nn.Module) else list(models)
    task = task or default_task(y)
    total = torch.zeros(y.shape[0], dtype=torch.float64)
    for m in models:
        out = torch.cat(_outputs(m, x, task, batch_size))
        total += task.loss(out, y).double()
    return (total / len(models)).numpy()


def aum_scores(
    models: nn.Module | Sequence[nn.Module], x: batch.Inputs, y: Tensor, batch_size: int = 1000
) -> np.ndarray:
    """Minus the area under the margin ``(n,)``: ``-(logit_y - max_{c != y} logit_c)``
    averaged over ``models`` (a run's checkpoints), classification only."""
    models = [models] if isinstance(models, nn.Module) else list(models)
    task = ClassificationTask()
    total = torch.zeros(y.shape[0], dtype=torch.float64)
    for m in models:
        out = torch.cat(_outputs(m, x, task, batch_size)).double()
        correct = out.gather(1, y[:, None]).squeeze(1)
        others = out.scatter(1, y[:, None], float("-inf")).max(1).values
        total += correct - others
    return (-total / len(models)).numpy()


def fuse(*scores: np.ndarray) -> np.ndarray:
    """The mean rank of several detectors' scores (each ``(n,)``, higher = more suspicious)."""
    if not scores:
        raise ValueError("fuse needs at least one score vector")
    return np.mean([rankdata(np.asarray(s, np.float64)) for s in scores], axis=0)


def self_influence_scores(
    models: nn.Module | Sequence[nn.Module],
    train: Any,
    method: Any = "if",
    ensemble: Any = None,
    **options: Any,
) -> np.ndarray:
    """Self-influence ``(n,)`` (``etda.self_influence``) with any method and ensemble."""
    from etda.engine import self_influence

    return np.asarray(self_influence(models, train, method, ensemble, **options).values[0])


def mislabel_scores(
    detector: str,
    models: nn.Module | Sequence[nn.Module],
    x: batch.Inputs,
    y: Tensor,
    *,
    checkpoints: Sequence[nn.Module] | None = None,
    method: Any = "if",
    ensemble: Any = None,
    **options: Any,
) -> np.ndarray:
    """Suspicion scores ``(n,)`` of one detector (see the module doc). ``checkpoints``: models
    along the training run; the dynamics detectors use them when given (``loss`` and ``aum``
    over checkpoints), else the final ``models``. ``fusion``: IF self-influence and the loss
    over checkpoints, rank-averaged."""
    if detector == "auto":
        detector = choose_detector(models, x, y, checkpoints)
    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; choose from auto, {', '.join(DETECTORS)}")
    along = list(checkpoints) if checkpoints else models
    if detector == "loss":
        return loss_scores(along, x, y)
    if detector == "aum":
        return aum_scores(along, x, y)
    si = self_influence_scores(models, (x, y), method, ensemble, **options)
    if detector == "self-influence":
        return si
    if detector == "loss-normalized":
        return si / np.maximum(loss_scores(models, x, y), 1e-12)
    return fuse(si, loss_scores(along, x, y))


MEMORIZED = 0.95  # training accuracy above which a model has fit most of its labels


def choose_detector(
    models: nn.Module | Sequence[nn.Module],
    x: batch.Inputs,
    y: Tensor,
    checkpoints: Sequence[nn.Module] | None = None,
) -> str:
    """``detector="auto"``, from the measurements in BENCHMARKS.md ("Mislabel detection"):
    with a run's ``checkpoints``, ``"loss"`` over them (the best detector in every regime
    measured, memorizing models included); with the final models only, ``"self-influence"``
    when they fit most training labels, noise included (their final loss no longer separates
    flips), else ``"loss"``."""
    if checkpoints:
        return "loss"
    models = [models] if isinstance(models, nn.Module) else list(models)
    task = ClassificationTask()
    fits = []
    for m in models:
        pred = torch.cat(_outputs(m, x, task, 1000)).argmax(-1)
        fits.append(float((pred == y).double().mean()))
    return "self-influence" if min(fits) >= MEMORIZED else "loss"
