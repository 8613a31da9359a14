"""The budget planner behind ``etda plan``: which ensemble to run within a time/space budget.

It reads the saved benchmark results of a setting (``etda bench``: ``results.json``) and
lists *candidates*, each an ensemble configuration (kind, K trained models, M members per
model, projection dimension) with an expected LDS and expected costs:

* **measured** candidates are the benchmarked configurations of the method; their LDS
  (mean ± s.e.) and costs (train, serve, bytes) are copied exactly from ``results.json``;
* **predicted** candidates are sizes that were not benchmarked, from the ensemble-variance
  theory (:mod:`etda.evaluate.variance`) fitted per *family* (one kind and its options:
  naive, a dropout kind, LoRA, checkpoints, ..., a kind's hybrids K x M included):

  - ``LDS(K, M) = rho1 sqrt(K M / (1 + (M-1) a_w + M (K-1) a_b))`` with the dimensionless
    ``a_w = c_w / v`` (two members of one trained model) and ``a_b = c_b / v`` (members of
    different models): the naive rows (M = 1) fit ``rho1`` and ``a_b`` by least squares, a
    kind's rows its member's ``rho1`` and ``a_w`` given that ``a_b``, with
    ``0 <= a_b <= a_w <= 1`` (:func:`fit_theory`); two parameters need two measured
    configurations, so a family with one is not fitted (and not extrapolated). Predicted
    for K up to ``MAX_EXTRAPOLATION`` x the largest measured naive K and M (on ``M_GRID``)
    up to that x the kind's largest measured M (checkpoints: at most one per epoch). Every
    measured configuration is also compared with the theory's leave-one-out prediction
    (the fit without it; :attr:`Plan.comparison`), in units of its measured s.e.;
  - where the theory cannot be fitted (no naive fit with the family's options, so ``a_b``
    is unknown), the former fit: ``LDS(n) = a - b / n`` along the family's size axis ``n``
    (naive: K; one-model kinds: M; hybrids: K at a measured M and M at a measured K) by
    least squares, ``b >= 0``, capped at the family's best measured LDS + ``CLIP_MARGIN``,
    from half the smallest to ``MAX_EXTRAPOLATION`` x the largest measured size;
  - the ± of a predicted LDS is the s.e. of the nearest measured configuration, not the
    error of the fit;
  - costs are linear in the family's measured rows (non-negative least squares): train =
    per-model training x K (+ per-adapter fine-tuning x K x M for LoRA), serve and bytes =
    a fixed part (per trained model for the theory's K x M) + a per-member cost x K x M;
    where a family has a single member count the naive ensemble's per-member costs stand in.

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
from etda.evaluate.variance import ensemble_variance
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
    per-member costs come from the naive ensemble (a single member count in the family);
    ``per_model``: the fixed parts are per trained model (x K; used for the theory's K x M
    predictions of a kind, whose one-model costs repeat for every model)."""

    family: str
    t_model: float
    t_member: float
    serve0: float
    serve1: float
    bytes0: float
    bytes1: float
    points: int
    borrowed: bool = False
    per_model: bool = False

    def predict(self, k: int, m: int) -> tuple[float, float, float]:
        n, times = k * m, k if self.per_model else 1
        return (
            self.t_model * k + self.t_member * n,
            self.serve0 * times + self.serve1 * n,
            self.bytes0 * times + self.bytes1 * n,
        )

    def describe(self) -> str:
        train = f"train {fmt_seconds(self.t_model)}/model"
        if self.t_member:
            train += f" + {fmt_seconds(self.t_member)}/adapter"
        src = "naive per-member costs" if self.borrowed else "non-negative least squares"
        per = "/model" if self.per_model else ""
        return (
            f"{self.family} costs: {train}; serve {fmt_seconds(self.serve0)}{per} + "
            f"{fmt_seconds(self.serve1)}/member; space {human_bytes(self.bytes0)}{per} + "
            f"{human_bytes(self.bytes1)}/member ({src}, {self.points} measured row(s))"
        )


@dataclass
class Plan:
    """What ``etda plan`` recommends and why.

    ``feasible``: candidates within every budget, best first (``feasible[0]`` is the
    recommendation); ``rejected``: the others, best LDS first, with the budgets they break;
    ``naive``: the best naive ensemble within the budgets (None if none fits); ``theory``:
    the variance-theory fits behind the predicted candidates, ``unfitted``: why the other
    families have none (by variant), ``comparison``: every measured configuration next to
    the theory's leave-one-out prediction; ``fits``: the ``a - b/n`` fallbacks where the
    theory is not fitted; ``cost_fits``: the cost lines; ``single``: families with one
    measured size (not extrapolated).
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
    theory: list[TheoryFit] = field(default_factory=list)
    unfitted: dict[str, str] = field(default_factory=dict)
    comparison: list[Comparison] = field(default_factory=list)

    @property
    def candidates(self) -> list[Candidate]:
        return self.feasible + [r.candidate for r in self.rejected]

    def pareto(self) -> list[Candidate]:
        """The feasible candidates (best first) that no other feasible one dominates, i.e.
        matches or beats on LDS and every cost and strictly on one of them."""
        front: list[Candidate] = []  # best LDS, then cheapest, first: a dominator comes first
        for c in sorted(self.feasible, key=lambda c: (-c.lds, *c.costs())):
            if not any(_dominates(o, c) for o in front):
                front.append(c)
        keep = {id(c) for c in front}
        return [c for c in self.feasible if id(c) in keep]

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
        lines += self._sources()
        lines += [f"Note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _sources(self) -> list[str]:
        """Where the figures come from: the files, the theory fits, the fallbacks, costs."""
        srcs = ", ".join(str(p) for p in self.sources)
        lines = [
            "Where the figures come from:",
            f"  measured: LDS and costs copied exactly from {srcs}.",
            f"  predicted: the variance theory, {THEORY_FORMULA} with a_w = c_w/v and a_b = "
            "c_b/v, fitted per family by least squares (naive rows fit rho1 and a_b, each "
            "kind's K x M rows its member's rho1 and a_w given that a_b; 0 <= a_b <= a_w <= 1);"
            f" K up to {MAX_EXTRAPOLATION:g}x the largest measured naive K, M up to "
            f"{MAX_EXTRAPOLATION:g}x the kind's largest measured M (checkpoints: one per "
            "epoch); costs linear in K and K x M; a predicted ± is the s.e. of the nearest "
            "measured configuration, not the fit's error.",
        ]
        lines += [f"  - {f.describe()}" for f in self.theory]
        if self.comparison:
            lines.append(f"  theory vs measured: {comparison_summary(self.comparison)}.")
        if self.unfitted:
            lines.append("  theory not fitted:")
            lines += [f"  - {v}: {why}" for v, why in sorted(self.unfitted.items())]
        if self.fits:
            lines.append(
                "  fallback where the theory is not fitted: LDS(n) = a - b/n along one size "
                f"axis, b >= 0, capped at the family's best measured LDS + {CLIP_MARGIN}, "
                f"sizes from half the smallest to {MAX_EXTRAPOLATION:g}x the largest measured:"
            )
            lines += [f"  - {f.describe()}" for f in self.fits]
        if self.cost_fits:
            lines.append("  costs (linear in K and K x M):")
            lines += [f"  - {f.describe()}" for f in self.cost_fits]
        if self.single:
            lines.append(
                "  not extrapolated (one measured size): " + ", ".join(sorted(self.single))
            )
        return lines

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


def load_variance(files: Sequence[str | os.PathLike]) -> list[dict]:
    """The variance runs (``results.json``'s ``variance`` entry) of ``files`` that have one."""
    from etda.bench.results import load_results

    out = []
    for path in files:
        entry = load_results(path).get("variance")
        if isinstance(entry, dict) and entry.get("stats"):
            out.append(entry)
    return out


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


def _fit_line(
    n: np.ndarray, y: np.ndarray, slope: float | None, base: np.ndarray | None = None
) -> tuple[float, float, bool]:
    """``y = fixed * base + per * n`` (both >= 0; ``base``: ones, or K for a fixed part per
    model); with one distinct ``n``, the given ``slope`` (or proportional costs without one)
    and the mean remainder as the fixed part."""
    base = np.ones_like(n) if base is None else base
    if len(set(n.tolist())) >= 2:
        fixed, per = _nnls([base, n], y)
        return float(fixed), float(per), False
    if slope is None:
        return 0.0, float(np.mean(y / n)), False
    return float(max(np.mean((y - slope * n) / base), 0.0)), slope, True


def _cost_fit(
    family: str, rows: list[dict], naive: CostFit | None, per_model: bool = False
) -> CostFit:
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
    base = k if per_model else None
    s0, s1, b1 = _fit_line(n, serve, naive.serve1 if naive else None, base)
    z0, z1, b2 = _fit_line(n, size, naive.bytes1 if naive else None, base)
    return CostFit(family, t_model, t_member, s0, s1, z0, z1, len(rows), b1 or b2, per_model)


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


# ------------------------------------------------------------------ the variance theory

THEORY_GRID = 201  # grid points of the profile search over a_b or a_w (then refined)
THEORY_FORMULA = "LDS(K, M) = rho1 sqrt(K M / (1 + (M-1) a_w + M (K-1) a_b))"


def theory_lds(
    rho1: float, a_w: float, a_b: float, k: float | np.ndarray, m: float | np.ndarray
) -> np.ndarray:
    """``rho1 sqrt(K M / (1 + (M - 1) a_w + M (K - 1) a_b))``: the LDS of a K x M ensemble
    whose members have LDS ``rho1`` and covariances ``a_w = c_w / v`` (same trained model)
    and ``a_b = c_b / v`` (different models), as in :mod:`etda.evaluate.variance`."""
    return rho1 / np.sqrt(ensemble_variance(1.0, a_w, a_b, k, m))


@dataclass(frozen=True)
class TheoryFit:
    """The variance theory fitted to one family's measured rows (one method and options).

    ``family``: ``naive`` (``rho1`` and ``a_b`` fitted on its K = 1, 2, ...; ``a_w`` None)
    or an ensemble kind (its member's ``rho1`` and ``a_w`` fitted on its K x M rows, with
    ``a_b`` from the naive fit of the same options); ``points``: the (K, M) fitted on;
    ``bound``: the constraints ``0 <= a_b <= a_w <= 1`` that bind; ``measured``: c_w/v,
    c_b/v and rho(1,1) of the sweep's variance run of this family (None: no run);
    predictions for K <= ``k_max`` and M <= ``m_max``.
    """

    method: str
    family: str
    variant: str
    rho1: float
    a_w: float | None
    a_b: float
    points: tuple[tuple[int, int], ...]
    rmse: float
    bound: tuple[str, ...] = ()
    measured: dict | None = None
    k_max: int = 1
    m_max: int = 1

    def predict(self, k: int, m: int) -> float:
        a_w = self.a_b if self.a_w is None else self.a_w
        return float(min(theory_lds(self.rho1, a_w, self.a_b, k, m), 1.0))

    def params(self) -> str:
        """``rho1 0.3412, a_w 0.762, a_b 0.556``."""
        a_w = "" if self.a_w is None else f", a_w {self.a_w:.3f}"
        return f"rho1 {self.rho1:.4f}{a_w}, a_b {self.a_b:.3f}"

    def describe(self) -> str:
        if self.family == "naive":
            on = "K = " + ", ".join(str(k) for k, _ in self.points)
            reach = f"K = 1..{self.k_max}"
        else:
            on = "K x M = " + ", ".join(f"{k}x{m}" for k, m in self.points)
            reach = f"K <= {self.k_max}, M <= {self.m_max}"
        text = (
            f"{self.family} ({self.variant}): {self.params()}"
            f"{'' if self.family == 'naive' else ' (a_b from the naive fit)'}, least squares "
            f"on measured {on} (rms residual {self.rmse:.4f}), predicted for {reach}"
        )
        if self.bound:
            text += f"; at the bound {', '.join(self.bound)}"
        if self.measured:
            mv = self.measured
            rho = f", rho(1,1) {mv['rho1']:.4f} (Spearman)" if mv.get("rho1") is not None else ""
            text += (
                f"; measured on the {mv['K']}x{mv['M']} variance run: c_w/v {mv['a_w']:.3f}, "
                f"c_b/v {mv['a_b']:.3f}{rho}"
            )
        return text


@dataclass(frozen=True)
class Comparison:
    """A measured configuration next to the theory: ``fitted`` by the fit on every row of its
    family, ``predicted`` by the fit without it (leave-one-out; None with ``note`` saying
    why there is none)."""

    key: str
    label: str
    family: str
    models: int
    members: int
    lds: float
    sem: float
    fitted: float | None
    predicted: float | None
    note: str = ""

    @property
    def options(self) -> str:
        """The key's options after K and M (projection, damping, the kind's own)."""
        return "/".join(self.key.split("/")[4:])

    @property
    def z(self) -> float | None:
        """(leave-one-out prediction - measured) / the measured s.e."""
        if self.predicted is None or not self.sem > 0:
            return None
        return (self.predicted - self.lds) / self.sem


@dataclass
class Theory:
    """The theory fits of one method's records: ``fits`` and ``reasons`` (why a family is
    not fitted) by variant; ``comparison``: one row per measured configuration."""

    fits: dict[str, TheoryFit]
    reasons: dict[str, str]
    comparison: list[Comparison]


def comparison_summary(rows: Sequence[Comparison]) -> str:
    """``12 leave-one-out predictions: mean |diff| 0.84 s.e., ...`` (or why there are none)."""
    zs = [(abs(z), c) for c in rows if (z := c.z) is not None]
    if not zs:
        return f"no leave-one-out predictions (of {len(rows)} measured configuration(s))"
    a = np.array([z for z, _ in zs])
    worst = max(zs, key=lambda t: t[0])[1]
    return (
        f"{len(zs)} leave-one-out prediction(s) of {len(rows)} measured configuration(s): "
        f"mean |diff| {a.mean():.2f} s.e., rms {np.sqrt(np.mean(a**2)):.2f}, max "
        f"{a.max():.2f} ({worst.label}); within 1 s.e. {int(np.sum(a <= 1))}, within 2 s.e. "
        f"{int(np.sum(a <= 2))}"
    )


def _profile(
    k: np.ndarray, m: np.ndarray, y: np.ndarray, a_b: float | None, lo: float
) -> tuple[float, float, float]:
    """Least squares of ``y = rho1 g(a)`` over ``a`` in [``lo``, 1] (``rho1 >= 0`` solved
    in closed form for each ``a``): ``a`` is ``a_b`` when ``a_b`` is None (naive rows,
    M = 1), else ``a_w`` with that ``a_b``. Returns (rho1, a, sum of squares)."""
    from scipy.optimize import minimize_scalar

    def solve(a: float) -> tuple[float, float]:
        g = theory_lds(1.0, a, a if a_b is None else a_b, k, m)
        rho1 = max(float(y @ g / (g @ g)), 0.0)
        return float(np.sum((y - rho1 * g) ** 2)), rho1

    grid = np.linspace(lo, 1.0, THEORY_GRID)
    i = int(np.argmin([solve(a)[0] for a in grid]))
    best = float(grid[i])
    if grid[-1] > grid[0]:
        bracket = (float(grid[max(i - 1, 0)]), float(grid[min(i + 1, len(grid) - 1)]))
        res = minimize_scalar(
            lambda a: solve(a)[0], bounds=bracket, method="bounded", options={"xatol": 1e-10}
        )
        if res.success and res.fun < solve(best)[0]:
            best = float(res.x)
    sse, rho1 = solve(best)
    return rho1, best, sse


def _bounds(a_w: float | None, a_b: float, tol: float = 1e-6) -> tuple[str, ...]:
    out = []
    if a_b <= tol:
        out.append("a_b = 0")
    if a_w is None and a_b >= 1 - tol:
        out.append("a_b = 1")
    if a_w is not None and a_w - a_b <= tol:
        out.append("a_w = a_b")
    if a_w is not None and a_w >= 1 - tol:
        out.append("a_w = 1")
    return tuple(out)


def _configs(rows: Sequence[dict]) -> list[tuple[int, int]]:
    return sorted({(int(r["models"]), int(r["m"])) for r in rows})


def fit_family(rows: Sequence[dict], naive: TheoryFit | None = None) -> TheoryFit | str:
    """The theory fitted to one family's measured ``rows`` (records of one method and
    variant), or why it cannot be: naive rows (``naive`` None) fit ``rho1`` and ``a_b``,
    a kind's rows fit its ``rho1`` and ``a_w`` given ``naive.a_b``; two parameters need
    two measured configurations."""
    configs = _configs(rows)
    if not rows:
        return "no measured rows"
    k = np.array([r["models"] for r in rows], np.float64)
    m = np.array([r["m"] for r in rows], np.float64)
    y = np.array([r["lds"]["mean"] for r in rows], np.float64)
    ref = rows[0]
    if naive is None:
        if len(configs) < 2:
            return f"one measured size (K = {configs[0][0]}): rho1 and a_b need two"
        rho1, a_b, sse = _profile(k, m, y, None, 0.0)
        a_w = None
    else:
        if len(configs) < 2:
            k1, m1 = configs[0]
            return f"one measured configuration ({k1}x{m1}): rho1 and a_w need two"
        a_b = naive.a_b
        rho1, a_w, sse = _profile(k, m, y, a_b, a_b)
    return TheoryFit(
        method=ref["method"],
        family="naive" if naive is None else ref["ensemble"],
        variant=_variant(ref),
        rho1=rho1,
        a_w=a_w,
        a_b=a_b,
        points=tuple(configs),
        rmse=math.sqrt(sse / len(rows)),
        bound=_bounds(a_w, a_b),
    )


def _naive_variant(variant: str, naive: Sequence[str]) -> str | None:
    """The naive variant whose options are the longest prefix of ``variant``'s (the same
    projection and damping; the kind's own options come last in a key)."""
    opts = variant.split("/")[4:]
    fits = [n for n in naive if opts[: len(n.split("/")[4:])] == n.split("/")[4:]]
    return max(fits, key=lambda n: len(n.split("/")), default=None)


def _variance_measured(entry: dict) -> dict | None:
    """c_w/v, c_b/v and rho(1,1) (Spearman, one member) of a sweep's variance run."""
    st = entry.get("stats") or {}
    v = st.get("v")
    if not v or st.get("c_w") is None or st.get("c_b") is None:
        return None
    one = [r for r in entry.get("measured", []) if r.get("K") == 1 and r.get("M") == 1]
    return {
        "a_w": st["c_w"] / v,
        "a_b": st["c_b"] / v,
        "rho1": one[0].get("spearman") if one else None,
        "K": st.get("K"),
        "M": st.get("M"),
    }


def _method_rows(records: Sequence[dict], method: str) -> list[dict]:
    return [
        r
        for r in records
        if r.get("method") == method and math.isfinite(float(r.get("lds", {}).get("mean", "nan")))
    ]


def _groups(rows: Sequence[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: (r["models"], r["m"], r["key"])):
        out.setdefault(_variant(r), []).append(r)
    return out


def fit_theory(
    records: Sequence[dict],
    method: str,
    variance: Sequence[dict] = (),
    epochs: int | None = None,
) -> Theory:
    """The theory fits of ``method``'s families in ``records``, why the others are not fitted,
    and the leave-one-out comparison with every measured configuration.

    ``variance``: the sweeps' variance runs (shown beside the matching family's fit);
    ``epochs``: the recipe's (checkpoint ensembles are predicted up to one per epoch).
    """
    groups = _groups(_method_rows(records, method))
    naive_of = {v: rs for v, rs in groups.items() if rs[0]["ensemble"] == "none"}
    fits: dict[str, TheoryFit] = {}
    reasons: dict[str, str] = {}
    anchors: dict[str, TheoryFit | None] = {}
    for variant in sorted(groups, key=lambda v: (v not in naive_of, v)):  # naive first
        rs, naive = groups[variant], None
        if variant not in naive_of:
            base = _naive_variant(variant, list(naive_of))
            naive = fits.get(base) if base else None
            if naive is None:
                why = reasons.get(base, "?") if base else "no naive rows with its options"
                reasons[variant] = f"a_b unknown (naive: {why})"
                anchors[variant] = None
                continue
        anchors[variant] = naive
        fit = fit_family(rs, naive)
        if isinstance(fit, str):
            reasons[variant] = fit
            continue
        fits[variant] = _with_range(fit, rs, naive, variance, epochs)
    order = sorted(groups, key=lambda v: (v not in naive_of, v))
    comparison = [row for v in order for row in _loo(groups[v], anchors[v], fits.get(v), reasons)]
    return Theory(fits, reasons, comparison)


def _with_range(
    fit: TheoryFit,
    rows: Sequence[dict],
    naive: TheoryFit | None,
    variance: Sequence[dict],
    epochs: int | None,
) -> TheoryFit:
    """``fit`` with its prediction range and the matching variance run's measurements: K up
    to ``MAX_EXTRAPOLATION`` x the largest naive K, M up to that x the kind's largest M
    (checkpoints: one per epoch)."""
    from dataclasses import replace

    k_ref = max(k for k, _ in (naive or fit).points)
    k_max = int(math.floor(k_ref * MAX_EXTRAPOLATION))
    m_max = int(math.floor(max(int(r["m"]) for r in rows) * MAX_EXTRAPOLATION))
    kind = ENSEMBLES.get(rows[0]["ensemble"])
    if naive is None:
        m_max = 1
    elif kind is not None and kind.cls.members_are_checkpoints and epochs is not None:
        m_max = min(m_max, int(epochs))
    run = _variance_run(fit, variance)
    measured = None if run is None else _variance_measured(run)
    return replace(fit, k_max=k_max, m_max=m_max, measured=measured)


def _variance_run(fit: TheoryFit, variance: Sequence[dict]) -> dict | None:
    """The variance run of ``fit``'s family: same method and kind, its key's options a
    prefix of the family's (a run's key may leave out an option at its default, e.g.
    ``p0.1``); the longest such prefix."""
    opts = fit.variant.split("/")[4:]
    best, length = None, -1
    for entry in variance:
        parts = str(entry.get("key", "")).split("/")
        if parts[:2] != fit.variant.split("/")[:2] or entry.get("method") != fit.method:
            continue
        if opts[: len(parts[4:])] == parts[4:] and len(parts[4:]) > length:
            best, length = entry, len(parts[4:])
    return best


def _loo(
    rows: Sequence[dict],
    naive: TheoryFit | None,
    fit: TheoryFit | None,
    reasons: dict[str, str],
) -> list[Comparison]:
    """One :class:`Comparison` per row: the fit on all rows and the fit without the row
    (``naive``: the fit ``a_b`` comes from; None for naive rows or when there is none)."""
    out = []
    for i, r in enumerate(rows):
        k, m = int(r["models"]), int(r["m"])
        pred, note = None, ""
        if fit is None:
            note = f"theory not fitted: {reasons.get(_variant(r), '?')}"
        else:
            rest = list(rows[:i]) + list(rows[i + 1 :])
            loo = fit_family(rest, naive) if rest else "no other rows"
            if isinstance(loo, TheoryFit):
                pred = loo.predict(k, m)
            else:
                note = f"without it: {loo}"
        out.append(
            Comparison(
                key=r["key"],
                label=r["label"],
                family=r["family"],
                models=k,
                members=m,
                lds=float(r["lds"]["mean"]),
                sem=float(r["lds"]["sem"]),
                fitted=None if fit is None else fit.predict(k, m),
                predicted=pred,
                note=note,
            )
        )
    return out


def _new_candidate(
    method: str, ref: dict, k: int, m: int, lds: float, sem: float, cost: CostFit, basis: str
) -> Candidate:
    """A predicted candidate of ``ref``'s variant at K = ``k``, M = ``m``."""
    from etda.bench.sweeps import BenchConfig

    naive = ref["ensemble"] == "none"
    cfg = BenchConfig(method, ref["ensemble"], k, None if naive else m)
    train, serve, nbytes = cost.predict(k, m)
    return Candidate(
        key=_key_for(ref, k, m),
        label=cfg.label,
        method=method,
        ensemble=ref["ensemble"],
        family=cfg.family,
        models=k,
        members=1 if naive else m,
        proj_dim=ref.get("proj_dim"),
        projection=ref.get("projection"),
        lds=lds,
        sem=sem,
        train_s=train,
        serve_s=serve,
        bytes=nbytes,
        measured=False,
        basis=basis,
    )


def _theory_candidates(
    fit: TheoryFit, rows: list[dict], cost: CostFit, measured: dict[str, Candidate]
) -> list[Candidate]:
    """The unmeasured K x M of ``fit``'s family within its prediction range (naive: K =
    1..k_max; a kind: K = 1..k_max x M on ``M_GRID``), predicted by the theory."""
    ref = rows[0]
    if fit.family == "naive":
        sizes = [(k, 1) for k in range(1, fit.k_max + 1)]
    else:
        sizes = [(k, m) for k in range(1, fit.k_max + 1) for m in M_GRID if m <= fit.m_max]
    basis = (
        f"predicted from the theory fit of {fit.family} ({fit.params()}; {THEORY_FORMULA}, "
        f"least squares on {len(fit.points)} measured configuration(s)); {cost.describe()}"
    )
    out = []
    for k, m in sizes:
        if _key_for(ref, k, m) in measured:
            continue

        def dist(r: dict, k: int = k, m: int = m) -> float:
            return abs(math.log(r["models"] / k)) + abs(math.log(r["m"] / m))

        near = min(rows, key=dist)
        sem = float(near["lds"]["sem"])
        out.append(_new_candidate(fit.method, ref, k, m, fit.predict(k, m), sem, cost, basis))
    return out


def _fallback_candidates(
    method: str,
    variant: str,
    rows: list[dict],
    costs: tuple[CostFit | None, int | None],
    measured: dict[str, Candidate],
    predicted: dict[str, Candidate],
) -> tuple[list[LDSFit], list[CostFit], list[str]]:
    """The ``a - b/n`` extrapolation of a variant the theory cannot fit, per family (a kind
    and its hybrids apart) and size axis, into ``predicted`` (two axes disagreeing: the
    lower). ``costs``: the naive cost fit and the recipe's epochs. Returns (LDS fits, cost
    fits, families with a single measured size)."""
    naive_cost, epochs = costs
    fits, cost_fits, single = [], [], []
    by_family: dict[str, list[dict]] = {}
    for r in rows:
        by_family.setdefault(r["family"], []).append(r)
    for family, rs in sorted(by_family.items()):
        axes = []  # (axis, fixed value, points along it)
        if family == "naive":
            axes.append(("K", 1, rs))
        elif family.startswith("hybrid-"):
            axes += [("K", m, [r for r in rs if r["m"] == m]) for m in sorted({r["m"] for r in rs})]
            ks = sorted({r["models"] for r in rs})
            axes += [("M", k, [r for r in rs if r["models"] == k]) for k in ks]
        else:
            axes.append(("M", 1, rs))
        family_fits = [
            (_lds_fit(family, variant, axis, fixed, pts), pts)
            for axis, fixed, pts in axes
            if len({r["models" if axis == "K" else "m"] for r in pts}) >= 2
        ]
        if not family_fits:
            single.append(f"{family} ({', '.join(f'K={k} M={m}' for k, m in _configs(rs))})")
            continue
        cost = naive_cost if family == "naive" and naive_cost else _cost_fit(family, rs, naive_cost)
        cost_fits.append(cost)
        kind = ENSEMBLES.get(rs[0]["ensemble"])
        max_m = epochs if kind is not None and kind.cls.members_are_checkpoints else None
        for fit, pts in family_fits:
            fits.append(fit)
            axis_of = "models" if fit.axis == "K" else "m"
            for size in _grid(fit, max_m):
                k, m = (size, fit.fixed) if fit.axis == "K" else (fit.fixed, size)
                if _key_for(rs[0], k, m) in measured:
                    continue
                near = min(pts, key=lambda r: abs(math.log(r[axis_of] / size)))
                basis = f"predicted (LDS: {fit.describe()}; {cost.describe()})"
                lds, sem = fit.predict(size), float(near["lds"]["sem"])
                cand = _new_candidate(method, rs[0], k, m, lds, sem, cost, basis)
                old = predicted.get(cand.key)
                if old is None or cand.lds < old.lds:
                    predicted[cand.key] = cand
    return fits, cost_fits, single


def build_candidates(
    records: list[dict],
    method: str,
    epochs: int | None = None,
    theory: Theory | None = None,
) -> tuple[list[Candidate], list[LDSFit], list[CostFit], list[str]]:
    """Measured and predicted candidates of ``method`` from benchmark ``records``.

    Predicted from the variance theory (``theory``: :func:`fit_theory` of the records,
    computed when not given) where a family's fit exists, else from ``a - b/n`` fits.
    ``epochs``: the recipe's epochs (checkpoint ensembles take at most one per epoch).
    Returns (candidates, the ``a - b/n`` fits, the cost fits, families not extrapolated).
    """
    rows = _method_rows(records, method)
    if theory is None:
        theory = fit_theory(records, method, epochs=epochs)
    measured = {r["key"]: _measured(r) for r in rows}
    groups = _groups(rows)
    naive_rows = [r for rs in groups.values() for r in rs if r["family"] == "naive"]
    naive_cost = _cost_fit("naive", naive_rows, None) if naive_rows else None

    fits: list[LDSFit] = []
    cost_fits: list[CostFit] = []
    single: list[str] = []
    predicted: dict[str, Candidate] = {}
    for variant, rs in sorted(groups.items()):
        fit = theory.fits.get(variant)
        if fit is None:
            more = _fallback_candidates(
                method, variant, rs, (naive_cost, epochs), measured, predicted
            )
            fits += more[0]
            cost_fits += [c for c in more[1] if not any(c is d for d in cost_fits)]
            single += more[2]
            continue
        if fit.family == "naive" and naive_cost:
            cost = naive_cost
        else:
            cost = _cost_fit(fit.family, rs, naive_cost, per_model=True)
        if not any(c is cost for c in cost_fits):  # naive variants share one
            cost_fits.append(cost)
        predicted.update((c.key, c) for c in _theory_candidates(fit, rs, cost, measured))
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
    theory = fit_theory(records, method, load_variance(files), epochs)
    cands, fits, cost_fits, single = build_candidates(records, method, epochs, theory)
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
        theory=list(theory.fits.values()),
        unfitted=dict(theory.reasons),
        comparison=theory.comparison,
    )
