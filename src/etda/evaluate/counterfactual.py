"""Counterfactual removal (brittleness): does a prediction really rest on its proponents?

For each sampled test example, remove its top-k proponents by a method's scores from the
training set, retrain with several seeds, and measure how often the prediction flips and how
much the test margin drops. A random removal of the same size is the honest baseline: a
method whose proponents matter flips predictions with fewer removals than random
(Ilyas et al. 2022, "datamodels"; Hammoudeh & Lowd 2022). The unremoved baseline is the
same seeds trained on the full training set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from etda.parallel import torch_threads

RANDOM = "random"


def removal_sets(
    scores: np.ndarray | None, test: int, k: int, n_train: int, seed: int
) -> np.ndarray:
    """Indices to remove for test example ``test``: its ``k`` strongest proponents by
    ``scores`` (n_test, n_train), or ``k`` random training examples when ``scores`` is None."""
    if scores is None:
        rng = np.random.Generator(np.random.PCG64([seed, test, k]))
        return rng.choice(n_train, size=k, replace=False)
    return np.argsort(-np.asarray(scores[test], np.float64), kind="stable")[:k]


def removal_effects(
    setting: Any,
    scores: dict[str, np.ndarray | None],
    tests: Sequence[int],
    ks: Sequence[int],
    seeds: Sequence[int] = (0, 1),
    progress: Any = None,
) -> dict:
    """For each method in ``scores`` (name -> (n_test, n_train) scores; ``None``: random
    removal) and each removal size ``k``: the fraction of (test example, seed) pairs whose
    predicted class flips, and the mean drop of the test margin, against the same seeds
    trained on everything. One torch thread per retraining (deterministic)."""
    data = setting.data()
    n = data.n_train
    x_t, y_t = data.x_test[list(tests)], data.y_test[list(tests)]

    def fit(seed: int, keep: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        with torch_threads(1):
            model = setting.train(seed, subset=keep).model
            out = setting.output(model, x_t, y_t).numpy()
            with torch.no_grad():
                pred = model.eval()(x_t).argmax(-1).numpy()
        return out, pred

    base = {s: fit(s, None) for s in seeds}
    result: dict[str, dict] = {}
    for name, sc in scores.items():
        per_k = {}
        for k in ks:
            flips, drops = [], []
            for j, t in enumerate(tests):
                removed = removal_sets(sc, t, k, n, seed=17)
                keep = np.setdiff1d(np.arange(n), removed)
                for s in seeds:
                    out, pred = fit(s, keep)
                    flips.append(float(pred[j] != base[s][1][j]))
                    drops.append(float(base[s][0][j] - out[j]))
                    if progress is not None:
                        progress(1)
            per_k[str(k)] = {
                "flip_rate": float(np.mean(flips)),
                "margin_drop": float(np.mean(drops)),
            }
        result[name] = per_k
    return {
        "tests": list(map(int, tests)),
        "ks": list(map(int, ks)),
        "seeds": list(seeds),
        "methods": result,
    }


# ------------------------------------------------------------------------ data cleaning


def cleaning_effects(
    setting: Any,
    rankings: dict[str, np.ndarray | None],
    fractions: Sequence[float],
    test_index: np.ndarray,
    seeds: Sequence[int] = (0, 1),
) -> dict:
    """Remove the top ``fraction`` of training examples by each ranking (``(n_train,)``,
    higher = remove first; ``None``: random), retrain with ``seeds`` and report the accuracy
    and mean loss on the test examples ``test_index`` (held out from whatever produced the
    rankings), beside the same seeds on the full training set."""
    data = setting.data()
    n = data.n_train
    x_t, y_t = data.x_test[test_index], data.y_test[test_index]

    def evaluate(seed: int, keep: np.ndarray | None) -> tuple[float, float]:
        with torch_threads(1):
            model = setting.train(seed, subset=keep).model.eval()
            with torch.no_grad():
                out = model(x_t)
            loss = torch.nn.functional.cross_entropy(out, y_t)
        return float((out.argmax(-1) == y_t).double().mean()), float(loss)

    base = [evaluate(s, None) for s in seeds]
    result = {"none": {"0": _mean(base)}}
    for name, rank in rankings.items():
        per = {}
        for f in fractions:
            k = int(round(f * n))
            if rank is None:
                removed = np.random.Generator(np.random.PCG64([17, k])).choice(n, k, replace=False)
            else:
                removed = np.argsort(-np.asarray(rank, np.float64), kind="stable")[:k]
            keep = np.setdiff1d(np.arange(n), removed)
            per[f"{f:g}"] = _mean([evaluate(s, keep) for s in seeds])
        result[name] = per
    return {"fractions": list(fractions), "seeds": list(seeds), "methods": result}


def _mean(runs: list[tuple[float, float]]) -> dict:
    acc, loss = zip(*runs, strict=True)
    return {"accuracy": float(np.mean(acc)), "loss": float(np.mean(loss))}
