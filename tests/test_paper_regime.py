"""The paper's regime in ``etda bench --regime paper``: naive models on half subsets, k = 512
projections seeded per member and no damping, with every seed system of the paper."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from etda.bench import BenchConfig, Sweep, run_bench
from etda.bench.runner import default_out
from etda.bench.sweeps import PAPER_REGIME, get_sweep, paper_sweep
from etda.cli import app
from etda.evaluate.lds import LDSConfig
from etda.settings import get_setting, model_subset

torch.set_num_threads(1)

# recorded before ``train_fraction`` existed: a setting without it keeps its fingerprint
DIGITS_MLP = "84623e967925e26c3611b72086173b87bad3de8600cb6ac91d579e7d5b254656"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_model_subsets_are_per_seed_halves_and_fingerprints_stay() -> None:
    a, b = model_subset(1000, 0.5, 0), model_subset(1000, 0.5, 1)
    assert a.shape == (500,) and np.all(np.diff(a) > 0) and a.max() < 1000
    assert np.array_equal(a, model_subset(1000, 0.5, 0)) and not np.array_equal(a, b)
    base = get_setting("digits-mlp")
    assert base.fingerprint() == DIGITS_MLP
    half = replace(base, train_fraction=0.5)
    assert half.fingerprint() != DIGITS_MLP
    assert replace(half, train_fraction=None).fingerprint() == DIGITS_MLP
    with pytest.raises(ValueError, match="train_fraction"):
        replace(base, train_fraction=1.5)


def test_a_half_subset_model_trains_on_its_own_half() -> None:
    base = get_setting("digits-mlp")
    half = replace(base, train_fraction=0.5)
    data = base.data()
    idx = torch.from_numpy(model_subset(data.n_train, 0.5, 3))
    got = half.train(3).model.state_dict()
    want = base.train(3, subset=idx).model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    other = base.train(3).model.state_dict()
    assert not all(torch.equal(got[k], other[k]) for k in other)


def test_paper_configs_name_their_regime() -> None:
    c = BenchConfig("trak", "dropout-per-example", 1, 10, regime="paper")
    assert c.options == {"proj_dim": 512, "damping": 0.0} == PAPER_REGIME
    assert c.key == "trak/dropout-per-example/k1/m10/paper" and c.label == "dropout/ex 10"
    assert BenchConfig("trak", regime="paper", proj_dim=2048).options["proj_dim"] == 2048
    assert BenchConfig("trak").options == {"proj_dim": None, "damping": None}
    half = BenchConfig("trak", "none", 5, regime="paper", train_fraction=0.5)
    assert half.family == "naive-subsets" and half.label == "naive 5 (halves)"
    assert half.key == "trak/none/k5/m1/paper/frac0.5"
    with pytest.raises(ValueError, match="regime"):
        BenchConfig("trak", regime="nope")
    with pytest.raises(ValueError, match="train_fraction"):
        BenchConfig("trak", train_fraction=1.0)


def test_the_paper_sweep_has_every_seed_system() -> None:
    sweep = get_sweep(setting="fmnist-mlp", regime="paper")
    keys = {c.key for c in sweep.configs}
    assert len(keys) == len(sweep.configs) and {c.regime for c in sweep.configs} == {"paper"}
    for k in (1, 2, 5):
        assert f"trak/none/k{k}/m1/paper" in keys and f"trak/none/k{k}/m1/paper/frac0.5" in keys
    for kind in ("dropout", "dropout-per-example", "dropout-forward"):
        assert f"trak/{kind}/k1/m10/paper" in keys
    assert "trak/lora/k1/m8/paper/r8e2" in keys and "trak/dropout-per-example/k2/m5/paper" in keys
    text = paper_sweep("kjv-transformer")
    assert text.seeds_per_subset == 2 and sweep.name_regime == "paper"
    assert default_out("fmnist-mlp", False, "paper").name == "fmnist-mlp-paper"
    with pytest.raises(ValueError, match="regime"):
        get_sweep(regime="other")


def test_a_tiny_paper_run_projects_undamped_and_trains_halves(tmp_path) -> None:
    sweep = Sweep(
        "paper",
        (
            BenchConfig("trak", "none", 1, regime="paper", proj_dim=64),
            BenchConfig("trak", "none", 2, regime="paper", proj_dim=64, train_fraction=0.5),
            BenchConfig("trak", "dropout-per-example", 1, 2, regime="paper", proj_dim=64),
        ),
    )
    res = run_bench(
        "digits-mlp",
        sweep=sweep,
        out=tmp_path / "out",
        executor="inprocess",
        model_dir=tmp_path / "models",
        lds_cache=tmp_path / "lds",
        lds_config=LDSConfig(n_subsets=4),
        mislabel=False,
        variance=False,
        log=lambda s: None,
    )
    assert not res["failed"] and len(res["configs"]) == 3
    for rec in res["configs"].values():
        assert rec["proj_dim"] == 64 and rec["damping"]["lam"] == [0.0] * rec["n_members"]
        assert rec["projection"] == "factored"
    half = res["configs"]["trak/none/k2/m1/d64/paper/frac0.5"]
    assert half["family"] == "naive-subsets" and half["n_models_trained"] == 2
    # the half-subset models have their own cache folder (another fingerprint)
    folders = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert len(folders) == 2 and all(f.startswith("digits-mlp-") for f in folders)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "naive 2 (halves)" in report


def test_bench_cli_regime_paper_refuses_quick(tmp_path) -> None:
    result = CliRunner().invoke(app, ["bench", "--quick", "--regime", "paper"])
    assert result.exit_code != 0 and "paper" in result.output
    bad = CliRunner().invoke(app, ["bench", "--regime", "nope"])
    assert bad.exit_code != 0
    assert json.dumps(PAPER_REGIME)  # the regime is plain data, recorded as is
