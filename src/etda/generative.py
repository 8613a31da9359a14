"""Attribution for generated text: token-wise scores and scores per data owner.

* :func:`token_scores` — which training sequences support each token of a test sequence:
  ``(n_test, T, n_train)``. Every test sequence is expanded into one copy per counted token
  position whose targets are padding (``-100``) everywhere else, so the sequence task's loss
  and output are that one token's; the copies are attributed together, in one run (one
  featurization of the training set, the test copies batched). For methods linear in the
  test gradient (Grad-Dot, IF, TracIn), the mean over a sequence's tokens of its token-wise
  loss scores equals its sequence score.
* :func:`by_owner` — scores summed (or averaged) over the training examples of each data
  owner: ``(n_test, n_owners)``, for compensation or auditing by source.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from etda import batch
from etda.task import IGNORE_INDEX


def expand_tokens(x: batch.Inputs, y: Tensor) -> tuple[batch.Inputs, Tensor, Tensor]:
    """One copy of every test sequence per position ``t``, its targets ``-100`` except at
    ``t``: inputs ``(n * T, ...)``, targets ``(n * T, T)``, and a mask ``(n, T)`` of the
    positions that were counted in the original (padding stays padding)."""
    if y.ndim != 2:
        raise ValueError(f"token-wise scores need next-token targets (N, T), got {tuple(y.shape)}")
    n, t = y.shape
    rows = torch.arange(n).repeat_interleave(t)
    eye = torch.eye(t, dtype=torch.bool).repeat(n, 1)  # (n * T, T): position t of copy t
    y_rep = y[rows]
    y_tok = torch.where(eye, y_rep, torch.full_like(y_rep, IGNORE_INDEX))
    return batch.select(x, rows), y_tok, y != IGNORE_INDEX


def token_scores(
    models: Any,
    train: Any,
    test: tuple[batch.Inputs, Tensor],
    method: Any = "trak",
    ensemble: Any = None,
    **options: Any,
) -> np.ndarray:
    """Scores ``(n_test, T, n_train)`` of every token of every test sequence (see the module
    doc); positions that are padding in the test targets are NaN."""
    from etda.engine import attribute

    x, y = test
    x_tok, y_tok, counted = expand_tokens(x, torch.as_tensor(y))
    scores = attribute(models, train, (x_tok, y_tok), method=method, ensemble=ensemble, **options)
    n, t = counted.shape
    values = np.asarray(scores.values, dtype=np.float64).reshape(n, t, -1)
    values[~counted.numpy()] = np.nan
    return values


def by_owner(
    values: np.ndarray, owners: Sequence[Any], reduce: str = "sum"
) -> tuple[np.ndarray, list[Any]]:
    """Scores ``(n_test, n_train)`` aggregated over each owner's training examples:
    ``(n_test, n_owners)`` and the owners in order of first appearance. ``reduce``: ``"sum"``
    (an owner's total contribution) or ``"mean"`` (per example)."""
    values = np.asarray(values)
    owners = list(owners)
    if len(owners) != values.shape[-1]:
        raise ValueError(f"{len(owners)} owners for {values.shape[-1]} training examples")
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    names = list(dict.fromkeys(owners))
    index = {o: i for i, o in enumerate(names)}
    groups = np.array([index[o] for o in owners])
    out = np.zeros((*values.shape[:-1], len(names)))
    np.add.at(np.moveaxis(out, -1, 0), groups, np.moveaxis(values, -1, 0))  # a view of out
    if reduce == "mean":
        out /= np.bincount(groups, minlength=len(names))
    return out, names
