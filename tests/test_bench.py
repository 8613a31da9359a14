"""The benchmark runner: sweep tables, a tiny end-to-end run, resuming, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from etda.bench import FULL, QUICK, BenchConfig, MislabelConfig, Sweep, VarianceConfig, run_bench
from etda.bench import runner as bench_runner
from etda.bench.runner import adapt
from etda.cli import app
from etda.evaluate.lds import LDSConfig
from etda.settings import get_setting

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in the repository's runs/ or benchmarks/


def test_setting_sweeps() -> None:
    from etda.bench.sweeps import get_sweep

    assert get_sweep(setting="fmnist-mlp") is FULL and get_sweep(True, setting="x") is QUICK
    kjv = get_sweep(setting="kjv-transformer")
    gpt2 = get_sweep(setting="kjv-gpt2")  # the same table, one retraining seed per subset
    assert gpt2.configs == kjv.configs and gpt2.seeds_per_subset == 1
    keys = {c.key for c in kjv.configs}
    assert len(keys) == len(kjv.configs)
    # every method over naive 1/5, checkpoints and LoRA, on TensorSketch features
    for method in ("trak", "if", "gradcos", "graddot"):
        for k in (1, 5):
            assert f"{method}/none/k{k}/m1/d2048/factored" in keys
        assert f"{method}/lora/k1/m8/d2048/factored/r8e2" in keys
    for method in ("trak", "if", "gradcos"):
        assert f"{method}/checkpoints/k1/m5/d2048/factored" in keys
    assert "tracin/none/k1/m1/d2048/factored" in keys
    assert "trak/dropout/k1/m10/d2048/factored" in keys
    assert "trak/none/k1/m1/d2048/factored/damptrace:0.1" in keys
    # two seeds per subset: averaged in the ground truth, and its noise ceiling
    assert not kjv.mislabel and kjv.seeds_per_subset == 2 and kjv.n_subsets == 50
    assert not get_sweep(True, setting="kjv-transformer").mislabel
    cnn = {c.key for c in get_sweep(setting="fmnist2-cnn").configs}
    for key in ("trak/none/k8/m1", "trak/dropout/k1/m10", "trak/dropout/k2/m5", "if/none/k4/m1"):
        assert key in cnn
    only = get_sweep(setting="kjv-transformer", methods=["gradcos"])
    assert {c.method for c in only.configs} == {"gradcos"} and only.seeds_per_subset == 2


def test_sweep_tables() -> None:
    for sweep in (FULL, QUICK):
        keys = [c.key for c in sweep.configs]
        assert len(keys) == len(set(keys)), "configuration keys must be unique"
    full = {c.key for c in FULL.configs}
    # the benchmark of issue 4: TRAK over every ensemble kind and size
    for k in (1, 2, 5, 10):
        assert f"trak/none/k{k}/m1" in full
    for kind in ("dropout", "dropout-per-example", "dropout-forward"):
        for m in (10, 20, 50):
            assert f"trak/{kind}/k1/m{m}" in full
    for m in (4, 8, 16):
        assert f"trak/lora/k1/m{m}/r8e2" in full
    assert "trak/dropout/k2/m10" in full and "trak/checkpoints/k1/m5" in full
    assert "trak/projection-seeds/k1/m10/d512" in full
    for method in ("graddot", "gradcos", "if"):
        assert {f"{method}/none/k1/m1", f"{method}/none/k5/m1", f"{method}/dropout/k1/m10"} <= full
    assert FULL.variance is not None and FULL.variance.models * FULL.variance.members >= 10
    only = FULL.only(["graddot"])
    assert {c.method for c in only.configs} == {"graddot"}
    assert only.variance is None
    with pytest.raises(ValueError, match="unknown method"):
        FULL.only(["nope"])
    c = BenchConfig("trak", "dropout", 2, 10)
    assert c.label == "2x10 dropout" and c.family == "hybrid-dropout" and c.total_members == 20
    assert BenchConfig("trak", "none", 5).label == "naive 5"


def test_dropout_resolution() -> None:
    from etda.evaluate.mislabel import noisy_setting

    mlp, logreg = get_setting("digits-mlp"), get_setting("digits-logreg")
    c = BenchConfig("trak", "dropout", 1, 10)
    assert adapt(mlp, c) == (c, "")
    run, why = adapt(noisy_setting(mlp, 0.1, 0, dropout=0.0), c)  # trained without dropout
    assert run.p == 0.1 and "p=0.1" in why and run.key == "trak/dropout/k1/m10/p0.1"
    run, why = adapt(logreg, c)
    assert run is None and "no dropout layers" in why
    assert adapt(logreg, BenchConfig("trak", "lora", 1, 4))[0] is not None


TINY = Sweep(
    "tiny",
    (
        BenchConfig("trak", "none", 1),
        BenchConfig("trak", "none", 2),
        BenchConfig("trak", "dropout", 1, 2),
        BenchConfig("graddot", "none", 1),
    ),
    mislabel=(MislabelConfig("graddot", "none", 1), MislabelConfig("trak", "best-dropout", 1)),
    variance=VarianceConfig("trak", "dropout", 2, 2, predict_models=(1, 2), predict_members=(1, 4)),
)


def test_tiny_bench_end_to_end_and_resume(tmp_path, monkeypatch) -> None:
    kw = dict(
        sweep=TINY,
        out=tmp_path / "out",
        executor="inprocess",
        model_dir=tmp_path / "models",
        lds_cache=tmp_path / "lds",
        lds_config=LDSConfig(n_subsets=4),
        log=lambda s: None,
    )
    res = run_bench("digits-mlp", **kw)
    assert set(res["configs"]) == {c.key for c in TINY.configs}
    assert not res["failed"]
    for rec in res["configs"].values():
        assert -1 <= rec["lds"]["mean"] <= 1
        c = rec["costs"]
        assert c["train_s"] > 0 and c["serve_s"] > 0 and c["bytes"] > 0
        assert rec["fingerprint"] == get_setting("digits-mlp").fingerprint()
    naive1, naive2 = res["configs"]["trak/none/k1/m1"], res["configs"]["trak/none/k2/m1"]
    assert naive2["costs"]["train_s"] == pytest.approx(naive2["model_train_s"])
    assert naive2["costs"]["train_s"] > naive1["costs"]["train_s"]  # two trainings
    drop = res["configs"]["trak/dropout/k1/m2"]
    assert drop["costs"]["train_s"] == pytest.approx(naive1["costs"]["train_s"])  # one training
    assert drop["n_members"] == 2 and drop["damping"]["lam"]
    assert len(res["mislabel"]) == 2
    best = res["mislabel"]["trak/best-dropout/k1/flip0.1-s0"]
    assert best["ensemble"] == "dropout" and best["members"] == 2
    assert res["variance"]["stats"]["K"] == 2
    out = tmp_path / "out"
    for name in ("results.json", "report.md", "pareto_train.png", "mislabel.png", "variance.png"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.safetensors"))  # summaries only, never score matrices

    # Rerun: everything is in results.json, nothing is attributed again.
    calls = []
    real = bench_runner.run_config
    monkeypatch.setattr(
        bench_runner, "run_config", lambda *a, **k: calls.append(a) or real(*a, **k)
    )
    again = run_bench("digits-mlp", **kw)
    assert calls == [] and again["configs"] == res["configs"]
    # the wall time of every run is kept, not overwritten by the resumed one
    assert len(again["bench_runs_wall_s"]) == 2
    assert again["bench_runs_wall_s"][0] == pytest.approx(res["bench_wall_s"])
    assert again["bench_wall_s"] == pytest.approx(sum(again["bench_runs_wall_s"]))
    # A record from another setting fingerprint is stale: it is recomputed.
    data = json.loads((out / "results.json").read_text())
    data["configs"]["graddot/none/k1/m1"]["fingerprint"] = "0" * 64
    (out / "results.json").write_text(json.dumps(data))
    run_bench("digits-mlp", **{**kw, "sweep": TINY.only(["graddot"])})
    assert len(calls) == 1 and calls[0][1].key == "graddot/none/k1/m1"


def test_bench_cli_quick_one_method(tmp_path) -> None:
    out = tmp_path / "res"
    args = [
        "bench", "-s", "digits-logreg", "--quick", "--methods", "graddot", "--out", str(out),
        "--n-subsets", "3", "--executor", "inprocess", "--model-dir", str(tmp_path / "m"),
        "--lds-cache", str(tmp_path / "l"),
    ]  # fmt: skip
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "graddot naive 1: LDS" in result.output
    data = json.loads((out / "results.json").read_text())
    assert list(data["configs"]) == ["graddot/none/k1/m1"]
    assert (out / "report.md").is_file()
    bad = CliRunner().invoke(app, ["bench", "--methods", "nope", "--out", str(out)])
    assert bad.exit_code != 0
