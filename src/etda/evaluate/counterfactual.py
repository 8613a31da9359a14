"""Counterfactual removal (brittleness) and data cleaning: what retraining without the
examples a ranking picks does to the predictions.

Counterfactual removal: for each sampled test example, remove its top-k proponents by a
method's scores, retrain with several seeds, and measure how often the predicted class flips
and how much the test margin drops, against the same seeds trained on everything. Honest
baselines: ``k`` random examples, and the ``k`` nearest training examples in input space
(Ilyas et al. 2022, "datamodels"; Hammoudeh & Lowd 2022).

Data cleaning: remove the top fraction of the training set by a ranking (e.g. the summed
harm to a validation set), retrain, and report accuracy and loss on held-out test examples.

Both retrain through :func:`etda.evaluate.retrain.retrain_many`: on any executor (in
process, local processes, Ray), cached and resumable, with their training costs recorded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from etda.evaluate.retrain import describe_run, retrain_many
from etda.parallel import Executor

RANDOM = "random"
NEIGHBOURS = "nearest neighbours"
RANDOM_SEED = 17  # the random removals' seed (recorded with the results)


def removal_sets(
    scores: np.ndarray | None, test: int, k: int, n_train: int, seed: int
) -> np.ndarray:
    """Indices to remove for test example ``test``: its ``k`` strongest proponents by
    ``scores`` (n_test, n_train), or ``k`` random training examples when ``scores`` is None."""
    if scores is None:
        rng = np.random.Generator(np.random.PCG64([seed, test, k]))
        return rng.choice(n_train, size=k, replace=False)
    return np.argsort(-np.asarray(scores[test], np.float64), kind="stable")[:k]


def neighbour_scores(x_train: Any, x_test: Any, chunk: int = 256) -> np.ndarray:
    """The input-space baseline: minus the squared Euclidean distance between flattened
    inputs, ``(n_test, n_train)`` float64 (the nearest training examples score highest)."""
    if isinstance(x_train, dict) or isinstance(x_test, dict):
        raise ValueError("the nearest-neighbour baseline needs tensor inputs, not dicts")
    a = torch.as_tensor(x_test).reshape(len(x_test), -1).double()
    b = torch.as_tensor(x_train).reshape(len(x_train), -1).double()
    rows = [-torch.cdist(a[lo : lo + chunk], b).square() for lo in range(0, len(a), chunk)]
    return torch.cat(rows).numpy()


def _keep(n: int, removed: np.ndarray) -> np.ndarray:
    keep = np.ones(n, dtype=bool)
    keep[removed] = False
    return keep


def removal_effects(
    setting: Any,
    scores: dict[str, np.ndarray | None],
    tests: Sequence[int],
    ks: Sequence[int],
    seeds: Sequence[int] = (0, 1),
    cache_dir: str | os.PathLike | None = None,
    executor: str | Executor = "inprocess",
    workers: int | None = None,
    address: str | None = None,
    progress: bool = False,
) -> dict:
    """For each ranking in ``scores`` (name -> (n_test, n_train) scores, positive = helps;
    ``None``: random removal) and each removal size ``k``: the fraction of (test example,
    seed) pairs whose predicted class flips (NaN for tasks without classes) and the mean drop
    of the attributed output, against the same seeds trained on everything.

    Returns JSON-ready ``{"tests", "ks", "seeds", "random_seed", "methods": {name: {str(k):
    {"flip_rate", "margin_drop"}}}, "costs"}``.
    """
    n = setting.data().n_train
    tests = [int(t) for t in tests]
    full = np.ones(n, dtype=bool)
    jobs = [(full, int(s)) for s in seeds]
    plan = []  # (name, k, j, seed)
    for name, sc in scores.items():
        if sc is not None and np.shape(sc)[1] != n:
            raise ValueError(f"scores {name!r} have shape {np.shape(sc)}, expected (n_test, {n})")
        for k in ks:
            if not 0 <= k < n:
                raise ValueError(f"k must lie in [0, {n}), got {k}")
            for j, t in enumerate(tests):
                keep = _keep(n, removal_sets(sc, t, int(k), n, seed=RANDOM_SEED))
                for s in seeds:
                    jobs.append((keep, int(s)))
                    plan.append((name, int(k), j, int(s)))
    run = retrain_many(
        setting,
        jobs,
        cache_dir,
        executor,
        workers,
        address,
        progress,
        desc="counterfactual retraining",
    )
    base = {int(s): r for s, r in zip(seeds, run.results, strict=False)}
    has_classes = bool((base[int(seeds[0])].pred >= 0).all())
    cells: dict[tuple[str, int], tuple[list, list]] = {}
    for (name, k, j, s), r in zip(plan, run.results[len(seeds) :], strict=True):
        flips, drops = cells.setdefault((name, k), ([], []))
        t = tests[j]
        flips.append(float(r.pred[t] != base[s].pred[t]) if has_classes else np.nan)
        drops.append(float(base[s].output[t] - r.output[t]))
    methods: dict[str, dict] = {}
    for (name, k), (flips, drops) in cells.items():
        methods.setdefault(name, {})[str(k)] = {
            "flip_rate": float(np.mean(flips)),
            "margin_drop": float(np.mean(drops)),
        }
    return {
        "tests": tests,
        "ks": [int(k) for k in ks],
        "seeds": [int(s) for s in seeds],
        "random_seed": RANDOM_SEED,
        "methods": methods,
        "costs": describe_run(run),
    }


# ------------------------------------------------------------------------ data cleaning


def cleaning_effects(
    setting: Any,
    rankings: dict[str, np.ndarray | None],
    fractions: Sequence[float],
    test_index: np.ndarray,
    seeds: Sequence[int] = (0, 1),
    cache_dir: str | os.PathLike | None = None,
    executor: str | Executor = "inprocess",
    workers: int | None = None,
    address: str | None = None,
    progress: bool = False,
) -> dict:
    """Remove the top ``fraction`` of training examples by each ranking (``(n_train,)``,
    higher = remove first; ``None``: random), retrain with ``seeds`` and report the accuracy
    (NaN for tasks without classes) and mean loss on the test examples ``test_index`` (held
    out from whatever produced the rankings), beside the same seeds on the full training set.
    """
    data = setting.data()
    n = data.n_train
    test_index = np.asarray(test_index)
    y = data.y_test[torch.as_tensor(test_index)].numpy()
    full = np.ones(n, dtype=bool)
    jobs = [(full, int(s)) for s in seeds]
    plan = []
    for name, rank in rankings.items():
        if rank is not None and np.shape(rank) != (n,):
            raise ValueError(f"ranking {name!r} has shape {np.shape(rank)}, expected ({n},)")
        for f in fractions:
            k = int(round(f * n))
            if rank is None:
                rng = np.random.Generator(np.random.PCG64([RANDOM_SEED, k]))
                removed = rng.choice(n, k, replace=False)
            else:
                removed = np.argsort(-np.asarray(rank, np.float64), kind="stable")[:k]
            jobs += [(_keep(n, removed), int(s)) for s in seeds]
            plan += [(name, f"{f:g}")] * len(seeds)
    run = retrain_many(
        setting, jobs, cache_dir, executor, workers, address, progress, desc="cleaning retraining"
    )

    def summary(results: list) -> dict:
        acc = [
            float((r.pred[test_index] == y).mean()) if (r.pred >= 0).all() else np.nan
            for r in results
        ]
        loss = [float(r.loss[test_index].mean()) for r in results]
        return {"accuracy": float(np.mean(acc)), "loss": float(np.mean(loss))}

    groups: dict[tuple[str, str], list] = {}
    for key, r in zip(plan, run.results[len(seeds) :], strict=True):
        groups.setdefault(key, []).append(r)
    result: dict[str, dict] = {"none": {"0": summary(run.results[: len(seeds)])}}
    for (name, f), rs in groups.items():
        result.setdefault(name, {})[f] = summary(rs)
    return {
        "fractions": list(fractions),
        "seeds": [int(s) for s in seeds],
        "random_seed": RANDOM_SEED,
        "methods": result,
        "costs": describe_run(run),
    }


# ------------------------------------------------------------------ the user-facing runs

BASELINES = (RANDOM, "neighbours")


def spread_tests(n_test: int, count: int) -> list[int]:
    """``count`` test indices spread evenly over ``range(n_test)``."""
    count = min(int(count), n_test)
    return sorted({int(i) for i in np.linspace(0, n_test - 1, count).round()})


def counterfactual(
    setting: Any,
    scores: dict[str, np.ndarray],
    tests: int | Sequence[int] = 8,
    percents: Sequence[float] = (0.5, 2.0, 10.0),
    seeds: Sequence[int] = (0, 1),
    baselines: Sequence[str] = BASELINES,
    **retrain_options: Any,
) -> dict:
    """Counterfactual removal of each test example's top ``percents`` % proponents by every
    ranking in ``scores`` (name -> (n_test, n_train)), beside the ``baselines`` (``random``,
    ``neighbours``: nearest in input space). ``tests``: how many test examples (spread over
    the test set) or their indices. ``retrain_options`` go to :func:`removal_effects`
    (``cache_dir``, ``executor``, ``workers``, ``address``, ``progress``)."""
    data = setting.data()
    unknown = set(baselines) - set(BASELINES)
    if unknown:
        raise ValueError(f"unknown baseline(s) {sorted(unknown)}; use {', '.join(BASELINES)}")
    idx = spread_tests(data.n_test, tests) if isinstance(tests, int) else list(tests)
    rankings: dict[str, np.ndarray | None] = dict(scores)
    if RANDOM in baselines:
        rankings[RANDOM] = None
    if "neighbours" in baselines:
        rankings[NEIGHBOURS] = neighbour_scores(data.x_train, data.x_test)
    ks = sorted({max(1, int(round(p / 100 * data.n_train))) for p in percents})
    out = removal_effects(setting, rankings, idx, ks, seeds, **retrain_options)
    out["percents"] = [100 * k / data.n_train for k in ks]
    return out


def harm_ranking(scores: np.ndarray, validation: np.ndarray) -> np.ndarray:
    """Training examples ranked for removal by their summed harm to the ``validation`` test
    examples: minus the column sums of ``scores[validation]``, ``(n_train,)``."""
    return -np.asarray(scores, np.float64)[np.asarray(validation)].sum(0)


def validation_split(n_test: int) -> tuple[np.ndarray, np.ndarray]:
    """The cleaning split of a test set: even indices rank (validation), odd ones judge."""
    return np.arange(0, n_test, 2), np.arange(1, n_test, 2)
