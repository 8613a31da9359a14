r"""Ensemble-variance theory, measured: within-model (c_w) vs between-model (c_b) covariance.

Set-up. Fix a test example and look at a member's scores through what LDS sees: the
predicted output of each ground-truth subset ``s``, ``u(s) = sum_{i in s} tau_i`` (``D`` =
number of subsets; raw score vectors, ``D = n_train``, work the same way). A K x M ensemble
has members ``u_km`` (trained model ``k``, cheap member ``m`` of it: a dropout mask, an
adapter, ...). Across the ``D`` coordinates, with members exchangeable within and across
models::

    v   = Var(u_km)                        variance of one member
    c_w = Cov(u_km, u_km'),   m != m'      two members of the same trained model
    c_b = Cov(u_km, u_k'm'),  k != k'      members of different trained models

The ensemble mean ``u = (1 / KM) sum_km u_km`` sums ``KM`` variances, ``KM(M-1)`` ordered
same-model pairs and ``KM * M(K-1)`` ordered cross-model pairs, so::

    Var(u)(K, M) = (v + (M - 1) c_w + M (K - 1) c_b) / (K M)

    M -> inf (K fixed):  (c_w + (K - 1) c_b) / K       K -> inf:  c_b

If every member covaries equally with the ground truth ``y`` (``r = Cov(u_km, y)``), the
ensemble's correlation with the truth is::

    rho(K, M) = r / sqrt(Var(u)(K, M) Var(y)) = rho(1, 1) sqrt(v / Var(u)(K, M))

Reading: ``c_b`` is what all members share (the signal, and any bias common to all
models); ``c_w - c_b`` is specific to one trained model and only more *models* average it
away; ``v - c_w`` is member noise that more *members* average away. Cheap members pay off
as far as ``v - c_w`` is large next to ``c_w - c_b``: M members of one model reach at most
``rho(1, inf) = rho(1, 1) sqrt(v / c_w)``, independent models ``rho(inf) = rho(1,1)
sqrt(v / c_b)``. LDS is a Spearman correlation; the prediction is for the Pearson
correlation of the same quantities, and :func:`measure` reports both for comparison.

Covariances are computed per test example and averaged over test examples (as LDS is);
the predicted correlation is the mean single-member correlation times the gain
``sqrt(v / Var(u))`` of the averaged statistics (see :func:`predict`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from etda.methods import MemberContext, MemberFactors, Method
from etda.methods.base import block_scores


@dataclass
class VarianceStats:
    """Member variance ``v`` and covariances ``c_w`` (same model), ``c_b`` (different models).

    Scalars are means over test examples; ``per_test`` holds the ``(n_test,)`` arrays
    (``v``, ``c_w``, ``c_b`` and, with a target, ``r`` = Cov(member, target) and ``var_y``).
    ``c_w`` is NaN with one member per model, ``c_b`` with one model.
    """

    v: float
    c_w: float
    c_b: float
    K: int
    M: int
    D: int
    r: float | None = None
    var_y: float | None = None
    per_test: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {
            "v": self.v,
            "c_w": self.c_w,
            "c_b": self.c_b,
            "K": self.K,
            "M": self.M,
            "D": self.D,
            "r": self.r,
            "var_y": self.var_y,
        }


def ensemble_variance(
    v: float | np.ndarray,
    c_w: float | np.ndarray,
    c_b: float | np.ndarray,
    K: int | np.ndarray,
    M: int | np.ndarray,
) -> np.ndarray:
    """``(v + (M - 1) c_w + M (K - 1) c_b) / (K M)``, broadcasting over all arguments.

    A covariance that is NaN (not estimable) is fine where its coefficient is 0 (``c_w`` at
    ``M = 1``, ``c_b`` at ``K = 1``).
    """
    K, M = np.asarray(K, np.float64), np.asarray(M, np.float64)
    with np.errstate(invalid="ignore"):
        within = np.where(M == 1, 0.0, (M - 1) * np.asarray(c_w))
        between = np.where(K == 1, 0.0, M * (K - 1) * np.asarray(c_b))
    return (np.asarray(v) + within + between) / (K * M)


class VarianceAccumulator:
    """Streams member score arrays ``(n_test, D)`` in and estimates :class:`VarianceStats`.

    Memory: one running sum ``(n_test, D)`` per trained model, whatever the member count.
    Uses ``sum_{m != m'} <u_m, u_m'> = |sum_m u_m|^2 - sum_m |u_m|^2`` (same for models).
    ``target``: ground truth ``(n_test, D)`` (e.g. retrained outputs per subset) for ``r``.
    """

    def __init__(self, target: np.ndarray | None = None) -> None:
        self.target = None if target is None else _center(np.asarray(target, np.float64))
        self._sum: dict[int, np.ndarray] = {}
        self._sq: dict[int, np.ndarray] = {}
        self._count: dict[int, int] = {}
        self._r: np.ndarray | None = None
        self.shape: tuple[int, int] | None = None

    def add(self, model: int, values: np.ndarray) -> None:
        """Add one member of trained model ``model`` with scores ``(n_test, D)``."""
        u = np.asarray(values, np.float64)
        if u.ndim != 2 or u.shape[1] < 2:
            raise ValueError(f"member scores must be (n_test, D) with D >= 2, got {u.shape}")
        if self.shape is None:
            self.shape = u.shape
            if self.target is not None and self.target.shape != u.shape:
                raise ValueError(f"target {self.target.shape} and scores {u.shape} differ")
        elif u.shape != self.shape:
            raise ValueError(f"member scores {u.shape} differ from the first member's {self.shape}")
        u = _center(u)
        if model not in self._sum:
            self._sum[model] = np.zeros_like(u)
            self._sq[model] = np.zeros(u.shape[0])
            self._count[model] = 0
        self._sum[model] += u
        self._sq[model] += np.einsum("td,td->t", u, u)
        self._count[model] += 1
        if self.target is not None:
            r = np.einsum("td,td->t", u, self.target)
            self._r = r if self._r is None else self._r + r

    def stats(self) -> VarianceStats:
        if self.shape is None:
            raise ValueError("no members were added")
        d = self.shape[1] - 1  # unbiased covariances
        counts = np.array(list(self._count.values()), np.float64)
        n = counts.sum()
        sq_total = sum(self._sq.values())
        sums = list(self._sum.values())
        per_model_sq = [np.einsum("td,td->t", s, s) for s in sums]
        grand = sum(sums)
        same_pairs = float((counts * (counts - 1)).sum())
        cross_pairs = float(n * n - (counts**2).sum())
        v = sq_total / (n * d)
        nan = np.full(self.shape[0], np.nan)
        c_w = (sum(per_model_sq) - sq_total) / (same_pairs * d) if same_pairs else nan
        c_b = (
            (np.einsum("td,td->t", grand, grand) - sum(per_model_sq)) / (cross_pairs * d)
            if cross_pairs
            else nan
        )
        per_test = {"v": v, "c_w": c_w, "c_b": c_b}
        r = var_y = None
        if self.target is not None and self._r is not None:
            per_test["r"] = self._r / (n * d)
            per_test["var_y"] = np.einsum("td,td->t", self.target, self.target) / d
            r, var_y = float(per_test["r"].mean()), float(per_test["var_y"].mean())
        return VarianceStats(
            float(v.mean()),
            float(np.mean(c_w)),
            float(np.mean(c_b)),
            len(self._sum),
            int(round(n / len(self._sum))),
            self.shape[1],
            r,
            var_y,
            per_test,
        )


def _center(u: np.ndarray) -> np.ndarray:
    return u - u.mean(axis=-1, keepdims=True)


def fit_variance(
    member_scores: np.ndarray | VarianceAccumulator, target: np.ndarray | None = None
) -> VarianceStats:
    """Estimate ``v``, ``c_w``, ``c_b`` from ``member_scores (K, M, n_test, D)`` (or finish a
    :class:`VarianceAccumulator`). ``target (n_test, D)``: ground truth, for ``r``."""
    if isinstance(member_scores, VarianceAccumulator):
        return member_scores.stats()
    u = np.asarray(member_scores)
    if u.ndim != 4:
        raise ValueError(f"member_scores must be (K, M, n_test, D), got shape {u.shape}")
    acc = VarianceAccumulator(target)
    for k in range(u.shape[0]):
        for m in range(u.shape[1]):
            acc.add(k, u[k, m])
    return acc.stats()


def predict(stats: VarianceStats, K: int | np.ndarray, M: int | np.ndarray) -> dict:
    """Predicted variance of the K x M ensemble mean and (with a target) its correlation.

    ``variance``: mean over test examples of Var(u)(K, M); ``relative``: that over the mean
    ``v`` (1 for one member); ``correlation`` (None without a target): the mean over test
    examples of one member's correlation ``r / sqrt(v Var(y))``, times the pooled gain
    ``sqrt(v / Var(u)(K, M))``. The gain is pooled over test examples because per-test
    covariances from a few models are noisy (a slightly negative per-test ``c_b`` would
    make a per-test prediction for many models blow up). ``K``/``M`` may be arrays.
    """
    K, M = np.asarray(K, np.float64), np.asarray(M, np.float64)
    var = ensemble_variance(stats.v, stats.c_w, stats.c_b, K, M)
    with np.errstate(invalid="ignore", divide="ignore"):
        gain = np.sqrt(stats.v / var)
    out = {"variance": var, "relative": var / stats.v, "correlation": None}
    pt = stats.per_test
    if "r" in pt:
        with np.errstate(invalid="ignore", divide="ignore"):
            rho1 = float(np.nanmean(pt["r"] / np.sqrt(pt["v"] * pt["var_y"])))
        out["correlation"] = rho1 * gain
    elif stats.r is not None and stats.var_y is not None:
        out["correlation"] = stats.r / np.sqrt(stats.v * stats.var_y) * gain
    return out


def measure(
    member_scores: np.ndarray,
    target: np.ndarray,
    sizes: Sequence[tuple[int, int]],
    draws: int = 16,
    seed: int = 0,
) -> list[dict]:
    """Measured quality of sub-ensembles of ``member_scores (K, M, n_test, D)``.

    For each ``(k, m)`` in ``sizes``: the average over every choice of ``k`` of the ``K``
    models and ``m`` members of each (or over ``draws`` random choices when there are more
    than ``draws``) of ``spearman`` (the LDS when ``D`` indexes the ground-truth subsets and
    ``target`` is their retrained outputs ``(n_test, D)``), ``pearson`` and ``variance`` of
    the sub-ensemble mean (means over test examples).
    """
    from etda.evaluate.lds import spearman_rows

    u = np.asarray(member_scores, np.float64)
    K, M = u.shape[:2]
    target = np.asarray(target, np.float64)
    rng = np.random.Generator(np.random.PCG64(seed))
    out = []
    for k, m in sizes:
        if not (1 <= k <= K and 1 <= m <= M):
            raise ValueError(f"sub-ensemble {k} x {m} does not fit in {K} x {M} members")
        choices = _choices(K, M, k, m, draws, rng)
        sp, pe, va = [], [], []
        for models, members in choices:
            mean = np.mean(
                [u[kk, list(mm)].mean(0) for kk, mm in zip(models, members, strict=True)], 0
            )
            sp.append(np.nanmean(spearman_rows(mean, target)))
            pe.append(np.nanmean(_pearson_rows(mean, target)))
            va.append(float(np.var(mean, axis=1, ddof=1).mean()))
        out.append(
            {
                "K": int(k),
                "M": int(m),
                "spearman": float(np.mean(sp)),
                "pearson": float(np.mean(pe)),
                "variance": float(np.mean(va)),
                "draws": len(choices),
            }
        )
    return out


def _choices(
    K: int, M: int, k: int, m: int, draws: int, rng: np.random.Generator
) -> list[tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]]:
    """Every (models, members per model) choice if there are at most ``draws``, else a
    random sample of ``draws`` of them."""
    n = math.comb(K, k) * math.comb(M, m) ** k
    if n <= draws:
        member_sets = list(itertools.combinations(range(M), m))
        return [
            (models, members)
            for models in itertools.combinations(range(K), k)
            for members in itertools.product(member_sets, repeat=k)
        ]
    return [
        (
            tuple(int(i) for i in rng.choice(K, size=k, replace=False)),
            tuple(tuple(int(j) for j in rng.choice(M, size=m, replace=False)) for _ in range(k)),
        )
        for _ in range(draws)
    ]


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = _center(a), _center(b)
    den = np.sqrt(np.einsum("td,td->t", a, a) * np.einsum("td,td->t", b, b))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.einsum("td,td->t", a, b) / den


def theory_table(
    stats: VarianceStats, measured: Sequence[dict], ks: Sequence[int], ms: Sequence[int]
) -> dict:
    """JSON-ready summary: the fit, predictions on a (K, M) grid and the measured points."""
    grid = [(int(k), int(m)) for k in ks for m in ms]
    pred = predict(stats, np.array([g[0] for g in grid]), np.array([g[1] for g in grid]))
    rows = []
    for i, (k, m) in enumerate(grid):
        row = {
            "K": k,
            "M": m,
            "variance": float(pred["variance"][i]),
            "relative": float(pred["relative"][i]),
        }
        if pred["correlation"] is not None:
            row["correlation"] = float(pred["correlation"][i])
        rows.append(row)
    return {"stats": stats.to_dict(), "predicted": rows, "measured": list(measured)}


# ------------------------------------------------------------- member scores of a run


def member_projections(
    models: object,
    train: object,
    test: object,
    masks: np.ndarray,
    method: str = "trak",
    ensemble: object = None,
    **options: object,
) -> tuple[object, np.ndarray]:
    """Attribute with ``etda.attribute`` and keep every member's subset projections.

    Returns ``(scores, u)``: the combined :class:`etda.Scores` and ``u (K, M, n_test, S)``,
    member ``(k, m)``'s scores summed over each subset of ``masks (S, n_train)`` (the LDS
    predictions). A TRAK member's score is its kernel term times its own Q, so ``u`` are
    the members' own TRAK scores (the combined TRAK averages kernel and Q separately).
    Members must be yielded model by model with the same count per model (Dropout, LoRA,
    ProjectionSeeds); checkpoint methods and forward-only dropout are refused.
    """
    from etda.engine import attribute, split_options

    m_obj, config = split_options(method, dict(options))
    if len(m_obj.expand([({}, 1.0)])) != 1 or "checkpoints" in m_obj.needs:
        raise ValueError(f"member projections of {m_obj.name!r} (checkpoints) are not supported")
    if ensemble is not None and not ensemble.varies_features:  # type: ignore[attr-defined]
        raise ValueError("forward-only dropout members share one featurization: use mode='fixed'")
    n_models = len(models) if isinstance(models, list | tuple) else 1
    total = ensemble.size(n_models) if ensemble is not None else n_models
    rec = _Recorder(m_obj, torch.as_tensor(np.asarray(masks, np.float64)))
    scores = attribute(models, train, test, rec, ensemble, config=config)  # type: ignore[arg-type]
    if len(rec.rows) != total:
        raise RuntimeError(f"recorded {len(rec.rows)} members, expected {total}")
    u = np.stack(rec.rows).reshape(n_models, total // n_models, *rec.rows[0].shape)
    return scores, u


class MethodWrapper(Method):
    """Delegates to a method (its name, target, options and combine rule); a subclass
    overrides :meth:`factors` to look at each member's factors on the way through."""

    def __init__(self, inner: Method) -> None:
        self.inner = inner
        self.name = inner.name  # type: ignore[misc]
        self.target = inner.target  # type: ignore[misc]
        self.combine = inner.combine  # type: ignore[misc]

    def options(self) -> dict:
        return self.inner.options()

    @property
    def streamable(self) -> bool:
        return self.inner.streamable

    def factors(self, train, test, ctx: MemberContext) -> MemberFactors:
        return self.inner.factors(train, test, ctx)


class _Recorder(MethodWrapper):
    """Delegates to a method and records each member's ``scores @ masks.T``."""

    def __init__(self, inner: Method, masks: torch.Tensor) -> None:
        super().__init__(inner)
        self.masks, self.rows = masks, []

    def factors(self, train, test, ctx: MemberContext) -> MemberFactors:
        f = self.inner.factors(train, test, ctx)
        vals = block_scores(f.left, f.space, f.col_scale, train, 0, train.n)
        vals = vals if f.q is None else vals * f.q[None, :]
        self.rows.append((vals.double() @ self.masks.T).numpy())
        return f
