"""Reports from benchmark results: Pareto fronts, equal-LDS ratios, plots and Markdown.

``etda report RESULTS_DIR`` (or :func:`write_report`) turns ``results.json`` into
``report.md`` and PNG figures. The analysis lives here:

* :func:`pareto_front`: configurations no other one beats on both LDS and a cost;
* :func:`naive_cost_at`: the cost of the naive independent ensemble at a given LDS,
  log-linear interpolation between the naive sizes measured (log cost linear in LDS);
* :func:`equal_lds_ratios`: for every efficient configuration, its costs divided by
  the naive ensemble's at the same LDS (with bounds where the LDS is outside the naive
  range).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

COSTS: dict[str, str] = {"train_s": "training time", "serve_s": "serving time", "bytes": "space"}
# Ratios also compare model storage alone (checkpoints and adapters: the paper's "space"),
# apart from the stored features.
RATIO_COSTS: tuple[str, ...] = (*COSTS, "weights_bytes")


def method_title(method: str) -> str:
    """How reports print a registered method (its ``title``, e.g. ``"TRAK"``)."""
    from etda.methods import METHODS

    return METHODS[method].title if method in METHODS else method


def records(results: dict) -> list[dict]:
    """The configuration records with a finite LDS, in sweep order. A record run at a
    damping other than the default is labelled with it and leaves its family (a naive
    ensemble so damped is compared with the default naive curve, not part of it)."""
    out = []
    for r in results.get("configs", {}).values():
        if not _finite(r["lds"]["mean"]):
            continue
        damp = damping_variant(r["key"])
        if damp:
            tag = f" (damping {damp})"
            label = r["label"] if tag in r["label"] else r["label"] + tag
            r = {**r, "label": label, "family": r["family"] + tag}
        out.append(r)
    return out


def damping_variant(key: str) -> str | None:
    """The damping a configuration key names (``.../damptrace:0.1`` -> ``trace:0.1``)."""
    part = next((p for p in key.split("/") if p.startswith("damp")), None)
    return part.removeprefix("damp") if part else None


def _finite(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def pareto_front(costs: Sequence[float], quality: Sequence[float]) -> np.ndarray:
    """Bool mask of the points no other point dominates (lower or equal cost and higher or
    equal quality, one of them strictly)."""
    c, q = np.asarray(costs, np.float64), np.asarray(quality, np.float64)
    if c.shape != q.shape or c.ndim != 1:
        raise ValueError(f"costs {c.shape} and quality {q.shape} must be equal 1-D")
    better_eq = (c[None, :] <= c[:, None]) & (q[None, :] >= q[:, None])
    strictly = (c[None, :] < c[:, None]) | (q[None, :] > q[:, None])
    return ~(better_eq & strictly).any(axis=1)


def naive_curve(recs: Sequence[dict], method: str) -> list[dict]:
    """The naive independent ensembles of ``method``, sorted by model count."""
    return sorted(
        (r for r in recs if r["method"] == method and r["family"] == "naive"),
        key=lambda r: r["models"],
    )


def naive_cost_at(
    target: float, naive_lds: Sequence[float], naive_cost: Sequence[float]
) -> tuple[float, str]:
    """The naive ensemble's cost at LDS ``target``: ``(cost, status)``.

    ``naive_lds``/``naive_cost``: the naive sizes in increasing model count. ``status``:
    ``"interpolated"`` (log-linear between the first two consecutive sizes whose LDS
    bracket ``target``; exact at a measured size), ``"below"`` (``target`` under every naive
    LDS: the cost returned is the smallest ensemble's, an upper bound of the equal-LDS cost)
    or ``"above"`` (over every naive LDS: the best naive's cost, a lower bound).
    """
    ls, cs = np.asarray(naive_lds, np.float64), np.asarray(naive_cost, np.float64)
    if ls.size == 0 or ls.shape != cs.shape:
        raise ValueError("need at least one naive ensemble with an LDS and a cost")
    if np.any(cs <= 0):
        raise ValueError("naive costs must be positive for log interpolation")
    for i in range(ls.size):
        if ls[i] == target:
            return float(cs[i]), "interpolated"
    for i in range(ls.size - 1):
        lo, hi = ls[i], ls[i + 1]
        if lo != hi and min(lo, hi) <= target <= max(lo, hi):
            t = (target - lo) / (hi - lo)
            return float(np.exp(np.log(cs[i]) + t * (np.log(cs[i + 1]) - np.log(cs[i])))), (
                "interpolated"
            )
    if target < ls.min():
        return float(cs[0]), "below"
    return float(cs[int(np.argmax(ls))]), "above"


def equal_lds_ratios(results: dict, costs: Sequence[str] = RATIO_COSTS) -> list[dict]:
    """Each efficient configuration's costs over the naive ensemble's at equal LDS.

    Per record: ``ratios[cost]`` (efficient / naive), ``naive[cost]`` (the interpolated naive
    cost), ``naive_models`` (the naive ensemble size of equal LDS, interpolated the same
    way), ``status`` (see :func:`naive_cost_at`; ``"below"`` makes every ratio a lower bound
    ``>=``, ``"above"`` an upper bound ``<=``).
    """
    recs = records(results)
    out = []
    for r in recs:
        if r["family"] == "naive":
            continue
        naive = naive_curve(recs, r["method"])
        if not naive:
            continue
        lds_n = [n["lds"]["mean"] for n in naive]
        target = r["lds"]["mean"]
        row = {
            "key": r["key"],
            "label": r["label"],
            "method": r["method"],
            "lds": target,
            "ratios": {},
            "naive": {},
            "naive_sizes": [n["models"] for n in naive],
        }
        k_eq, status = naive_cost_at(target, lds_n, [n["models"] for n in naive])
        row["naive_models"], row["status"] = k_eq, status
        for cost in costs:
            naive_c = [n["costs"].get(cost, 0) for n in naive]
            if min(naive_c) <= 0 or cost not in r["costs"]:
                continue
            c_eq, _ = naive_cost_at(target, lds_n, naive_c)
            row["naive"][cost] = c_eq
            row["ratios"][cost] = r["costs"][cost] / c_eq
        out.append(row)
    return out


def write_report(results_dir: str | os.PathLike) -> list[Path]:
    """Write ``report.md`` and the PNG figures next to ``results.json``; the paths written."""
    from etda.bench.results import load_results
    from etda.report import markdown, plots

    folder = Path(results_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder with a results.json")
    results = load_results(folder)
    figures = plots.write_figures(results, folder)
    text = markdown.render(results, {name: p.name for name, p in figures.items()})
    report = folder / "report.md"
    report.write_text(text)
    return [report, *figures.values()]


__all__ = [
    "COSTS",
    "damping_variant",
    "RATIO_COSTS",
    "equal_lds_ratios",
    "naive_cost_at",
    "naive_curve",
    "pareto_front",
    "records",
    "write_report",
]
