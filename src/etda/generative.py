"""Attribution for generated text: token-wise scores and scores per data owner.

* :func:`token_scores` — which training sequences support each token of a test sequence:
  ``(n_test, T, n_train)``. Every test sequence is expanded into one copy per counted token
  position whose targets are padding (``-100``) everywhere else, so the sequence task's loss
  and output are that one token's; the copies are attributed together, in one run (one
  featurization of the training set, the test copies batched). For methods linear in the
  test gradient (Grad-Dot, IF, TracIn), the mean over a sequence's tokens of its token-wise
  loss scores equals its sequence score.
* :func:`prompt_mask` / :func:`completion_scores` — attribute only the completion of a
  prompt + completion sequence: the prompt positions' targets become padding (``-100``), so
  the sequence task's loss and output count the completion's tokens alone.
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
from etda.scores import Scores
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


def token_attribution(
    models: Any,
    train: Any,
    test: tuple[batch.Inputs, Tensor],
    method: Any = "trak",
    ensemble: Any = None,
    **options: Any,
) -> tuple[Scores, Tensor]:
    """The attribution of every token copy (see :func:`expand_tokens`) in one run: ``Scores``
    ``(n_test * T, n_train)``, row ``i * T + t`` = token ``t`` of test sequence ``i`` (a
    padded position's row is zero), and the counted mask ``(n_test, T)``. ``config`` records
    ``token_positions = T``, so saved scores can be shown token by token (``etda explain
    --scores DIR --tokens``)."""
    from etda.engine import attribute

    x, y = test
    x_tok, y_tok, counted = expand_tokens(x, torch.as_tensor(y))
    scores = attribute(models, train, (x_tok, y_tok), method=method, ensemble=ensemble, **options)
    scores.config["token_positions"] = int(counted.shape[1])
    return scores, counted


def token_values(values: Any, counted: Tensor | np.ndarray) -> np.ndarray:
    """Rows ``(n_test * T, n_train)`` of token copies as ``(n_test, T, n_train)`` float64,
    NaN where ``counted (n_test, T)`` is false."""
    counted = np.asarray(counted, dtype=bool)
    n, t = counted.shape
    values = np.array(values, dtype=np.float64).reshape(n, t, -1)
    values[~counted] = np.nan
    return values


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
    scores, counted = token_attribution(models, train, test, method, ensemble, **options)
    return token_values(scores.values, counted)


def prompt_mask(y: Tensor, prompt_len: int | Sequence[int] | Tensor) -> Tensor:
    """Next-token targets ``y (N, T)`` with the prompt's targets set to ``-100`` (a copy).

    ``y[:, t]`` is the token at position ``t + 1`` of the sequence (``x = seq[:-1]``,
    ``y = seq[1:]``), so with a prompt of ``p`` tokens the targets ``t < p - 1`` predict prompt
    tokens and count nowhere; the first completion token (position ``p``) stays counted.
    ``prompt_len``: one length for every row, or one per row ``(N,)``; 0 and 1 mask nothing.
    """
    y = torch.as_tensor(y)
    if y.ndim != 2:
        raise ValueError(f"prompt_mask needs next-token targets (N, T), got {tuple(y.shape)}")
    lens = torch.as_tensor(prompt_len, dtype=torch.long).reshape(-1)
    if lens.numel() == 1:
        lens = lens.expand(y.shape[0])
    if lens.shape != (y.shape[0],) or bool((lens < 0).any()):
        raise ValueError(
            f"prompt_len must be a non-negative int or {y.shape[0]} of them, got {prompt_len!r}"
        )
    if bool((lens > y.shape[1]).any()):
        raise ValueError(
            f"a prompt of {int(lens.max())} tokens leaves no completion in sequences of "
            f"{y.shape[1] + 1} tokens"
        )
    prompt = torch.arange(y.shape[1])[None, :] < (lens[:, None] - 1)
    return y.masked_fill(prompt, IGNORE_INDEX)


def completion_scores(
    models: Any,
    train: Any,
    prompt_and_completion: Tensor | tuple[batch.Inputs, Tensor],
    prompt_len: int | Sequence[int] | Tensor,
    method: Any = "trak",
    ensemble: Any = None,
    **options: Any,
) -> Scores:
    """Scores ``(N, n_train)`` of the completions alone: ``prompt_and_completion`` is token
    ids ``(L,)`` or ``(N, L)`` (inputs ``ids[:, :-1]``, targets ``ids[:, 1:]``) or an
    ``(x, y)`` pair of inputs and aligned targets ``(N, T)``; the first ``prompt_len`` tokens
    of each sequence are the prompt (see :func:`prompt_mask`). Options as ``etda.attribute``.
    Token-wise: ``token_scores(models, train, (x, prompt_mask(y, p)))`` (prompt rows NaN)."""
    from etda.engine import attribute

    x, y = split_sequences(prompt_and_completion)
    test = (x, prompt_mask(y, prompt_len))
    return attribute(models, train, test, method=method, ensemble=ensemble, **options)


def split_sequences(seqs: Tensor | tuple[batch.Inputs, Tensor]) -> tuple[batch.Inputs, Tensor]:
    """``(x, y)`` from token ids ``(L,)`` / ``(N, L)`` (``x = ids[:, :-1]``, ``y = ids[:, 1:]``),
    or an ``(x, y)`` pair as given."""
    if isinstance(seqs, tuple | list):
        x, y = seqs
        return x, torch.as_tensor(y)
    ids = torch.as_tensor(seqs)
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2 or ids.shape[1] < 2 or ids.is_floating_point():
        raise ValueError(
            f"sequences must be integer token ids (L,) or (N, L) with L >= 2, got "
            f"{tuple(ids.shape)} {ids.dtype}"
        )
    return ids[:, :-1], ids[:, 1:]


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
    groups, names = owner_index(owners)
    out = np.zeros((*values.shape[:-1], len(names)))
    np.add.at(np.moveaxis(out, -1, 0), groups, np.moveaxis(values, -1, 0))  # a view of out
    if reduce == "mean":
        out /= np.bincount(groups, minlength=len(names))
    return out, names


def owner_index(owners: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
    """The group of every training example, int64 ``(n_train,)``, and the owners in order of
    first appearance (group ``g`` is ``names[g]``)."""
    names = list(dict.fromkeys(owners))
    index = {o: i for i, o in enumerate(names)}
    return np.array([index[o] for o in owners], dtype=np.int64), names
