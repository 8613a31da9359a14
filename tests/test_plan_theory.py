"""The planner's variance-theory fit: recovery on synthetic records, constraints, the
leave-one-out predicted-vs-measured table, families it cannot fit, and the CLI table."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from etda.bench.sweeps import BenchConfig
from etda.cli import app
from etda.plan import fit_family, fit_theory, plan, theory_lds

MB = 2**20
runner = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})
NONE = {"budget_train": None, "budget_serve": None, "budget_bytes": None}

# the truth the synthetic records are drawn from
RHO_NAIVE, A_B = 0.30, 0.40  # naive: one model's LDS and c_b / v
RHO_DROP, A_W = 0.28, 0.70  # a dropout member's LDS and c_w / v (a_b shared)
NAIVE_K = (1, 2, 4, 8)
DROP_KM = ((1, 5), (1, 10), (1, 20), (2, 5), (2, 10))


def _rec(ensemble: str, k: int, m: int | None, lds: float, method: str = "trak") -> dict:
    """A config record as ``etda bench`` writes it, with costs linear in K and K x M."""
    cfg = BenchConfig(method, ensemble, k, m)
    n = k * cfg.m
    return {
        **cfg.to_dict(),
        "projection": "none",
        "lds": {"mean": lds, "sem": 0.01},
        "costs": {"train_s": 10.0 * k, "serve_s": 2.0 * k + 5.0 * n, "bytes": 100 * MB * n},
        "model_train_s": 10.0 * k,
        "fingerprint": "toy",
    }


def _synthetic(noise: float = 0.002, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    recs = []
    for k in NAIVE_K:
        lds = float(theory_lds(RHO_NAIVE, A_B, A_B, k, 1)) + noise * rng.standard_normal()
        recs.append(_rec("none", k, None, lds))
    for k, m in DROP_KM:
        lds = float(theory_lds(RHO_DROP, A_W, A_B, k, m)) + noise * rng.standard_normal()
        recs.append(_rec("dropout", k, m, lds))
    return recs


def _write(
    folder: Path, records: list[dict], variance: dict | None = None, setting: str = "toy"
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "format": 1,
        "setting": {"name": setting, "recipe": {"epochs": 4}},
        "configs": {r["key"]: r for r in records},
        "variance": variance,
    }
    (folder / "results.json").write_text(json.dumps(data))
    return folder / "results.json"


def _text(result) -> str:
    return " ".join(re.sub(r"[│╭╮╰╯─┃━┏┓┗┛┡┩└┘┌┐╇╈┳┻╋]", " ", result.output).split())


# ----------------------------------------------------------------------------- the fit


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_fit_recovers_the_synthetic_truth(seed):
    theory = fit_theory(_synthetic(seed=seed), "trak")
    naive, drop = theory.fits["trak/none/*/*"], theory.fits["trak/dropout/*/*"]
    assert naive.rho1 == pytest.approx(RHO_NAIVE, abs=0.01)
    assert naive.a_b == pytest.approx(A_B, abs=0.06)
    assert drop.rho1 == pytest.approx(RHO_DROP, abs=0.01)
    assert drop.a_w == pytest.approx(A_W, abs=0.06)
    assert drop.a_b == naive.a_b  # a_b comes from the naive rows
    # an unmeasured K x M, beyond the measured ones
    truth = float(theory_lds(RHO_DROP, A_W, A_B, 4, 20))
    assert drop.predict(4, 20) == pytest.approx(truth, abs=0.01)
    assert naive.predict(12, 1) == pytest.approx(
        float(theory_lds(RHO_NAIVE, A_B, A_B, 12, 1)), abs=0.01
    )


def test_exact_records_are_fitted_exactly():
    theory = fit_theory(_synthetic(noise=0.0), "trak")
    naive, drop = theory.fits["trak/none/*/*"], theory.fits["trak/dropout/*/*"]
    assert (naive.rho1, naive.a_b) == pytest.approx((RHO_NAIVE, A_B), abs=1e-5)
    assert (drop.rho1, drop.a_w) == pytest.approx((RHO_DROP, A_W), abs=1e-5)
    assert naive.rmse < 1e-6 and drop.rmse < 1e-6 and not drop.bound
    for c in theory.comparison:  # leave-one-out is exact on exact records too
        assert c.predicted == pytest.approx(c.lds, abs=1e-5) and abs(c.z) < 1e-3


def test_plan_predicts_unmeasured_configurations_from_the_theory(tmp_path):
    path = _write(tmp_path / "toy", _synthetic())
    p = plan("toy", results=[path], **NONE)
    by = {c.key: c for c in p.candidates}
    c = by["trak/dropout/k4/m20"]
    assert not c.measured and c.family == "hybrid-dropout"
    assert c.lds == pytest.approx(float(theory_lds(RHO_DROP, A_W, A_B, 4, 20)), abs=0.01)
    drop = next(f for f in p.theory if f.family == "dropout")
    assert "predicted from the theory fit of dropout" in c.basis
    assert f"a_w {drop.a_w:.3f}" in c.basis and f"a_b {drop.a_b:.3f}" in c.basis
    # costs: 10 s per model, serve 2 s per model + 5 s per member, 100 MB per member
    assert c.costs() == pytest.approx((40.0, 8.0 + 400.0, 8000 * MB))
    assert not p.fits  # no a - b/n fallback needed


@pytest.mark.parametrize(
    ("naive_lds", "drop_lds", "bound"),
    [
        # members gain more than models would allow (a_w < a_b): a_w held at a_b
        ((0.30, 0.33, 0.35), (0.40, 0.45), "a_w = a_b"),
        # naive gains more than sqrt(K) (a_b < 0): a_b held at 0
        ((0.20, 0.30, 0.45), (0.21, 0.22), "a_b = 0"),
        # members lose with M (a_w > 1): a_w held at 1, flat
        ((0.30, 0.36, 0.40), (0.30, 0.28), "a_w = 1"),
    ],
)
def test_the_constraints_hold(naive_lds, drop_lds, bound):
    recs = [_rec("none", k, None, y) for k, y in zip((1, 2, 4), naive_lds, strict=True)]
    recs += [_rec("dropout", 1, m, y) for m, y in zip((5, 10), drop_lds, strict=True)]
    theory = fit_theory(recs, "trak")
    fits = list(theory.fits.values())
    assert len(fits) == 2
    for f in fits:
        a_w = f.a_b if f.a_w is None else f.a_w
        assert 0 <= f.a_b <= a_w <= 1 and f.rho1 >= 0
    assert any(bound in f.bound for f in fits)


def test_a_family_with_one_measured_row_is_not_fitted(tmp_path):
    recs = _synthetic() + [_rec("checkpoints", 1, 3, 0.45)]
    path = _write(tmp_path / "toy", recs)
    p = plan("toy", results=[path], **NONE)
    why = p.unfitted["trak/checkpoints/*/*"]
    assert "one measured configuration (1x3)" in why and "need two" in why
    assert all(f.family != "checkpoints" for f in p.theory)
    assert [c.members for c in p.candidates if c.ensemble == "checkpoints"] == [3]
    row = next(c for c in p.comparison if c.key == "trak/checkpoints/k1/m3")
    assert row.predicted is None and row.z is None and "not fitted" in row.note
    assert "theory not fitted" in p.explain() and why in p.explain()
    assert isinstance(fit_family([_rec("none", 1, None, 0.3)]), str)


def test_leave_one_out_has_one_row_per_measured_configuration(tmp_path):
    recs = _synthetic(noise=0.01) + [_rec("lora", 1, 4, 0.2), _rec("none", 1, None, 0.9, "if")]
    path = _write(tmp_path / "toy", recs)
    p = plan("toy", results=[path], **NONE)
    measured = sorted(r["key"] for r in recs if r["method"] == "trak")
    assert sorted(c.key for c in p.comparison) == measured  # one row each, trak only
    for c in p.comparison:
        if c.family == "lora":
            assert c.predicted is None
            continue
        assert c.predicted is not None and c.fitted is not None
        assert c.z == pytest.approx((c.predicted - c.lds) / c.sem)
        # honest: the row itself is left out, so the prediction is not the in-sample fit
        assert c.predicted != pytest.approx(c.fitted, abs=1e-9)
    assert "leave-one-out prediction(s) of 10 measured configuration(s)" in p.explain()


def test_the_variance_run_is_shown_beside_the_fit(tmp_path):
    variance = {
        "key": "trak/dropout/k3/m5",
        "method": "trak",
        "stats": {"v": 2.0, "c_w": 1.4, "c_b": 0.8, "K": 3, "M": 5, "D": 50},
        "measured": [{"K": 1, "M": 1, "spearman": 0.27}],
    }
    path = _write(tmp_path / "toy", _synthetic(), variance)
    p = plan("toy", results=[path], **NONE)
    drop = next(f for f in p.theory if f.family == "dropout")
    assert drop.measured == {"a_w": 0.7, "a_b": 0.4, "rho1": 0.27, "K": 3, "M": 5}
    naive = next(f for f in p.theory if f.family == "naive")
    assert naive.measured is None
    assert "measured on the 3x5 variance run: c_w/v 0.700, c_b/v 0.400" in p.explain()


def test_without_a_naive_fit_the_old_fit_stands_in_and_says_why(tmp_path):
    recs = [_rec("none", 1, None, 0.3)] + [
        _rec("dropout", 1, m, y) for m, y in ((5, 0.3), (10, 0.32))
    ]
    path = _write(tmp_path / "toy", recs)
    p = plan("toy", results=[path], **NONE)
    assert not p.theory
    assert "a_b unknown (naive: one measured size (K = 1)" in p.unfitted["trak/dropout/*/*"]
    assert p.fits and p.fits[0].family == "dropout"
    text = p.explain()
    assert "fallback where the theory is not fitted: LDS(n) = a - b/n" in text
    assert "a_b unknown" in text


# --------------------------------------------------------------------------------- CLI


def test_cli_prints_the_predicted_vs_measured_table(tmp_path):
    recs = _synthetic() + [_rec("checkpoints", 1, 3, 0.45)]
    path = _write(tmp_path / "toy", recs, setting="fmnist-mlp")  # the CLI knows its settings
    result = runner.invoke(
        app, ["plan", "--setting", "fmnist-mlp", "--results", str(path)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    text = _text(result)
    assert "predicted vs measured (variance theory, leave-one-out)" in text
    assert "predicted (LOO)" in text and "diff / s.e." in text
    p = plan("fmnist-mlp", results=[path], **NONE)
    for c in p.comparison:
        if c.predicted is not None:
            assert f"{c.lds:.4f} ± {c.sem:.4f} {c.fitted:.4f} {c.predicted:.4f} {c.z:+.2f}" in text
    assert "theory not fitted: one measured configuration (1x3)" in text
    assert "leave-one-out" in runner.invoke(app, ["plan", "--help"]).output


def test_pareto_matches_the_pairwise_definition(tmp_path):
    from etda.plan import _dominates

    path = _write(tmp_path / "toy", _synthetic() + [_rec("checkpoints", 1, 3, 0.45)])
    for budgets in (NONE, {**NONE, "budget_serve": 60.0}):
        p = plan("toy", results=[path], **budgets)
        brute = [c for c in p.feasible if not any(_dominates(o, c) for o in p.feasible)]
        assert [c.key for c in p.pareto()] == [c.key for c in brute]
