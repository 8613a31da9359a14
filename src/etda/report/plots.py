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


REFERENCE = "trak"  # whose naive line a panel without naive ensembles shows, in grey
DAMPING = " (damping "  # records(): a configuration run at another damping
GREY = "0.6"


def pareto_plot(results: dict, cost: str, path: Path) -> Path:
    """LDS against ``cost`` (log x), one panel per method: :func:`pareto_figure`, saved."""
    fig = pareto_figure(results, cost)
    fig.savefig(path, dpi=fig.dpi)
    return path


def pareto_figure(results: dict, cost: str) -> Figure:
    """One panel per method sharing the LDS axis: the method's naive ensembles as a line
    (labelled K=models; TRAK's naive line in grey where a method has none), the other
    configurations as labelled markers (labels placed without overlap), the method's Pareto
    front dashed and circled; one legend outside the panels."""
    from etda.report.labels import freeze_layout, place_labels

    recs = [r for r in records(results) if r["costs"][cost] > 0]
    methods = list(dict.fromkeys(r["method"] for r in recs))
    if not methods:
        fig = Figure(figsize=(6, 4), layout="constrained", dpi=120)
        fig.subplots().text(0.5, 0.5, f"no configuration with a {COSTS[cost]}", ha="center")
        return fig
    fig, panels, legend_ax = _pareto_grid(len(methods))
    ref = _reference(recs)
    drawn = [
        _pareto_panel(ax, [r for r in recs if r["method"] == m], m, cost, ref)
        for ax, m in zip(panels, methods, strict=True)
    ]
    ncols = fig.axes[0].get_subplotspec().get_gridspec().ncols
    unit = "bytes" if cost == "bytes" else "seconds"
    for i, ax in enumerate(panels):
        if i + ncols >= len(panels):  # the lowest panel of its column
            ax.set_xlabel(f"{COSTS[cost]} ({unit}, log scale)")
        if i % ncols == 0:
            ax.set_ylabel("LDS (mean ± s.e. over test examples)")
    families = list(dict.fromkeys(f for d in drawn for f in d["families"]))
    handles = _pareto_handles(families, ref if any(d["reference"] for d in drawn) else None)
    if legend_ax is not None:
        legend_ax.axis("off")
        legend_ax.legend(handles=handles, loc="center", fontsize=8, frameon=False)
    else:
        fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=8)
    fig.suptitle(f"{results['setting']['name']}: LDS vs {COSTS[cost]}, one panel per method")
    renderer = freeze_layout(fig)
    for ax, d in zip(panels, drawn, strict=True):
        place_labels(ax, d["labels"], d["markers"], d["strokes"], renderer)
    return fig


def _pareto_grid(n: int) -> tuple[Figure, list, object]:
    """``n`` panels in rows of up to 3 (4 from 7 on) sharing y; the legend's axes in the
    last row's free cells (beside a single panel), or ``None`` when the grid is full (the
    legend goes below)."""
    ncols = 2 if n == 1 else n if n <= 3 else -(-n // 2)
    nrows = -(-n // ncols)
    free = nrows * ncols - n
    height = 4.2 * nrows + (0.0 if free else 1.0) + 0.5
    fig = Figure(figsize=(5.2 * ncols, height), layout="constrained", dpi=120)
    gs = fig.add_gridspec(nrows, ncols)
    panels: list = []
    for i in range(n):
        ax = fig.add_subplot(gs[i // ncols, i % ncols], sharey=panels[0] if panels else None)
        if i % ncols:
            ax.tick_params(labelleft=False)
        panels.append(ax)
    legend_ax = fig.add_subplot(gs[nrows - 1, ncols - free :]) if free else None
    return fig, panels, legend_ax


def _reference(recs: list[dict]) -> list[dict]:
    """The naive line a panel without naive ensembles shows: TRAK's, else the first
    method's that has one."""
    for method in [REFERENCE, *dict.fromkeys(r["method"] for r in recs)]:
        naive = naive_curve(recs, method)
        if naive:
            return naive
    return []


def _xy(recs: list[dict], cost: str) -> np.ndarray:
    """``(n, 2)``: cost and LDS of each record."""
    return np.array([[r["costs"][cost], r["lds"]["mean"]] for r in recs]).reshape(-1, 2)


def _errorbar(ax, r: dict, cost: str, **style) -> None:
    """One configuration's marker with its LDS error bar."""
    ax.errorbar(r["costs"][cost], r["lds"]["mean"], yerr=r["lds"]["sem"], capsize=2, **style)


def _pareto_panel(ax, mine: list[dict], method: str, cost: str, ref: list[dict]) -> dict:
    """Draw one method's panel; return what the label placement and the legend need:
    ``labels``, ``markers`` (x, y, radius), ``strokes`` (lines and error bars),
    ``families`` and whether the ``reference`` line stands in for the naive one."""
    color = _color(method)
    naive = naive_curve(mine, method)
    line, tint = (naive, color) if naive else (ref, GREY)
    xy = _xy(mine, cost)
    front = pareto_front(xy[:, 0], xy[:, 1])
    fxy = xy[front][np.argsort(xy[front, 0])]
    if line:
        lxy = _xy(line, cost)
        bars = ax.errorbar(
            *lxy.T, yerr=[r["lds"]["sem"] for r in line], color=tint, marker="o", ms=5, capsize=2
        )
        bars.lines[0].set_gid("naive" if naive else "naive-reference")
    others = [r for r in mine if r not in naive]
    for r in others:
        damped = DAMPING in r["family"]
        kind = r["family"].split(DAMPING)[0]
        style = {"mfc": "white", "mec": color, "mew": 1.2} if damped else {"mec": "k", "mew": 0.4}
        _errorbar(ax, r, cost, color=color, marker=_marker(kind), ms=7, ls="none", **style)
    if len(mine) > 1:
        ax.step(*fxy.T, where="post", color=color, ls="--", lw=1, alpha=0.6, zorder=1)
    ax.scatter(*fxy.T, s=170, facecolors="none", edgecolors=color, lw=1.2, zorder=5)
    ax.margins(x=0.15, y=0.08)
    _log_ticks(ax, cost)
    ax.grid(True, which="both", alpha=0.25)
    n = len(mine)
    ax.set_title(f"{_name(method)} ({n} configuration{'s' if n > 1 else ''})", color=color)
    return {
        **_panel_geometry(line, others, fxy, cost, tint),
        "families": (["naive"] if naive else []) + [_family(r) for r in others],
        "reference": bool(line) and not naive,
    }


def _family(r: dict) -> str:
    """The record's ensemble kind; ``"<kind> (damping "`` for another damping."""
    kind, damped = r["family"].split(DAMPING)[0], DAMPING in r["family"]
    return kind + DAMPING if damped else kind


def _panel_geometry(
    line: list[dict], others: list[dict], fxy: np.ndarray, cost: str, tint: str
) -> dict:
    """A panel's ``labels`` (the naive line's K first, then front points, then the rest),
    ``markers`` (x, y, radius in points; circled front points larger) and ``strokes``
    (the naive line, the front's steps, every error bar)."""
    from etda.report.labels import Label

    circled = {tuple(p) for p in fxy}
    lxy, oxy = _xy(line, cost), _xy(others, cost)
    order = sorted(range(len(others)), key=lambda i: (tuple(oxy[i]) not in circled, -oxy[i, 1]))
    labels = [Label(*p, f"K={r['models']}", tint) for r, p in zip(line, lxy, strict=True)]
    labels += [Label(*oxy[i], others[i]["label"]) for i in order]
    for lab in labels:
        lab.radius = 6.5 if (lab.x, lab.y) in circled else 4.0
    steps = np.column_stack([np.repeat(fxy[:, 0], 2)[1:], np.repeat(fxy[:, 1], 2)[:-1]])
    strokes = [lxy, steps]
    for r in [*line, *others]:
        x, y, e = r["costs"][cost], r["lds"]["mean"], r["lds"]["sem"]
        strokes.append(np.array([[x, y - e], [x, y + e]]))
    markers = [(*p, 6.5) for p in fxy] + [(*p, 4.0) for p in np.vstack([lxy, oxy])]
    return {"labels": labels, "markers": markers, "strokes": strokes}


def _tick(v: float, cost: str) -> str:
    """A cost tick: seconds as ``%g``, bytes with SI multipliers (``200M``)."""
    if cost != "bytes":
        return f"{v:g}"
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= div:
            return f"{v / div:g}{unit}"
    return f"{v:g}"


def _log_ticks(ax, cost: str) -> None:
    """Log cost axis with plain tick labels at 1, 2, 5 x 10^k (only 10^k over more than 2.2
    decades, more under 1.2), unlabelled minor ticks: no crowded scientific notation."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    lo, hi = ax.get_xlim()
    span = np.log10(hi / lo)
    if span > 2.2:
        subs = (1.0,)
    elif span > 1.2:
        subs = (1.0, 2.0, 5.0)
    else:
        subs = (1.0, 2.0, 3.0, 5.0, 7.0) if span > 0.5 else None
    ax.xaxis.set_major_locator(LogLocator(subs=subs or np.arange(1.0, 10.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _tick(v, cost)))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _pareto_handles(families: list[str], ref: list[dict] | None) -> list:
    """Legend entries: the naive line, the reference line, each ensemble kind's marker,
    damping variants, the Pareto front."""
    from matplotlib.lines import Line2D

    ink, point, line = "0.3", {"ls": "none", "ms": 7}, {"marker": "o", "ms": 5, "lw": 1.5}
    entries: list[tuple[str, dict]] = []
    if "naive" in families:
        entries.append(("naive ensemble of the panel's method (K = models)", line))
    if ref:
        who = _name(ref[0]["method"])
        text = f"{who} naive (grey): reference on a panel whose method has no naive ensemble"
        entries.append((text, {**line, "color": GREY}))
    registry = list(ENSEMBLES)
    kinds = [f for f in dict.fromkeys(families) if f != "naive" and DAMPING not in f]
    kinds.sort(key=lambda f: registry.index(f) if f in registry else len(registry))
    entries += [(f, {**point, "marker": _marker(f), "mec": "black", "mew": 0.4}) for f in kinds]
    if any(DAMPING in f for f in families):
        hollow = {**point, "marker": "o", "mfc": "white", "mew": 1.2}
        entries.append(("hollow: another damping (named in the label)", hollow))
    entries.append(("the method's Pareto front", {"ls": "--", "lw": 1}))
    circle = {"ls": "none", "marker": "o", "ms": 13, "mfc": "none", "mew": 1.2}
    entries.append(("circled: on the Pareto front", circle))
    return [Line2D([], [], **{"color": ink, **style}, label=text) for text, style in entries]


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
