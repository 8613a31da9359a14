"""The budget planner (``etda plan``): budget strings, choices within budgets, fits, CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datagate
import numpy as np
import pytest
from typer.testing import CliRunner

from etda.bench.sweeps import BenchConfig
from etda.cli import app
from etda.plan import CLIP_MARGIN, parse_seconds, parse_size, plan, theory_lds

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20  # etda.cost.human_bytes units
runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})


def _text(result) -> str:
    return " ".join(re.sub(r"[│╭╮╰╯─┃━┏┓┗┛┡┩└┘┌┐]", " ", result.output).split())


def _rec(
    ensemble: str,
    k: int,
    m: int | None,
    lds: float,
    train: float,
    serve: float,
    nbytes: float,
    method: str = "trak",
    model_train: float | None = None,
    proj_dim: int | None = None,
) -> dict:
    """A config record as ``etda bench`` writes it (only the fields the planner reads)."""
    cfg = BenchConfig(method, ensemble, k, m, proj_dim=proj_dim)
    return {
        **cfg.to_dict(),
        "projection": "factored" if proj_dim else "none",
        "lds": {"mean": lds, "sem": 0.01},
        "costs": {"train_s": train, "serve_s": serve, "bytes": nbytes},
        "model_train_s": train if model_train is None else model_train,
        "fingerprint": "toy",
    }


def _write(folder: Path, records: list[dict], setting: str = "toy", epochs: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "format": 1,
        "setting": {"name": setting, "recipe": {"epochs": epochs}},
        "configs": {r["key"]: r for r in records},
    }
    (folder / "results.json").write_text(json.dumps(data))
    return folder / "results.json"


# naive: LDS exactly 0.44 - 0.12 / K, 10 s training and 5 s serving and 100 MB per model;
# dropout: LDS exactly 0.41 - 0.16 / M, serve 2 + 5 M s, bytes 1 MB + 100 MB M;
# checkpoints: one measured size (not extrapolated), the best LDS but 30 s of serving.
# The planner predicts them from the variance theory (the a - b/n form is not the theory's).
TOY = [
    _rec("none", 1, None, 0.32, 10.0, 5.0, 100 * MB),
    _rec("none", 2, None, 0.38, 20.0, 10.0, 200 * MB),
    _rec("none", 4, None, 0.41, 40.0, 20.0, 400 * MB),
    _rec("dropout", 1, 2, 0.33, 10.0, 12.0, 201 * MB),
    _rec("dropout", 1, 4, 0.37, 10.0, 22.0, 401 * MB),
    _rec("checkpoints", 1, 3, 0.45, 10.0, 30.0, 300 * MB),
    _rec("none", 1, None, 0.99, 1.0, 1.0, 1.0, method="graddot"),  # another method
]


@pytest.fixture
def toy(tmp_path) -> list[Path]:
    return [_write(tmp_path / "toy", TOY)]


def _naive_theory(k: int) -> float:
    """The theory's naive LDS at K = ``k`` fitted to TOY's naive rows independently of the
    planner (scipy's bounded least squares): rho1 sqrt(K / (1 + (K - 1) a_b))."""
    from scipy.optimize import curve_fit

    ks = np.array([1.0, 2.0, 4.0])
    (rho1, a_b), _ = curve_fit(
        lambda x, r, a: r * np.sqrt(x / (1 + (x - 1) * a)),
        ks,
        np.array([0.32, 0.38, 0.41]),
        p0=(0.3, 0.5),
        bounds=([0, 0], [1, 1]),
    )
    return float(rho1 * np.sqrt(k / (1 + (k - 1) * a_b)))


def _by_key(p) -> dict:
    return {c.key: c for c in p.candidates}


# ------------------------------------------------------------------------ budget strings


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("60s", 60), ("90", 90), ("5m", 300), ("1.5h", 5400), ("500ms", 0.5), (" 2 min ", 120)],
)
def test_parse_seconds(text, seconds):
    assert parse_seconds(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [
        ("500MB", 500 * 2**20),
        ("2GB", 2 * 2**30),
        ("800KB", 800 * 2**10),
        ("1e9", 1e9),
        ("1.5 GiB", 1.5 * 2**30),
        ("27.9mb", 27.9 * 2**20),
    ],
)
def test_parse_size_uses_the_units_of_the_reports(text, nbytes):
    assert parse_size(text) == pytest.approx(nbytes)


@pytest.mark.parametrize("text", ["", "abc", "5 fortnights", "-1s", "0", "nan", "1e999s", "s"])
def test_parse_seconds_rejects_bad_strings(text):
    with pytest.raises(ValueError, match="duration|cannot read"):
        parse_seconds(text)


@pytest.mark.parametrize("text", ["", "5XB", "MB", "-2GB", "0B", "1e999"])
def test_parse_size_rejects_bad_strings(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


# ----------------------------------------------------------------------------- choices


def test_unconstrained_picks_the_best_measured(toy):
    p = plan("toy", budget_train=None, budget_serve=None, budget_bytes=None, results=toy)
    assert p.recommendation.key == "trak/checkpoints/k1/m3"
    assert p.recommendation.measured
    assert not p.rejected
    assert all(c.method == "trak" for c in p.candidates)  # graddot rows are ignored
    assert p.naive is not None and p.naive.family == "naive"
    assert "Versus the best naive ensemble" in p.explain()


def test_serve_budget_alone(toy):
    p = plan("toy", budget_train=None, budget_serve=25, budget_bytes=None, results=toy)
    rec = p.recommendation
    # checkpoints (30 s) is out; naive K = 5 serves 25 s and is predicted by the theory
    assert rec.key == "trak/none/k5/m1" and not rec.measured
    assert rec.lds == pytest.approx(_naive_theory(5), abs=1e-6)
    assert rec.serve_s == pytest.approx(25.0) and rec.train_s == pytest.approx(50.0)
    for c in p.feasible:
        assert c.serve_s <= 25
    for r in p.rejected:
        assert r.broken == ("serve",) and r.candidate.serve_s > 25
    assert "trak/checkpoints/k1/m3" in {r.candidate.key for r in p.rejected}
    text = p.explain()
    assert "predicted" in text and "serve 30.0 s > 25.0 s ✗" in text  # checkpoints, rejected


def test_bytes_budget_alone(toy):
    p = plan("toy", budget_train=None, budget_serve=None, budget_bytes=250 * MB, results=toy)
    assert p.recommendation.key == "trak/none/k2/m1" and p.recommendation.measured
    assert all(c.bytes <= 250 * MB for c in p.feasible)
    assert all(r.broken == ("space",) for r in p.rejected)


def test_train_budget_alone_and_combined(toy):
    p = plan("toy", budget_train=15, budget_serve=None, budget_bytes=None, results=toy)
    assert p.recommendation.key == "trak/checkpoints/k1/m3"  # one training: within 15 s
    assert {c.models for c in p.feasible} == {1}
    assert all(r.broken == ("train",) for r in p.rejected)
    both = plan("toy", budget_train=35, budget_serve=25, budget_bytes=None, results=toy)
    assert both.recommendation.key == "trak/none/k3/m1"  # 30 s train, 15 s serve
    assert both.recommendation.lds == pytest.approx(_naive_theory(3), abs=1e-6)
    broken = {r.candidate.key: r.broken for r in both.rejected}
    assert broken["trak/none/k4/m1"] == ("train",)
    assert broken["trak/checkpoints/k1/m3"] == ("serve",)
    assert broken["trak/none/k8/m1"] == ("train", "serve")


def test_ties_go_to_the_cheaper_training(tmp_path):
    def run(train_a: float, train_b: float) -> str:
        recs = [
            _rec("none", 1, None, 0.30, 10.0, 5.0, 100 * MB),
            _rec("checkpoints", 1, 3, 0.45, train_a, 30.0, 300 * MB),
            _rec("dropout-per-example", 1, 3, 0.45, train_b, 30.0, 300 * MB),
        ]
        path = _write(tmp_path / f"{train_a}-{train_b}", recs)
        kw = {"budget_train": None, "budget_serve": None, "budget_bytes": None}
        return plan("toy", results=[path], **kw).recommendation.key

    assert run(10.0, 8.0) == "trak/dropout-per-example/k1/m3"
    assert run(8.0, 10.0) == "trak/checkpoints/k1/m3"


def test_nothing_fits_names_the_cheapest(toy):
    with pytest.raises(ValueError, match=r"no trak ensemble fits.*cheapest.*naive 1.*5\.00 s"):
        plan("toy", budget_train=None, budget_serve=1, budget_bytes=None, results=toy)


def test_missing_results_say_how_to_make_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ETDA_RESULTS", str(tmp_path / "none"))  # not the repository's
    with pytest.raises(FileNotFoundError, match="etda bench --setting toy --quick"):
        plan("toy", budget_train=None, budget_serve=None, budget_bytes=None)
    result = runner.invoke(app, ["plan", "--setting", "fmnist-mlp"])
    assert result.exit_code == 2
    assert "etda bench --setting fmnist-mlp --quick" in _text(result)


def test_other_setting_or_method_is_an_error(toy):
    with pytest.raises(ValueError, match="not 'other'"):
        plan("other", budget_train=None, budget_serve=None, budget_bytes=None, results=toy)
    with pytest.raises(ValueError, match="no if configurations.*--methods if"):
        kw = {"budget_train": None, "budget_serve": None, "budget_bytes": None}
        plan("toy", method="if", results=toy, **kw)


def test_default_results_merge_full_over_quick(tmp_path, monkeypatch):
    base = tmp_path / "benchmarks" / "results"
    _write(base / "toy", TOY)
    quick = [
        _rec("none", 1, None, 0.10, 99.0, 99.0, 1.0),  # collides with the full run's
        _rec("lora", 1, 2, 0.20, 30.0, 9.0, 9 * MB, model_train=10.0),  # only here
    ]
    _write(base / "toy-quick", quick)
    monkeypatch.chdir(tmp_path)
    p = plan("toy", budget_train=None, budget_serve=None, budget_bytes=None)
    by = _by_key(p)
    assert by["trak/none/k1/m1"].lds == 0.32
    assert by["trak/lora/k1/m2/r8e2"].lds == 0.20 and by["trak/lora/k1/m2/r8e2"].measured
    assert len(p.sources) == 2


# -------------------------------------------------------------------------------- fits


def test_measured_rows_keep_their_exact_figures(toy):
    p = plan("toy", budget_train=None, budget_serve=None, budget_bytes=None, results=toy)
    by = _by_key(p)
    for rec in TOY[:-1]:
        c = by[rec["key"]]
        assert c.measured and c.kind == "measured"
        assert (c.lds, c.sem) == (rec["lds"]["mean"], rec["lds"]["sem"])
        assert c.costs() == (
            rec["costs"]["train_s"],
            rec["costs"]["serve_s"],
            rec["costs"]["bytes"],
        )
        assert c.label == rec["label"] and (c.models, c.members) == (rec["models"], rec["m"])


def test_fallback_lds_is_capped_monotone_and_bounded(tmp_path):
    # without naive rows a_b is unknown: the a - b/n fit of each family stands in
    path = _write(tmp_path / "toy", [r for r in TOY if r["ensemble"] != "none"])
    p = plan("toy", budget_train=None, budget_serve=None, budget_bytes=None, results=[path])
    drop = sorted((c for c in p.candidates if c.family == "dropout"), key=lambda c: c.members)
    pred = [c for c in drop if not c.measured]
    cap = 0.37 + CLIP_MARGIN
    assert pred and max(c.members for c in drop) == 8  # at most 2x the largest measured
    assert all(c.lds <= cap + 1e-12 for c in pred)
    assert all(a.lds <= b.lds for a, b in zip(drop, drop[1:], strict=False))  # monotone in M
    by = _by_key(p)
    assert by["trak/dropout/k1/m3"].lds == pytest.approx(0.41 - 0.16 / 3)  # on the fit
    assert by["trak/dropout/k1/m8"].lds == pytest.approx(cap)  # fit 0.39, capped at 0.38
    # costs of the dropout family's line: serve 2 + 5 M, bytes 1 MB + 100 MB M, one model
    assert by["trak/dropout/k1/m8"].costs() == pytest.approx((10.0, 42.0, 801 * MB))
    assert not p.theory and "a_b unknown" in p.unfitted["trak/dropout/*/*"]
    assert "fallback where the theory is not fitted" in p.explain()
    # one measured size: measured only, never extrapolated
    assert [c.members for c in p.candidates if c.family == "checkpoints"] == [3]
    assert any("checkpoints" in s for s in p.single)


def test_theory_lds_is_monotone_and_bounded(toy):
    p = plan("toy", budget_train=None, budget_serve=None, budget_bytes=None, results=toy)
    fits = {f.family: f for f in p.theory}
    naive, drop = fits["naive"], fits["dropout"]
    assert 0 <= naive.a_b == drop.a_b <= drop.a_w <= 1
    cands = [c for c in p.candidates if c.ensemble == "dropout"]
    one = sorted((c for c in cands if c.models == 1), key=lambda c: c.members)
    assert one and max(c.members for c in one) == 8  # at most 2x the largest measured M
    assert all(a.lds <= b.lds for a, b in zip(one, one[1:], strict=False))  # monotone in M
    two = {c.members: c.lds for c in cands if c.models == 2}
    assert all(two[c.members] > c.lds for c in one if c.members in two)  # more models help
    by = _by_key(p)
    expected = theory_lds(drop.rho1, drop.a_w, drop.a_b, 1, 3)
    assert by["trak/dropout/k1/m3"].lds == pytest.approx(float(expected))
    assert "theory fit of dropout" in by["trak/dropout/k1/m3"].basis
    # costs of the dropout family's line, per model: serve 2 + 5 M, bytes 1 MB + 100 MB M
    assert by["trak/dropout/k1/m8"].costs() == pytest.approx((10.0, 42.0, 801 * MB))
    assert by["trak/dropout/k2/m2"].costs() == pytest.approx((20.0, 24.0, 402 * MB))
    # naive: K up to 2x the largest measured, below the ceiling rho1 / sqrt(a_b)
    naive_c = sorted((c for c in p.candidates if c.family == "naive"), key=lambda c: c.models)
    assert max(c.models for c in naive_c) == 8
    pred = [c for c in naive_c if not c.measured]
    assert all(a.lds < b.lds for a, b in zip(pred, pred[1:], strict=False))
    assert all(c.lds < naive.rho1 / np.sqrt(naive.a_b) for c in pred)
    # one measured size: measured only, never extrapolated
    assert [c.members for c in p.candidates if c.family == "checkpoints"] == [3]
    assert any("checkpoints" in s for s in p.single)
    assert "one measured configuration" in p.unfitted["trak/checkpoints/*/*"]


def test_flat_fit_when_more_members_do_not_help(tmp_path):
    recs = [
        _rec("dropout-forward", 1, 10, 0.40, 3.0, 10.0, MB),
        _rec("dropout-forward", 1, 20, 0.38, 3.0, 11.0, MB),
    ]
    path = _write(tmp_path / "toy", recs)
    p = plan("toy", budget_train=None, budget_serve=None, budget_bytes=None, results=[path])
    pred = [c for c in p.candidates if not c.measured]
    assert pred and all(c.lds == pytest.approx(0.39) for c in pred)  # the mean, no gain
    assert "flat" in p.explain()


def test_hybrids_and_lora_adapters(tmp_path):
    recs = [
        _rec("none", 1, None, 0.30, 10.0, 5.0, 100 * MB),
        _rec("dropout", 2, 2, 0.40, 20.0, 20.0, 400 * MB),
        _rec("dropout", 3, 2, 0.42, 30.0, 30.0, 600 * MB),
        # LoRA: 10 s of model training + 5 s per adapter
        _rec("lora", 1, 2, 0.20, 20.0, 9.0, 9 * MB, model_train=10.0),
        _rec("lora", 1, 4, 0.22, 30.0, 11.0, 11 * MB, model_train=10.0),
    ]
    path = _write(tmp_path / "toy", recs)
    p = plan("toy", budget_train=None, budget_serve=None, budget_bytes=None, results=[path])
    by = _by_key(p)
    hyb = by["trak/dropout/k6/m2"]
    assert (hyb.label, hyb.family, hyb.measured) == ("6x2 dropout", "hybrid-dropout", False)
    assert hyb.train_s == pytest.approx(60.0) and hyb.serve_s == pytest.approx(60.0)
    assert "trak/dropout/k7/m2" not in by  # 2x the largest measured K
    lora = by["trak/lora/k1/m8/r8e2"]
    assert lora.train_s == pytest.approx(10.0 + 8 * 5.0)
    assert lora.lds <= 0.22 + CLIP_MARGIN + 1e-12


def test_explain_says_what_is_measured_and_what_predicted(toy):
    p = plan("toy", budget_train=35, budget_serve=25, budget_bytes=None, results=toy)
    text = p.explain()
    assert f"naive 3 (K=3, M=1, exact kernel): predicted LDS {_naive_theory(3):.4f}" in text
    assert "train 30.0 s ≤ 35.0 s ✓, serve 15.0 s ≤ 25.0 s ✓, space 300.0 MB (no budget)" in text
    assert "least squares on measured K = 1, 2, 4" in text
    assert "predicted from the theory fit of naive" in text
    assert "not extrapolated (one measured size): checkpoints" in text
    assert "naive 3" in text and "itself the best naive" in text
    assert str(toy[0]) in text


# --------------------------------------------------------------------------------- CLI


def test_cli_plan_on_the_committed_fmnist_results():
    path = ROOT / "benchmarks" / "results" / "fmnist-mlp" / "results.json"
    datagate.require(path.is_file(), f"needs the committed results {path}")
    budgets = ["--budget-train", "60s", "--budget-serve", "30s", "--budget-bytes", "500MB"]
    args = ["plan", "--setting", "fmnist-mlp", "--results", str(path), *budgets]
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    text = _text(result)
    kw = {"budget_train": 60.0, "budget_serve": 30.0, "budget_bytes": 500 * MB}
    expected = plan("fmnist-mlp", results=[path], **kw).recommendation
    assert expected.serve_s <= 30 and expected.train_s <= 60 and expected.bytes <= 500 * MB
    assert f"recommendation: {expected.headline()}" in text
    assert "Where the figures come from" in text


def test_cli_rejects_bad_budget_strings(toy):
    result = runner.invoke(app, ["plan", "--setting", "fmnist-mlp", "--budget-serve", "soon"])
    assert result.exit_code == 2
    assert "--budget-serve" in _text(result) and "60s, 90, 5m or 1.5h" in _text(result)


def test_plan_finds_the_committed_results_from_any_folder(tmp_path, monkeypatch):
    from etda.plan import default_results

    monkeypatch.chdir(tmp_path)  # no benchmarks/ here
    monkeypatch.delenv("ETDA_RESULTS", raising=False)
    found = default_results("fmnist-mlp")
    assert found and all(p.is_file() for p in found)
    assert found[0].parent.parent.name == "results"
