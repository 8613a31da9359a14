"""Reports from a tiny synthetic results.json: files, Pareto fronts, equal-LDS interpolation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from etda.bench.sweeps import BenchConfig
from etda.cli import app
from etda.evaluate.mislabel import detection_report
from etda.report import (
    equal_lds_ratios,
    naive_cost_at,
    naive_curve,
    pareto_front,
    records,
    write_report,
)


def _rec(cfg: BenchConfig, lds: float, train: float, serve: float, nbytes: int) -> dict:
    return {
        **cfg.to_dict(),
        "lds": {"mean": lds, "sem": 0.01},
        "costs": {
            "train_s": train,
            "featurize_train_s": serve / 2,
            "featurize_test_s": serve / 4,
            "score_s": serve / 4,
            "serve_s": serve,
            "weights_bytes": nbytes // 2,
            "feature_bytes": nbytes // 2,
            "bytes": nbytes,
            "flops": 1e9,
        },
        "n_members": cfg.total_members,
        "damping": {"summary": "spectral-mean: λ = 1", "lam": [1.0], "c": [1.0], "rule": ["x"]},
        "projection": "none",
        "proj_dim": None,
    }


def synthetic_results() -> dict:
    naive = [(1, 0.1, 1.0), (2, 0.2, 2.0), (4, 0.3, 4.0)]  # (K, LDS, cost)
    recs = [_rec(BenchConfig("trak", "none", k), q, c, c, int(c * 1000)) for k, q, c in naive]
    recs += [
        _rec(BenchConfig("trak", "dropout", 1, 10), 0.25, 1.0, 2.0, 3000),  # between 2 and 4
        _rec(BenchConfig("trak", "lora", 1, 4), 0.05, 1.5, 1.0, 500),  # below naive 1
        _rec(BenchConfig("trak", "dropout", 2, 10), 0.35, 2.0, 4.0, 6000),  # above naive 4
        _rec(BenchConfig("graddot", "none", 1), 0.08, 1.0, 0.2, 1000),
    ]
    flipped = np.zeros(200, bool)
    flipped[::10] = True
    rng = np.random.default_rng(0)
    rep = {
        "label": "trak naive 1",
        "fraction": 0.1,
        "seed": 0,
        "n_train": 200,
        "n_flipped": 20,
        "memorized": 0.05,
        "self_influence": detection_report(flipped + rng.normal(0, 0.4, 200), flipped),
        "loss": detection_report(flipped + rng.normal(0, 0.5, 200), flipped),
        "random": detection_report(rng.random(200), flipped),
        "costs": recs[0]["costs"],
    }
    pred = [
        {
            "K": k,
            "M": m,
            "variance": 1.0 / (k * m),
            "relative": 1.0 / (k * m),
            "correlation": 0.1 * math.sqrt(k * m),
        }
        for k in (1, 2, 5)
        for m in (1, 2, 10)
    ]
    meas = [
        {
            "K": k,
            "M": m,
            "spearman": 0.1 * math.sqrt(k * m) - 0.01,
            "pearson": 0.1 * math.sqrt(k * m),
            "variance": 1.0 / (k * m),
            "draws": 4,
        }
        for k in (1, 2)
        for m in (1, 2)
    ]
    return {
        "format": 1,
        "setting": {
            "name": "toy",
            "fingerprint": "f" * 64,
            "description": "toy",
            "n_train": 200,
            "n_test": 10,
        },
        "lds_config": {"n_subsets": 5, "fraction": 0.5, "seeds_per_subset": 1, "seed": 0},
        "ground_truth": {"retrain_seconds": 3.0},
        "sweep": "quick",
        "configs": {r["key"]: r for r in recs},
        "skipped": {"trak/dropout-forward/k1/m5": "a reason"},
        "failed": {},
        "mislabel": {"trak/none/k1/flip0.1-s0": rep},
        "variance": {
            "stats": {
                "v": 1.0,
                "c_w": 0.6,
                "c_b": 0.2,
                "K": 2,
                "M": 2,
                "D": 5,
                "r": 0.1,
                "var_y": 1.0,
            },
            "predicted": pred,
            "measured": meas,
            "method": "trak",
            "ensemble": "dropout",
            "models": 2,
            "members": 2,
            "combined_lds": {"mean": 0.2, "sem": 0.01},
            "note": "a note",
        },
    }


def test_pareto_front() -> None:
    cost = [1.0, 2.0, 2.0, 3.0, 0.5, 4.0]
    lds = [0.2, 0.1, 0.3, 0.3, 0.05, 0.4]
    # 1: dominated by 0; 3: same LDS as 2 at a higher cost; 4 cheapest; 5 best
    assert pareto_front(cost, lds).tolist() == [True, False, True, False, True, True]
    assert pareto_front([1.0, 1.0], [0.2, 0.2]).tolist() == [True, True]  # ties both stay


def test_naive_interpolation_is_log_linear() -> None:
    lds, cost = [0.1, 0.2, 0.3], [1.0, 2.0, 4.0]
    assert naive_cost_at(0.2, lds, cost) == (2.0, "interpolated")
    c, status = naive_cost_at(0.25, lds, cost)
    assert status == "interpolated" and c == pytest.approx(math.sqrt(8))
    c, _ = naive_cost_at(0.15, lds, cost)
    assert c == pytest.approx(math.sqrt(2))
    assert naive_cost_at(0.05, lds, cost) == (1.0, "below")
    assert naive_cost_at(0.35, lds, cost) == (4.0, "above")
    # a noisy, non-monotone naive curve: the first bracketing segment wins
    c, status = naive_cost_at(0.25, [0.1, 0.3, 0.28], [1.0, 2.0, 4.0])
    assert status == "interpolated" and c == pytest.approx(2**0.75)


def test_equal_lds_ratios_have_known_values() -> None:
    rows = {r["label"]: r for r in equal_lds_ratios(synthetic_results())}
    d = rows["dropout 10"]
    assert d["status"] == "interpolated"
    assert d["ratios"]["train_s"] == pytest.approx(1.0 / math.sqrt(8))
    assert d["ratios"]["serve_s"] == pytest.approx(2.0 / math.sqrt(8))
    assert d["ratios"]["bytes"] == pytest.approx(3000 / (1000 * math.sqrt(8)))
    # model storage apart from the features: the weights are half of each record's bytes
    assert d["ratios"]["weights_bytes"] == pytest.approx(1500 / (500 * math.sqrt(8)))
    assert d["naive"]["weights_bytes"] == pytest.approx(500 * math.sqrt(8))
    assert d["naive_models"] == pytest.approx(math.sqrt(8))  # naive sizes 1, 2, 4
    assert rows["LoRA 4"]["status"] == "below"
    assert rows["LoRA 4"]["ratios"]["train_s"] == pytest.approx(1.5)
    assert rows["2x10 dropout"]["status"] == "above"
    assert rows["2x10 dropout"]["ratios"]["train_s"] == pytest.approx(0.5)
    assert "naive 1" not in rows  # naive ensembles are the reference, not rows


def test_a_damping_variant_is_compared_with_the_default_naive_curve() -> None:
    results = synthetic_results()
    damped = BenchConfig("trak", "none", 2, damping="trace:0.1")
    assert damped.label == "naive 2 (damping trace:0.1)" and damped.family == "naive"
    results["configs"][damped.key] = _rec(damped, 0.25, 2.0, 4.0, 2000)
    rows = {r["label"]: r for r in equal_lds_ratios(results)}
    row = rows["naive 2 (damping trace:0.1)"]
    assert row["ratios"]["train_s"] == pytest.approx(2.0 / math.sqrt(8))  # default naive 1, 2, 4
    assert [r["models"] for r in naive_curve(records(results), "trak")] == [1, 2, 4]


def test_report_writes_every_file(tmp_path) -> None:
    (tmp_path / "results.json").write_text(json.dumps(synthetic_results()))
    files = write_report(tmp_path)
    names = sorted(f.name for f in files)
    assert names == sorted(
        [
            "report.md",
            "pareto_train.png",
            "pareto_serve.png",
            "pareto_bytes.png",
            "mislabel.png",
            "variance.png",
        ]
    )
    for f in files:
        assert f.stat().st_size > 0
    text = (tmp_path / "report.md").read_text()
    for needle in (
        "## Summary",
        "## Ratios to the naive ensemble of equal LDS",
        "## Mislabel detection",
        "## Ensemble-variance theory",
        "![pareto_train](pareto_train.png)",
        "One panel per method",
        "≥ 1.500",  # LoRA below naive 1: a lower bound
        "≤ 0.500",  # the hybrid above naive 4: an upper bound
        "a reason",
        "| train | serve | space | model storage |",
        "models ",  # the summary's model-storage ratio
    ):
        assert needle in text, needle


def test_report_cli(tmp_path) -> None:
    (tmp_path / "results.json").write_text(json.dumps(synthetic_results()))
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "report.md" in result.output
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert missing.exit_code == 2
