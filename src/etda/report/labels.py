"""Deterministic label placement for the report's scatter plots (no extra dependency).

Every label is measured with the renderer and tried at candidate spots: right and left of
its point (shifted up or down by half lines), above and below it, on rings further out, and
as a last resort anywhere on a grid over the axes. A spot set apart from its point gets a
thin leader line. The spot chosen has its text box inside the axes and over no earlier
label, no marker and no earlier leader (its own leader crossing no label) where such a spot
exists, else the fewest such clashes; among those the nearest wins, each plotted line or
error bar the box would cover counting ``CROSS`` points further. Points of one colour whose
markers coincide share one label. Labels are placed in the order given, so the result is
deterministic. Call :func:`place_labels` once the figure's layout is final
(:func:`freeze_layout`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GAPS = (1.5, 8.0, 16.0, 26.0, 40.0, 58.0, 80.0, 110.0)  # points from the marker's edge
LEADER_FROM = 6.0  # gaps from here on get a leader line to their point (nearer: when shifted)
SPREAD = 4  # beside a point, labels may shift up to this many lines (and the gap) up or down
CROSS = 20.0  # points of distance a spot pays for each line or error bar under its box
PAD = 1.5  # pixels kept free around every box
FONTSIZE = 7


@dataclass
class Label:
    """A text for the data point ``(x, y)`` whose marker has radius ``radius`` points."""

    x: float
    y: float
    text: str
    color: str = "black"
    radius: float = 4.0


def freeze_layout(fig) -> object:
    """Run the figure's layout once, keep it (and every axis limit) fixed from then on, and
    return the Agg renderer that measures text in the saved image's pixels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    fig.set_layout_engine("none")
    for ax in fig.axes:
        ax.set_xlim(ax.get_xlim())
        ax.set_ylim(ax.get_ylim())
    return canvas.get_renderer()


def _marker_boxes(ax, markers: list[tuple[float, float, float]]) -> np.ndarray:
    """Display boxes ``(x0, y0, x1, y1)`` of markers ``(x, y, radius in points)``."""
    px = ax.figure.dpi / 72
    out = []
    for x, y, r in markers:
        cx, cy = ax.transData.transform((x, y))
        out.append((cx - r * px, cy - r * px, cx + r * px, cy + r * px))
    return np.asarray(out, np.float64).reshape(-1, 4)


def _samples(ax, line: np.ndarray, step: float = 3.0) -> np.ndarray:
    """Display points every ``step`` pixels along a polyline given in data coordinates."""
    d = ax.transData.transform(np.asarray(line, np.float64).reshape(-1, 2))
    out = [d[:1]]
    for a, b in zip(d[:-1], d[1:], strict=True):
        n = max(2, int(np.hypot(*(b - a)) / step) + 1)
        out.append(a + np.linspace(0, 1, n)[:, None] * (b - a))
    return np.concatenate(out)


def _overlaps(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """``(n,)``: how many of ``others`` (m, 4) each of ``boxes`` (n, 4) overlaps (with PAD)."""
    if not len(others):
        return np.zeros(len(boxes), int)
    b, o = boxes[:, None, :], others[None, :, :]
    hit = (b[..., 0] < o[..., 2] + PAD) & (o[..., 0] < b[..., 2] + PAD)
    hit &= (b[..., 1] < o[..., 3] + PAD) & (o[..., 1] < b[..., 3] + PAD)
    return hit.sum(axis=1)


def _covers(boxes: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """``(n, p)`` bool: whether each of ``boxes`` (n, 4) covers each point (p, 2)."""
    x, y = pts[None, :, 0], pts[None, :, 1]
    b = boxes[:, None, :]
    return (
        (x > b[..., 0] - PAD)
        & (x < b[..., 2] + PAD)
        & (y > b[..., 1] - PAD)
        & (y < b[..., 3] + PAD)
    )


def _rings(anchor: np.ndarray, size: np.ndarray, radius_px: float, px: float) -> tuple:
    """Spots on rings ``gap`` points out from the marker: right and left of the point at
    vertical steps of half a line, then above and below it. ``(offsets (n, 2), leader?
    (n,), rank (n,))``; the rank grows with the distance, the right side first."""
    w, h = size
    offs, lead, rank = [], [], []
    for gap in GAPS:
        d = radius_px + gap * px
        steps = int((d + SPREAD * h) / (h / 2))
        shifts = sorted((k * h / 2 for k in range(-steps, steps + 1)), key=abs)
        spots = [(ux * (w / 2 + d), dy) for ux in (1, -1) for dy in shifts]
        spots += [(dx, uy * (h / 2 + d)) for uy in (1, -1) for dx in (0, w / 2, -w / 2)]
        for i, (dx, dy) in enumerate(spots):
            offs.append((dx, dy))
            lead.append(gap >= LEADER_FROM or (abs(dx) > w / 2 and abs(dy) > h / 2))
            rank.append(gap + abs(dy) / px / 4 + (dx < 0) * 2 + 1e-3 * i)
    return np.array(offs), np.array(lead), np.array(rank)


def _grid(anchor: np.ndarray, size: np.ndarray, area, px: float) -> tuple:
    """The last resort: spots on a grid over the whole axes, ranked by distance."""
    w, h = size
    xs = np.arange(area[0] + w / 2, area[2] - w / 2, max(w / 3, 6.0))
    ys = np.arange(area[1] + h / 2, area[3] - h / 2, h / 2)
    offs = np.stack(np.meshgrid(xs, ys, indexing="ij"), axis=-1).reshape(-1, 2) - anchor
    return offs, np.ones(len(offs), bool), GAPS[-1] + np.hypot(*offs.T) / px


def _attach(anchor: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """Where a leader meets its text: the middle of the box's side that faces the point,
    in pixels and as matplotlib's ``relpos`` (fractions of the text box)."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    if box[0] >= anchor[0]:
        return np.array([box[0], cy]), (0.0, 0.5)
    if box[2] <= anchor[0]:
        return np.array([box[2], cy]), (1.0, 0.5)
    if box[1] >= anchor[1]:
        return np.array([cx, box[1]]), (0.5, 0.0)
    return np.array([cx, box[3]]), (0.5, 1.0)


def _leader(anchor: np.ndarray, box: np.ndarray, n: int = 16) -> np.ndarray:
    """Points along the leader from ``anchor`` to its text, away from the text's box
    (where neighbouring labels may come close)."""
    pts = anchor + np.linspace(0, 1, n)[:, None] * (_attach(anchor, box)[0] - anchor)
    x, y, m = pts[:, 0], pts[:, 1], 2 * PAD + 1
    return pts[~((x >= box[0] - m) & (x <= box[2] + m) & (y >= box[1] - m) & (y <= box[3] + m))]


def _score(anchor, size, spots: tuple, area, taken: dict, strokes: list) -> tuple:
    """``(clash, cost, boxes)`` of every spot: ``clash`` counts a text or marker covered
    10, an earlier leader covered or a label crossed by the spot's leader 1 (spots outside
    the axes: infinite); ``cost`` is the rank plus ``CROSS`` per line or error bar covered."""
    offs, lead, rank = spots
    c = anchor + offs
    boxes = np.concatenate([c - size / 2, c + size / 2], axis=1)
    out = (boxes[:, 0] < area[0]) | (boxes[:, 1] < area[1])
    out |= (boxes[:, 2] > area[2]) | (boxes[:, 3] > area[3])
    clash = 10 * (_overlaps(boxes, taken["labels"]) + _overlaps(boxes, taken["markers"]))
    if len(taken["leaders"]):
        clash += _covers(boxes, taken["leaders"]).any(axis=1)
    for i in np.flatnonzero(lead & ~out):
        if len(taken["labels"]):
            clash[i] += _covers(taken["labels"], _leader(anchor, boxes[i])).any(axis=1).sum()
    clash = np.where(out, np.inf, clash)
    cost = rank + CROSS * sum(_covers(boxes, s).any(axis=1) for s in strokes)
    return clash, cost, boxes


def _choose(anchor, size, radius_px: float, px: float, area, taken: dict, strokes: list):
    """``(box, leader?)`` of the best spot on the rings if one is clear of everything, else
    of the best clear spot on a grid over the axes, else the spot with the least clash
    (the cheapest among equals)."""
    best = None
    for spots in (_rings(anchor, size, radius_px, px), _grid(anchor, size, area, px)):
        clash, cost, boxes = _score(anchor, size, spots, area, taken, strokes)
        if not len(clash):
            continue
        i = int(np.lexsort((cost, clash))[0])
        if best is None or clash[i] < best[0]:
            best = (clash[i], boxes[i], bool(spots[1][i]))
        if best[0] == 0:
            break
    if best is None or not np.isfinite(best[0]):  # no spot inside the axes
        c = anchor + np.array([radius_px + size[0] / 2, 0.0])
        return np.concatenate([c - size / 2, c + size / 2]), False
    return best[1], best[2]


def _join(texts: list[str]) -> str:
    """``["dropout 20", "LoRA 4", "dropout 10"]`` -> ``"dropout 10/20, LoRA 4"``: texts that
    differ only in their last word (a number: sorted) share the rest, in order of first
    appearance."""
    heads: dict[str, list[str]] = {}
    for t in texts:
        head, _, tail = t.rpartition(" ")
        heads.setdefault(head, []).append(tail)
    parts = []
    for head, tails in heads.items():
        tails.sort(key=lambda t: (0, int(t), "") if t.isdigit() else (1, 0, t))
        parts.append(f"{head} {'/'.join(tails)}" if head else ", ".join(tails))
    return ", ".join(parts)


def merge_coincident(ax, labels: list[Label]) -> list[Label]:
    """One label for the points of one colour drawn within a marker radius of each other
    (their markers hide each other): the texts joined by :func:`_join`, at the first
    point, in the order given."""
    px = ax.figure.dpi / 72
    at = ax.transData.transform(np.array([(lab.x, lab.y) for lab in labels]).reshape(-1, 2))
    groups: list[list[int]] = []
    for i, lab in enumerate(labels):
        for g in groups:
            first = labels[g[0]]
            near = np.abs(at[g] - at[i]).max(axis=1) <= lab.radius * px
            if first.color == lab.color and near.any():
                g.append(i)
                break
        else:
            groups.append([i])
    out = []
    for g in groups:
        first = labels[g[0]]
        text = _join([labels[i].text for i in g])
        out.append(Label(first.x, first.y, text, first.color, max(labels[i].radius for i in g)))
    return out


def place_labels(
    ax,
    labels: list[Label],
    markers: list[tuple[float, float, float]],
    strokes: list[np.ndarray],
    renderer,
) -> None:
    """Annotate ``ax`` with ``labels``, in order (coincident ones merged). ``markers``:
    ``(x, y, radius in points)`` no label may cover; ``strokes``: polylines in data
    coordinates (lines, error bars) labels should keep clear of."""
    px = ax.figure.dpi / 72
    ext = ax.get_window_extent(renderer)
    area = (ext.x0 + PAD, ext.y0 + PAD, ext.x1 - PAD, ext.y1 - PAD)
    taken = {
        "labels": np.zeros((0, 4)),
        "markers": _marker_boxes(ax, markers),
        "leaders": np.zeros((0, 2)),
    }
    soft = [_samples(ax, s) for s in strokes]
    for lab in merge_coincident(ax, labels):
        probe = ax.text(lab.x, lab.y, lab.text, fontsize=FONTSIZE, ha="center", va="center")
        tb = probe.get_window_extent(renderer)
        probe.remove()
        size = np.array([tb.width, tb.height])
        anchor = ax.transData.transform((lab.x, lab.y))
        box, leader = _choose(anchor, size, lab.radius * px, px, area, taken, soft)
        off = (box[:2] + box[2:]) / 2 - anchor
        _annotate(ax, lab, off / px, _attach(anchor, box)[1] if leader else None)
        taken["labels"] = np.vstack([taken["labels"], box])
        if leader:
            taken["leaders"] = np.vstack([taken["leaders"], _leader(anchor, box)])


def _annotate(ax, lab: Label, offset: np.ndarray, relpos: tuple[float, float] | None) -> None:
    """The label's text ``offset`` points from its point (centred), with a leader line from
    ``relpos`` of the text box unless that is ``None``."""
    arrow = None
    if relpos is not None:
        arrow = {
            "relpos": relpos,
            "arrowstyle": "-",
            "lw": 0.5,
            "color": lab.color,
            "alpha": 0.7,
            "shrinkA": 0,
            "shrinkB": lab.radius + 0.5,
        }
    ax.annotate(
        lab.text,
        (lab.x, lab.y),
        textcoords="offset points",
        xytext=(float(offset[0]), float(offset[1])),
        ha="center",
        va="center",
        fontsize=FONTSIZE,
        color=lab.color,
        arrowprops=arrow,
        zorder=6,
    )
