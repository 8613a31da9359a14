"""The cross-setting tables written from committed results: the cheap-ensemble targets
(``benchmarks/targets.py``) and the paper regime beside etda's (``benchmarks/paper_regime.py``)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import paper_regime, targets


def _rec(key: str, label: str, family: str, models: int, lds: float, **costs: float) -> dict:
    method, ensemble = key.split("/")[:2]
    return {
        "key": key,
        "label": label,
        "family": family,
        "method": method,
        "ensemble": ensemble,
        "models": models,
        "m": 10 if "m10" in key else 5 if "m5" in key else 1,
        "lds": {"mean": lds, "sem": 0.01},
        "costs": {"train_s": 1.0, "serve_s": 1.0, "weights_bytes": 100, **costs},
    }


def _write(root, name: str, recs: list[dict]) -> None:
    (root / name).mkdir(parents=True, exist_ok=True)
    payload = {"configs": {r["key"]: r for r in recs}}
    (root / name / "results.json").write_text(json.dumps(payload))


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(targets, "RESULTS", tmp_path)
    monkeypatch.setattr(paper_regime, "RESULTS", tmp_path)
    naive = [
        _rec(f"trak/none/k{k}/m1", f"naive {k}", "naive", k, lds, train_s=10.0 * k,
             serve_s=4.0 * k, weights_bytes=100 * k)
        for k, lds in ((1, 0.2), (4, 0.3), (8, 0.34))
    ]  # fmt: skip
    cheap = [
        _rec("trak/checkpoints/k1/m5", "checkpoints 5", "checkpoints", 1, 0.33,
             train_s=10.0, serve_s=20.0, weights_bytes=500),
        _rec("trak/dropout/k1/m10", "dropout 10", "dropout", 1, 0.25,
             train_s=10.0, serve_s=8.0, weights_bytes=100),
        _rec("trak/none/k1/m1/damptrace:0.1", "naive 1", "naive", 1, 0.5),
    ]  # fmt: skip
    _write(tmp_path, "s", naive + cheap)
    return tmp_path


def test_targets_compare_with_an_interpolated_naive_5(results) -> None:
    rows = targets.candidates("s")
    # the re-damped naive ensemble is a reference, not a candidate
    # most parts of the target met first: dropout meets 3 (not LDS), checkpoints 2
    assert [r["label"] for r in rows] == ["dropout 10", "checkpoints 5"]
    ck = rows[1]
    lds5 = 0.3 + (math.log(5) - math.log(4)) / (math.log(8) - math.log(4)) * 0.04
    assert ck["naive5"]["lds"] == pytest.approx(lds5)
    naive5_train = 40 + (math.log(5) - math.log(4)) / math.log(2) * 40
    assert ck["ratios"]["train_s"] == pytest.approx(10 / naive5_train)
    assert ck["met"] == {"lds": True, "train_s": True, "serve_s": False, "weights_bytes": False}
    naive5_serve = 16 + (math.log(5) - math.log(4)) / math.log(2) * 16
    assert rows[0]["ratios"]["serve_s"] == pytest.approx(8 / naive5_serve)
    assert rows[0]["met"] == {"lds": False, "train_s": True, "serve_s": True, "weights_bytes": True}
    assert "checkpoints 5" in targets.markdown({"s": rows})


def test_the_paper_table_pairs_each_system_with_its_default_regime_row(results) -> None:
    paper = [
        _rec(f"trak/none/k{k}/m1/paper", f"naive {k}", "naive", k, lds, train_s=10.0 * k)
        for k, lds in ((1, 0.1), (5, 0.3))
    ]
    paper += [
        _rec("trak/none/k5/m1/paper/frac0.5", "naive 5 (halves)", "naive-subsets", 5, 0.35),
        _rec("trak/dropout/k1/m10/paper", "dropout 10", "dropout", 1, 0.2, train_s=10.0),
    ]
    _write(results, "s-paper", paper)
    table = paper_regime.setting_rows("s")
    row = next(r for r in table["rows"] if r["label"] == "dropout 10")
    assert row["recovered"] == pytest.approx(0.5)  # halfway from naive 1 to naive 5
    assert row["default_lds"] == 0.25  # trak/dropout/k1/m10 of the default sweep
    # the default sweep measured naive 1, 4 and 8: its naive 5 is interpolated
    five = 0.3 + (math.log(5) - math.log(4)) / (math.log(8) - math.log(4)) * 0.04
    assert row["default_recovered"] == pytest.approx((0.25 - 0.2) / (five - 0.2))
    # LDS 0.2 lies halfway between naive 1 and 5: cost interpolated log-linearly
    assert row["vs_naive"]["train_s"] == pytest.approx(10 / math.sqrt(10 * 50))
    assert row["vs_naive"]["models"] == pytest.approx(math.sqrt(5))
    assert paper_regime.setting_rows("missing") is None
    assert "dropout 10" in paper_regime.markdown([table])
