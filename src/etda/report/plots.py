"""PNG figures of a benchmark: Pareto plots, mislabel detection curves, variance theory.

Figures are drawn on ``matplotlib.figure.Figure`` objects (no pyplot state, no GUI backend),
so they can be made from any thread or process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from etda.ensemble import ENSEMBLES
from etda.io import require
from etda.methods import METHODS
from etda.report import COSTS, method_title, naive_curve, pareto_front, records

Figure = require("matplotlib.figure", "plots (etda report)").Figure

MARKERS = "osD^PXvhp<>d"  # one per ensemble preset, in registry order


def _color(method: str) -> str:
    """One matplotlib cycle colour per registered method (grey for an unknown one)."""
    return f"C{list(METHODS).index(method) % 10}" if method in METHODS else "C7"


def _marker(family: str) -> str:
    if family.startswith("hybrid"):
        return "*"
    kinds = list(ENSEMBLES)
    kind = "none" if family == "naive" else family
    return MARKERS[kinds.index(kind) % len(MARKERS)] if kind in kinds else "o"


def _name(method: str) -> str:
    return method_title(method)


def pareto_plot(results: dict, cost: str, path: Path) -> Path:
    """LDS against ``cost`` (log x): naive ensembles as connected lines (one per method),
    efficient ensembles as labelled markers, the Pareto front highlighted."""
    recs = [r for r in records(results) if r["costs"][cost] > 0]
    fig = Figure(figsize=(8.5, 5.5), layout="constrained")
    ax = fig.subplots()
    methods = list(dict.fromkeys(r["method"] for r in recs))
    for method in methods:
        naive = [r for r in naive_curve(recs, method)]
        if naive:
            x = [r["costs"][cost] for r in naive]
            sizes = [str(r["models"]) for r in naive]
            y = [r["lds"]["mean"] for r in naive]
            e = [r["lds"]["sem"] for r in naive]
            ax.errorbar(
                x,
                y,
                yerr=e,
                color=_color(method),
                marker="o",
                ms=5,
                lw=1.5,
                capsize=2,
                label=f"{_name(method)} naive, models: {', '.join(sizes)}",
            )
            for r in naive:
                ax.annotate(
                    f"{r['models']}",
                    (r["costs"][cost], r["lds"]["mean"]),
                    textcoords="offset points",
                    xytext=(0, -11),
                    ha="center",
                    fontsize=7,
                    color=_color(method),
                )
    seen: set[tuple[str, str]] = set()
    for r in recs:
        if r["family"] == "naive":
            continue
        tag = (r["method"], r["family"])
        ax.errorbar(
            r["costs"][cost],
            r["lds"]["mean"],
            yerr=r["lds"]["sem"],
            color=_color(r["method"]),
            marker=_marker(r["family"]),
            ms=7,
            ls="none",
            capsize=2,
            mec="black",
            mew=0.4,
            label=None if tag in seen else f"{_name(r['method'])} {r['family']}",
        )
        seen.add(tag)
        ax.annotate(
            r["label"],
            (r["costs"][cost], r["lds"]["mean"]),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=7,
        )
    for method in methods:  # one front per method: methods differ in what they cost
        mine = [r for r in recs if r["method"] == method]
        c = np.array([r["costs"][cost] for r in mine])
        q = np.array([r["lds"]["mean"] for r in mine])
        front = pareto_front(c, q)
        order = np.argsort(c[front])
        fx, fy = c[front][order], q[front][order]
        if len(mine) > 1:
            ax.step(
                fx,
                fy,
                where="post",
                color=_color(method),
                ls="--",
                lw=1,
                alpha=0.5,
                zorder=0,
                label=f"{_name(method)} Pareto front",
            )
        ax.scatter(fx, fy, s=170, facecolors="none", edgecolors=_color(method), lw=1.2, zorder=5)
    ax.set_xscale("log")
    unit = "bytes" if cost == "bytes" else "seconds"
    ax.set_xlabel(f"{COSTS[cost]} ({unit}, log scale)")
    ax.set_ylabel("LDS (mean ± s.e. over test examples)")
    ax.set_title(f"{results['setting']['name']}: LDS vs {COSTS[cost]}")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="best")
    fig.savefig(path, dpi=120)
    return path


def mislabel_plot(results: dict, path: Path) -> Path:
    """Fraction of flipped labels found vs fraction of the training set inspected."""
    reps = list(results.get("mislabel", {}).values())
    fig = Figure(figsize=(7.5, 5.5), layout="constrained")
    ax = fig.subplots()
    for i, rep in enumerate(reps):
        color = f"C{i % 10}"
        si, loss = rep["self_influence"], rep["loss"]
        ax.plot(
            si["curve"]["inspected"],
            si["curve"]["found"],
            color=color,
            lw=1.8,
            label=f"{rep['label']}: self-influence AUC {si['auc']:.3f}",
        )
        ax.plot(
            loss["curve"]["inspected"],
            loss["curve"]["found"],
            color=color,
            lw=1.2,
            ls="--",
            label=f"  training loss AUC {loss['auc']:.3f}",
        )
    if reps:
        rnd = reps[0]["random"]
        ax.plot(
            rnd["curve"]["inspected"],
            rnd["curve"]["found"],
            color="grey",
            lw=1,
            ls=":",
            label=f"random ranking AUC {rnd['auc']:.3f}",
        )
        frac = reps[0]["n_flipped"] / reps[0]["n_train"]
        ax.plot([0, frac, 1], [0, 1, 1], color="black", lw=0.8, alpha=0.4, label="perfect")
    ax.set_xlabel("fraction of training set inspected (highest score first)")
    ax.set_ylabel("fraction of flipped labels found")
    ax.set_xlim(0, 0.5)
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.25)
    ax.set_title(f"{results['setting']['name']}: mislabel detection")
    ax.legend(fontsize=7, loc="lower right")
    fig.savefig(path, dpi=120)
    return path


def variance_plot(results: dict, path: Path) -> Path:
    """Predicted (lines) vs measured (markers) correlation and variance as M and K grow."""
    var = results["variance"]
    pred, meas = var["predicted"], var["measured"]
    fig = Figure(figsize=(11, 4.6), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    ks = sorted({p["K"] for p in pred})
    for i, k in enumerate(ks):
        color = f"C{i % 10}"
        rows = sorted((p for p in pred if p["K"] == k), key=lambda p: p["M"])
        ms = [p["M"] for p in rows]
        if "correlation" in rows[0]:
            ax1.plot(
                ms,
                [p["correlation"] for p in rows],
                color=color,
                lw=1.4,
                label=f"K={k} predicted (Pearson)",
            )
        v = var["stats"]["v"]  # both curves: mean-over-tests variance / mean v
        ax2.plot(
            ms, [p["variance"] / v for p in rows], color=color, lw=1.4, label=f"K={k} predicted"
        )
        mrows = sorted((m for m in meas if m["K"] == k), key=lambda m: m["M"])
        if mrows:
            mm = [m["M"] for m in mrows]
            ax1.plot(
                mm,
                [m["pearson"] for m in mrows],
                "o",
                color=color,
                ms=5,
                label=f"K={k} measured Pearson",
            )
            ax1.plot(
                mm,
                [m["spearman"] for m in mrows],
                "o",
                color=color,
                ms=7,
                mfc="none",
                label=f"K={k} measured LDS (Spearman)",
            )
            ax2.plot(
                mm,
                [m["variance"] / v for m in mrows],
                "o",
                color=color,
                ms=5,
                label=f"K={k} measured",
            )
    # Naive ensembles of the same method measured by the sweep: K models, M = 1.
    naive = [r for r in naive_curve(records(results), var.get("method", "trak"))]
    if naive:
        ax1.plot(
            [1] * len(naive),
            [r["lds"]["mean"] for r in naive],
            "*",
            color="black",
            ms=9,
            label="naive K (sweep, LDS): " + ", ".join(str(r["models"]) for r in naive),
        )
        for r in naive:
            ax1.annotate(
                f"K={r['models']}",
                (1, r["lds"]["mean"]),
                textcoords="offset points",
                xytext=(6, -3),
                fontsize=7,
            )
    st = var["stats"]
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("members per model M (log scale)")
        ax.grid(True, which="both", alpha=0.25)
    ax1.set_ylabel("correlation with retrained outputs")
    ax1.set_title(
        f"{var['ensemble']} members of K models: v={st['v']:.3g}, c_w={st['c_w']:.3g}, "
        f"c_b={st['c_b']:.3g}",
        fontsize=9,
    )
    ax2.set_ylabel("Var(ensemble mean) / v")
    ax2.set_yscale("log")
    ax2.set_title("(v + (M-1) c_w + M (K-1) c_b) / (K M v)", fontsize=9)
    ax1.legend(fontsize=6, loc="lower right")
    ax2.legend(fontsize=6, loc="upper right")
    fig.suptitle(f"{results['setting']['name']}: ensemble-variance theory, predicted vs measured")
    fig.savefig(path, dpi=120)
    return path


def write_figures(results: dict, folder: Path) -> dict[str, Path]:
    """Every figure the results allow; ``{name: path}``."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    if records(results):
        for cost in COSTS:
            name = f"pareto_{cost.removesuffix('_s')}"
            out[name] = pareto_plot(results, cost, folder / f"{name}.png")
    if results.get("mislabel"):
        out["mislabel"] = mislabel_plot(results, folder / "mislabel.png")
    if results.get("variance"):
        out["variance"] = variance_plot(results, folder / "variance.png")
    return out
