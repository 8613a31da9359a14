"""The budget planner behind ``etda plan``: which ensemble to run within a time/space budget.

It reads the saved benchmark results of a setting (``etda bench``: ``results.json``) and
lists *candidates*, each an ensemble configuration (kind, K trained models, M members per
model, projection dimension) with an expected LDS and expected costs:

* **measured** candidates are the benchmarked configurations of the method; their LDS
  (mean ± s.e.) and costs (train, serve, bytes) are copied exactly from ``results.json``;
* **predicted** candidates are sizes that were not benchmarked, extrapolated per *family*
  (same kind and options; naive, a dropout kind, LoRA, checkpoints, ``hybrid-<kind>``):

  - LDS along the family's size axis ``n`` (naive: K; one-model kinds: M; hybrids: K at a
    measured M and M at a measured K) is fitted as ``LDS(n) = a - b / n`` by least squares
    on the family's measured sizes, with ``b >= 0`` (never worse with more members; a flat
    line where the data falls), capped at the family's best measured LDS + ``CLIP_MARGIN``
    and only predicted from half the smallest to ``MAX_EXTRAPOLATION`` x the largest
    measured size (checkpoints: at most one per epoch). A family (axis) with a single
    measured size is not extrapolated. The ± of a predicted LDS is the s.e. of the nearest
    measured size, not the error of the fit;
  - costs are linear in the family's measured rows (non-negative least squares): train =
    per-model training x K (+ per-adapter fine-tuning x K x M for LoRA), serve and bytes =
    a fixed part + a per-member cost x K x M; where a family has a single member count the
    naive ensemble's per-member costs stand in.

The recommendation is the candidate with the highest expected LDS among those within every
budget (``None``: unconstrained); ties go to the cheaper training, then serving, then bytes.
:meth:`Plan.explain` says why, which figures are measured and which predicted (from what),
and how the choice compares with the best naive ensemble within the budgets.

Bytes use the units of :mod:`etda.io` (``human_bytes``/``parse_size``): KB = 1024 B,
MB = 1024**2 B, ...
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from etda.ensemble import ENSEMBLES
from etda.io import fmt_seconds, human_bytes, parse_seconds, parse_size  # noqa: F401

CLIP_MARGIN = 0.01  # a predicted LDS never exceeds its family's best measured LDS by more
MAX_EXTRAPOLATION = 2.0  # predicted sizes reach at most this factor x the largest measured
M_GRID = (2, 3, 4, 5, 6, 8, 10, 12, 15, 16, 20, 25, 30, 32, 40, 50, 64, 75, 80, 100, 128, 150)
BUDGETS = ("train", "serve", "space")

# ------------------------------------------------------------------------- data types


@dataclass(frozen=True)
class Budgets:
    """Upper limits on training seconds, serving seconds and bytes (``None``: no limit)."""

    train_s: float | None = None
    serve_s: float | None = None
    bytes: float | None = None

    def __post_init__(self) -> None:
        for name, value in zip(BUDGETS, self.limits(), strict=True):
            if value is not None and (not math.isfinite(value) or value <= 0):
                raise ValueError(f"the {name} budget must be a positive number, got {value}")

    def limits(self) -> tuple[float | None, float | None, float | None]:
        return self.train_s, self.serve_s, self.bytes

    def broken(self, c: Candidate) -> tuple[str, ...]:
        """Names of the budgets (``train``, ``serve``, ``space``) that ``c`` exceeds."""
        return tuple(
            name
            for name, cost, limit in zip(BUDGETS, c.costs(), self.limits(), strict=True)
            if limit is not None and cost > limit
        )

    def describe(self) -> str:
        parts = [
            f"{name} ≤ {_fmt(name, limit)}"
            for name, limit in zip(BUDGETS, self.limits(), strict=True)
            if limit is not None
        ]
        return ", ".join(parts) if parts else "no budgets (unconstrained)"


@dataclass(frozen=True)
class Candidate:
    """One ensemble configuration with its expected LDS and costs.

    ``models`` = K trained models, ``members`` = M members per model (naive: 1);
    ``measured``: figures copied from a benchmark run (else predicted by the fits);
    ``basis``: where the figures come from, in words.
    """

    key: str
    label: str
    method: str
    ensemble: str
    family: str
    models: int
    members: int
    proj_dim: int | None
    projection: str | None
    lds: float
    sem: float
    train_s: float
    serve_s: float
    bytes: float
    measured: bool
    basis: str

    @property
    def kind(self) -> str:
        return "measured" if self.measured else "predicted"

    @property
    def features(self) -> str:
        """The kernel form: ``exact`` (no projection) or the projection and its dimension."""
        if self.proj_dim is None:
            return "exact" if self.projection in (None, "none") else str(self.projection)
        return f"{self.proj_dim}" + (f" {self.projection}" if self.projection else "")

    def costs(self) -> tuple[float, float, float]:
        return self.train_s, self.serve_s, self.bytes

    def headline(self) -> str:
        """``dropout 10 (K=1, M=10, exact kernel): measured LDS 0.4117 ± 0.0090``."""
        form = "exact kernel" if self.features == "exact" else f"proj_dim {self.features}"
        return (
            f"{self.label} (K={self.models}, M={self.members}, {form}): {self.kind} LDS "
            f"{self.lds:.4f} ± {self.sem:.4f}"
        )

    def against(self, budgets: Budgets) -> str:
        """``train 3.18 s ≤ 60 s ✓, serve 40.2 s > 30 s ✗, space 27.9 MB (no budget)``."""
        out = []
        for name, cost, limit in zip(BUDGETS, self.costs(), budgets.limits(), strict=True):
            text = f"{name} {_fmt(name, cost)}"
            if limit is None:
                text += " (no budget)"
            elif cost <= limit:
                text += f" ≤ {_fmt(name, limit)} ✓"
            else:
                text += f" > {_fmt(name, limit)} ✗"
            out.append(text)
        return ", ".join(out)


@dataclass(frozen=True)
class Rejection:
    """A candidate outside the budgets and the budgets it breaks."""

    candidate: Candidate
    broken: tuple[str, ...]


@dataclass(frozen=True)
class LDSFit:
    """``LDS(n) = a - b / n`` along one size axis of a family, capped at ``cap``.

    ``axis``: ``"K"`` or ``"M"``; ``fixed``: the other dimension's value; ``sizes``: the
    measured sizes it was fitted on; predictions only for ``lo <= n <= hi``.
    """

    family: str
    variant: str
    axis: str
    fixed: int
    sizes: tuple[int, ...]
    a: float
    b: float
    cap: float
    lo: int
    hi: int

    def predict(self, n: float) -> float:
        return min(self.a - self.b / n, self.cap)

    def describe(self) -> str:
        other = "M" if self.axis == "K" else "K"
        at = f" at {other}={self.fixed}" if self.family.startswith("hybrid") else ""
        sizes = ", ".join(map(str, self.sizes))
        shape = (
            f"LDS = {self.a:.4f} - {self.b:.4f}/{self.axis}"
            if self.b > 0
            else f"LDS flat at {self.a:.4f} (no gain with {self.axis} in the data)"
        )
        return (
            f"{self.family}{at}: {shape}, least squares on measured {self.axis} = {sizes}, "
            f"capped at {self.cap:.4f}, predicted for {self.axis} = {self.lo}..{self.hi}"
        )


@dataclass(frozen=True)
class CostFit:
    """Linear costs of a family: train = ``t_model`` K + ``t_member`` K M; serve and bytes =
    fixed + per-member x K M. ``points``: measured rows it was fitted on; ``borrowed``: the
    per-member costs come from the naive ensemble (a single member count in the family)."""

    family: str
    t_model: float
    t_member: float
    serve0: float
    serve1: float
    bytes0: float
    bytes1: float
    points: int
    borrowed: bool = False

    def predict(self, k: int, m: int) -> tuple[float, float, float]:
        n = k * m
        return (
            self.t_model * k + self.t_member * n,
            self.serve0 + self.serve1 * n,
            self.bytes0 + self.bytes1 * n,
        )

    def describe(self) -> str:
        train = f"train {fmt_seconds(self.t_model)}/model"
        if self.t_member:
            train += f" + {fmt_seconds(self.t_member)}/adapter"
        src = "naive per-member costs" if self.borrowed else "non-negative least squares"
        return (
            f"{self.family} costs: {train}; serve {fmt_seconds(self.serve0)} + "
            f"{fmt_seconds(self.serve1)}/member; space {human_bytes(self.bytes0)} + "
            f"{human_bytes(self.bytes1)}/member ({src}, {self.points} measured row(s))"
        )


@dataclass
class Plan:
    """What ``etda plan`` recommends and why.

    ``feasible``: candidates within every budget, best first (``feasible[0]`` is the
    recommendation); ``rejected``: the others, best LDS first, with the budgets they break;
    ``naive``: the best naive ensemble within the budgets (None if none fits); ``fits`` /
    ``cost_fits``: the extrapolations behind the predicted candidates; ``single``: families
    with one measured size (not extrapolated).
    """

    setting: str
    method: str
    budgets: Budgets
    recommendation: Candidate
    feasible: list[Candidate]
    rejected: list[Rejection]
    naive: Candidate | None
    fits: list[LDSFit]
    cost_fits: list[CostFit]
    single: list[str]
    sources: list[Path]
    notes: list[str] = field(default_factory=list)

    @property
    def candidates(self) -> list[Candidate]:
        return self.feasible + [r.candidate for r in self.rejected]

    def pareto(self) -> list[Candidate]:
        """The feasible candidates (best first) that no other feasible one dominates, i.e.
        matches or beats on LDS and every cost and strictly on one of them."""
        return [c for c in self.feasible if not any(_dominates(o, c) for o in self.feasible)]

    def explain(self) -> str:
        """The recommendation, why, how it compares with the naive ensemble, and where
        every figure comes from."""
        rec, b = self.recommendation, self.budgets
        every = self.candidates
        n_meas = sum(c.measured for c in every)
        lines = [
            f"Recommendation for {self.setting} / {self.method} within {b.describe()}:",
            f"  {rec.headline()}",
            f"  {rec.against(b)}",
            f"  figures: {rec.basis}",
            (
                f"Why: the highest expected LDS of the {len(self.feasible)} candidate(s) within "
                f"the budgets (of {len(every)}: {n_meas} measured, {len(every) - n_meas} "
                "predicted); ties go to the cheaper training."
            ),
        ]
        if len(self.feasible) > 1:
            nxt = self.feasible[1]
            lines.append(f"  runner-up: {nxt.headline()} ({nxt.against(b)})")
        lines.append(self._naive_line())
        better = [r for r in self.rejected if r.candidate.lds > rec.lds][:3]
        if better:
            lines.append("Better LDS, but over budget:")
            lines += [f"  {r.candidate.headline()}: {r.candidate.against(b)}" for r in better]
        lines.append("Where the figures come from:")
        srcs = ", ".join(str(p) for p in self.sources)
        lines.append(f"  measured: LDS and costs copied exactly from {srcs}.")
        lines.append(
            "  predicted: per-family fits on the measured rows of that family (LDS(n) = a - b/n, "
            f"b >= 0, capped at the family's best measured LDS + {CLIP_MARGIN}, sizes from half "
            f"the smallest to {MAX_EXTRAPOLATION:g}x the largest measured; costs linear in K "
            "and K x M); a predicted ± is the s.e. of the nearest measured size, not the fit's "
            "error."
        )
        lines += [f"  - {f.describe()}" for f in self.fits]
        lines += [f"  - {f.describe()}" for f in self.cost_fits]
        if self.single:
            lines.append(
                "  not extrapolated (one measured size): " + ", ".join(sorted(self.single))
            )
        lines += [f"Note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _naive_line(self) -> str:
        rec, nv = self.recommendation, self.naive
        if nv is None:
            return "Naive ensemble: none fits the budgets."
        if nv.key == rec.key:
            return "Naive ensemble: the recommendation is itself the best naive one in budget."
        ratios = ", ".join(
            f"{name} {_ratio(x, y)}"
            for name, x, y in zip(BUDGETS, rec.costs(), nv.costs(), strict=True)
        )
        return (
            f"Versus the best naive ensemble within the budgets, {nv.label} ({nv.kind} LDS "
            f"{nv.lds:.4f} ± {nv.sem:.4f}): {rec.lds - nv.lds:+.4f} LDS at {ratios} its cost."
        )


def _dominates(a: Candidate, b: Candidate) -> bool:
    mine, theirs = (a.lds, *(-x for x in a.costs())), (b.lds, *(-x for x in b.costs()))
    return all(x >= y for x, y in zip(mine, theirs, strict=True)) and mine != theirs


def _ratio(x: float, y: float) -> str:
    return f"{x / y:.2f}x" if y > 0 else "n/a"


def _fmt(name: str, value: float) -> str:
    return human_bytes(value) if name == "space" else fmt_seconds(value)


# ---------------------------------------------------------------------------- results


def results_roots() -> list[Path]:
    """Where benchmark results are looked for, in order: ``$ETDA_RESULTS`` when set (only
    there), else ``benchmarks/results`` of the working directory and of the source tree etda
    was installed from (an editable install or a checkout), so ``etda plan`` works from any
    folder."""
    env = os.environ.get("ETDA_RESULTS")
    if env:
        return [Path(env)]
    here = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    return list(dict.fromkeys([Path("benchmarks/results"), here]))


def default_results(setting: str, root: str | os.PathLike | None = None) -> list[Path]:
    """The full and quick results of ``setting`` that exist (full first), under ``root`` or
    the first of :func:`results_roots` that has any."""
    for base in [Path(root)] if root is not None else results_roots():
        paths = [base / setting / "results.json", base / f"{setting}-quick" / "results.json"]
        found = [p for p in paths if p.is_file()]
        if found:
            return found
    return []


def load_records(
    setting: str, results: Sequence[str | os.PathLike] | None = None
) -> tuple[list[dict], list[Path], dict]:
    """The config records of ``results`` (files or folders; default
    :func:`default_results`), merged by key: the first file listed wins a collision.

    Returns (records, the files read, the first file's ``setting`` block).
    """
    from etda.bench.results import load_results

    if results is None:
        paths = default_results(setting)
        if not paths:
            raise FileNotFoundError(
                f"no benchmark results for setting {setting!r} (looked for "
                f"{setting}/results.json and {setting}-quick/results.json under "
                f"{', '.join(str(r) for r in results_roots())}); run "
                f"`etda bench --setting {setting} --quick` to produce them"
            )
    else:
        paths = [Path(p) for p in results]
        if not paths:
            raise ValueError("no results files given")
    merged: dict[str, dict] = {}
    files, meta = [], {}
    for path in paths:
        data = load_results(path)
        files.append(path / "results.json" if path.is_dir() else path)
        block = data.get("setting", {})
        name = block.get("name")
        if name is not None and name != setting:
            raise ValueError(f"{path} holds results of setting {name!r}, not {setting!r}")
        meta = meta or block
        for key, rec in data.get("configs", {}).items():
            merged.setdefault(key, {**rec, "key": rec.get("key", key), "_source": str(files[-1])})
    return list(merged.values()), files, meta


# ------------------------------------------------------------------------- candidates


def _variant(rec: dict) -> str:
    """The record's key without its K and M parts: one family's options."""
    parts = rec["key"].split("/")
    return "/".join(parts[:2] + ["*", "*"] + parts[4:])


def _key_for(rec: dict, k: int, m: int) -> str:
    parts = rec["key"].split("/")
    return "/".join(parts[:2] + [f"k{k}", f"m{m}"] + parts[4:])


def _measured(rec: dict) -> Candidate:
    c = rec["costs"]
    return Candidate(
        key=rec["key"],
        label=rec["label"],
        method=rec["method"],
        ensemble=rec["ensemble"],
        family=rec["family"],
        models=int(rec["models"]),
        members=int(rec["m"]),
        proj_dim=rec.get("proj_dim"),
        projection=rec.get("projection"),
        lds=float(rec["lds"]["mean"]),
        sem=float(rec["lds"]["sem"]),
        train_s=float(c["train_s"]),
        serve_s=float(c["serve_s"]),
        bytes=float(c["bytes"]),
        measured=True,
        basis=f"measured ({rec['key']} in {rec.get('_source', 'results.json')})",
    )


def _nnls(cols: list[np.ndarray], y: np.ndarray) -> np.ndarray:
    from scipy.optimize import nnls

    coef, _ = nnls(np.stack(cols, axis=1), y)
    return coef


def _fit_line(n: np.ndarray, y: np.ndarray, slope: float | None) -> tuple[float, float, bool]:
    """``y = fixed + per * n`` (both >= 0); with one distinct ``n``, the given ``slope``
    (or proportional costs without one) and the mean remainder as the fixed part."""
    if len(set(n.tolist())) >= 2:
        fixed, per = _nnls([np.ones_like(n), n], y)
        return float(fixed), float(per), False
    if slope is None:
        return 0.0, float(np.mean(y / n)), False
    return float(max(np.mean(y - slope * n), 0.0)), slope, True


def _cost_fit(family: str, rows: list[dict], naive: CostFit | None) -> CostFit:
    k = np.array([r["models"] for r in rows], np.float64)
    n = k * np.array([r["m"] for r in rows], np.float64)
    train = np.array([r["costs"]["train_s"] for r in rows], np.float64)
    kind = rows[0]["ensemble"]
    adapters = kind in ENSEMBLES and ENSEMBLES[kind].cls.trains_members
    if not adapters:
        t_model, t_member = float(np.sum(k * train) / np.sum(k * k)), 0.0
    elif all("model_train_s" in r for r in rows):
        # the runner records the models' own training: the rest is the adapters'
        base = np.array([r["model_train_s"] for r in rows], np.float64)
        t_model = float(np.sum(k * base) / np.sum(k * k))
        t_member = float(max(np.sum(n * (train - base)) / np.sum(n * n), 0.0))
    elif len(set(n.tolist())) >= 2:
        t_model, t_member = (float(v) for v in _nnls([k, n], train))
    else:
        t_model = naive.t_model if naive else float(np.mean(train / k))
        t_member = float(max(np.mean((train - t_model * k) / n), 0.0))
    serve = np.array([r["costs"]["serve_s"] for r in rows], np.float64)
    size = np.array([r["costs"]["bytes"] for r in rows], np.float64)
    s0, s1, b1 = _fit_line(n, serve, naive.serve1 if naive else None)
    z0, z1, b2 = _fit_line(n, size, naive.bytes1 if naive else None)
    return CostFit(family, t_model, t_member, s0, s1, z0, z1, len(rows), b1 or b2)


def _lds_fit(family: str, variant: str, axis: str, fixed: int, pts: list[dict]) -> LDSFit:
    size = "models" if axis == "K" else "m"
    n = np.array([r[size] for r in pts], np.float64)
    y = np.array([r["lds"]["mean"] for r in pts], np.float64)
    design = np.stack([np.ones_like(n), -1.0 / n], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
    if b < 0:  # the data does not gain with size: predict its mean, flat
        a, b = float(np.mean(y)), 0.0
    sizes = tuple(sorted({int(v) for v in n}))
    return LDSFit(
        family=family,
        variant=variant,
        axis=axis,
        fixed=fixed,
        sizes=sizes,
        a=float(a),
        b=float(b),
        cap=float(np.max(y)) + CLIP_MARGIN,
        lo=max(1, math.ceil(sizes[0] / 2)),
        hi=int(math.floor(sizes[-1] * MAX_EXTRAPOLATION)),
    )


def _grid(fit: LDSFit, max_m: int | None) -> list[int]:
    grid = range(fit.lo, fit.hi + 1) if fit.axis == "K" else M_GRID
    out = [n for n in grid if fit.lo <= n <= fit.hi]
    if fit.axis == "M" and max_m is not None:
        out = [n for n in out if n <= max_m]
    return out


def build_candidates(
    records: list[dict], method: str, epochs: int | None = None
) -> tuple[list[Candidate], list[LDSFit], list[CostFit], list[str]]:
    """Measured and predicted candidates of ``method`` from benchmark ``records``.

    ``epochs``: the recipe's epochs (checkpoint ensembles take at most one per epoch).
    Returns (candidates, the LDS fits, the cost fits, families not extrapolated).
    """
    from etda.bench.sweeps import BenchConfig

    rows = [
        r
        for r in records
        if r.get("method") == method and math.isfinite(float(r.get("lds", {}).get("mean", "nan")))
    ]
    measured = {r["key"]: _measured(r) for r in rows}
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["family"], _variant(r)), []).append(r)

    naive_rows = [r for (fam, _), rs in groups.items() if fam == "naive" for r in rs]
    naive_cost = _cost_fit("naive", naive_rows, None) if naive_rows else None

    fits: list[LDSFit] = []
    cost_fits: list[CostFit] = []
    single: list[str] = []
    predicted: dict[str, Candidate] = {}
    for (family, variant), rs in sorted(groups.items()):
        axes = []  # (axis, fixed value, points along it)
        if family == "naive":
            axes.append(("K", 1, rs))
        elif family.startswith("hybrid-"):
            for m in sorted({r["m"] for r in rs}):
                axes.append(("K", m, [r for r in rs if r["m"] == m]))
            for k in sorted({r["models"] for r in rs}):
                axes.append(("M", k, [r for r in rs if r["models"] == k]))
        else:
            axes.append(("M", 1, rs))
        family_fits = []
        for axis, fixed, pts in axes:
            size = "models" if axis == "K" else "m"
            if len({r[size] for r in pts}) >= 2:
                family_fits.append((_lds_fit(family, variant, axis, fixed, pts), pts))
        if not family_fits:
            sizes = sorted({(r["models"], r["m"]) for r in rs})
            single.append(f"{family} ({', '.join(f'K={k} M={m}' for k, m in sizes)})")
            continue
        cost = naive_cost if family == "naive" and naive_cost else _cost_fit(family, rs, naive_cost)
        cost_fits.append(cost)
        ref = rs[0]
        kind = ENSEMBLES.get(ref["ensemble"])
        max_m = epochs if kind is not None and kind.cls.members_are_checkpoints else None
        for fit, pts in family_fits:
            fits.append(fit)
            for size in _grid(fit, max_m):
                k, m = (size, fit.fixed) if fit.axis == "K" else (fit.fixed, size)
                if ref["ensemble"] == "none":
                    m = 1
                key = _key_for(ref, k, m)
                if key in measured:
                    continue
                axis_of = "models" if fit.axis == "K" else "m"
                near = min(pts, key=lambda r: abs(math.log(r[axis_of] / size)))
                cfg = BenchConfig(
                    method, ref["ensemble"], k, None if ref["ensemble"] == "none" else m
                )
                train, serve, nbytes = cost.predict(k, m)
                cand = Candidate(
                    key=key,
                    label=cfg.label,
                    method=method,
                    ensemble=ref["ensemble"],
                    family=cfg.family,
                    models=k,
                    members=m,
                    proj_dim=ref.get("proj_dim"),
                    projection=ref.get("projection"),
                    lds=fit.predict(size),
                    sem=float(near["lds"]["sem"]),
                    train_s=train,
                    serve_s=serve,
                    bytes=nbytes,
                    measured=False,
                    basis=f"predicted (LDS: {fit.describe()}; {cost.describe()})",
                )
                old = predicted.get(key)
                if old is None or cand.lds < old.lds:  # two axes disagree: the lower one
                    predicted[key] = cand
    return list(measured.values()) + list(predicted.values()), fits, cost_fits, single


# ------------------------------------------------------------------------------- plan


def _overrun(c: Candidate, budgets: Budgets) -> float:
    """The largest cost / budget ratio of ``c`` (how far it is from fitting)."""
    return max(
        cost / limit
        for cost, limit in zip(c.costs(), budgets.limits(), strict=True)
        if limit is not None
    )


def _rank(c: Candidate) -> tuple:
    return (-c.lds, c.train_s, c.serve_s, c.bytes, not c.measured, c.key)


def plan(
    setting: str,
    *,
    budget_train: float | None = None,
    budget_serve: float | None = None,
    budget_bytes: float | None = None,
    method: str = "trak",
    results: Sequence[str | os.PathLike] | None = None,
) -> Plan:
    """Recommend the ensemble of ``method`` with the best expected LDS within the budgets
    (seconds of training and serving, bytes; ``None``: unconstrained).

    ``results``: results.json files or folders (default: ``benchmarks/results/<setting>``
    and ``<setting>-quick`` where present; the first listed wins a key collision).
    Raises FileNotFoundError without results, ValueError when nothing fits.
    """
    budgets = Budgets(budget_train, budget_serve, budget_bytes)
    records, files, meta = load_records(setting, results)
    epochs = meta.get("recipe", {}).get("epochs")
    cands, fits, cost_fits, single = build_candidates(records, method, epochs)
    if not cands:
        methods = sorted({r.get("method", "?") for r in records})
        raise ValueError(
            f"no {method} configurations with an LDS in {', '.join(map(str, files))} (it has "
            f"{', '.join(methods) or 'none'}); run `etda bench --setting {setting} --quick "
            f"--methods {method}` to measure some"
        )
    feasible, rejected = [], []
    for c in cands:
        broken = budgets.broken(c)
        if broken:
            rejected.append(Rejection(c, broken))
        else:
            feasible.append(c)
    if not feasible:
        cheap = min(cands, key=lambda c: _overrun(c, budgets))
        raise ValueError(
            f"no {method} ensemble fits the budgets ({budgets.describe()}); the cheapest "
            f"candidate is {cheap.headline()}: {cheap.against(budgets)}"
        )
    feasible.sort(key=_rank)
    rejected.sort(key=lambda r: _rank(r.candidate))
    naive = next((c for c in feasible if c.family == "naive"), None)
    notes = []
    prints = {r.get("fingerprint") for r in records if r.get("method") == method}
    if len(prints - {None}) > 1:
        notes.append(
            f"the records come from {len(prints - {None})} different setting fingerprints "
            "(setting or recipe changed between runs): LDS values may not be comparable"
        )
    return Plan(
        setting=setting,
        method=method,
        budgets=budgets,
        recommendation=feasible[0],
        feasible=feasible,
        rejected=rejected,
        naive=naive,
        fits=fits,
        cost_fits=cost_fits,
        single=single,
        sources=files,
        notes=notes,
    )
