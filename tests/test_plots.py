"""The Pareto plots, read back from their matplotlib artists on a crowded synthetic sweep:
one panel per method, labels that overlap nothing, the legend outside the data, a naive
line on every panel."""

from __future__ import annotations

import itertools

import pytest

from etda.bench.sweeps import BenchConfig
from etda.methods import METHODS
from etda.report import plots

pytest.importorskip("matplotlib")

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from tests.test_report import _rec, synthetic_results  # noqa: E402


def _crowded(methods: tuple[str, ...]) -> dict:
    """Many configurations per method, most of them at one cost with LDS a hair apart
    (as dropout members of one model are); Grad-Cos has no naive ensemble."""
    configs = []
    for m in methods:
        naive = [] if m == "gradcos" else [1, 2, 4, 8] if m == "trak" else [1, 4]
        configs += [(BenchConfig(m, "none", k), 0.1 + 0.03 * k**0.5, 1.0 * k) for k in naive]
        if m == "tracin":
            continue
        kinds = [("dropout", 5), ("dropout", 10), ("dropout", 20), ("dropout-forward", 10)]
        kinds += [("dropout-forward", 20), ("dropout-per-example", 10), ("lora", 4)]
        kinds += [("lora", 8), ("lora", 16), ("checkpoints", 5), ("projection-seeds", 5)]
        for i, (kind, n) in enumerate(kinds if m == "trak" else kinds[::3]):
            cost = 1.0 if kind.startswith(("dropout", "projection")) else 1.5 + i / 4
            configs.append((BenchConfig(m, kind, 1, n), 0.15 + 0.002 * i, cost))
    results = synthetic_results()
    results.pop("variance"), results.pop("mislabel")
    recs = [_rec(c, q, t, t, int(t * 1e6)) for c, q, t in configs]
    results["configs"] = {r["key"]: r for r in recs}
    return results


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _drawn(monkeypatch, results: dict, cost: str, path) -> object:
    """The figure ``pareto_plot`` saves, drawn again on an Agg canvas."""
    figs = []
    save = plots.Figure.savefig

    def capture(fig, *args, **kwargs):
        figs.append(fig)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(plots.Figure, "savefig", capture)
    plots.pareto_plot(results, cost, path)
    (fig,) = figs
    FigureCanvasAgg(fig).draw()
    return fig


@pytest.mark.parametrize(
    ("methods", "cost"),
    [
        (("trak", "graddot", "gradcos", "if", "tracin"), "train_s"),  # legend in a free cell
        (("trak", "graddot", "gradcos", "if"), "bytes"),  # a full grid: legend below
    ],
)
def test_pareto_panels_labels_and_legend_do_not_collide(monkeypatch, tmp_path, methods, cost):
    fig = _drawn(monkeypatch, _crowded(methods), cost, tmp_path / "p.png")
    renderer = fig.canvas.get_renderer()
    panels = [ax for ax in fig.axes if ax.axison]
    assert len(panels) == len(methods)  # one panel per method
    for ax, m in zip(panels, methods, strict=True):
        assert ax.get_title().startswith(METHODS[m].title), ax.get_title()
        assert ax.get_xscale() == "log"
        gids = {line.get_gid() for line in ax.lines}
        assert gids & {"naive", "naive-reference"}, f"{m}: no naive line"
        assert ("naive-reference" in gids) == (m == "gradcos")
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    assert len(legends) == 1
    legend = legends[0].get_window_extent(renderer)
    assert any("reference" in t.get_text() for t in legends[0].get_texts())
    areas = [ax.get_window_extent(renderer) for ax in panels]
    assert not any(_overlap(legend, a) for a in areas)  # outside every data area
    boxes = [
        (t.get_text(), Text.get_window_extent(t, renderer), area)
        for ax, area in zip(panels, areas, strict=True)
        for t in ax.texts
    ]
    assert len(boxes) >= 20
    for text, box, area in boxes:
        assert not _overlap(box, legend), text
        assert area.x0 <= box.x0 and box.x1 <= area.x1, text
        assert area.y0 <= box.y0 and box.y1 <= area.y1, text
    clashes = [(a[0], b[0]) for a, b in itertools.combinations(boxes, 2) if _overlap(a[1], b[1])]
    assert not clashes
    for ax in panels:  # the cost axes' tick labels do not run into each other either
        ticks = [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()]
        assert not any(_overlap(a, b) for a, b in itertools.combinations(ticks, 2))


def test_coincident_points_share_a_label() -> None:
    from etda.report.labels import _join

    assert _join(["dropout 20", "LoRA 4", "dropout 10"]) == "dropout 10/20, LoRA 4"
    assert _join(["checkpoints 5"]) == "checkpoints 5"
