"""The ``etda`` command line and the experiment helpers behind it (tiny digits settings)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from typer.testing import CliRunner

from etda import Checkpoints, Dropout, Independent, LoRA, ProjectionSeeds, Scores
from etda.cli import app
from etda.experiment import (
    ENSEMBLES,
    checkpoint_schedule,
    ensemble_kind,
    make_ensemble,
    parse_damping,
    run_attribution,
)

runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})


def _text(result) -> str:
    """Everything the user saw (stdout and stderr), boxes and line breaks flattened."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())


def _invoke(args: list[str], tmp_path) -> object:
    caches = []
    if args[0] in ("attribute", "train"):
        caches += ["--model-dir", str(tmp_path / "models")]
    if args[0] in ("attribute", "lds"):
        caches += ["--lds-cache", str(tmp_path / "lds")]
    return runner.invoke(app, [*args, *caches, "--no-progress"], catch_exceptions=False)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in the repository's runs/


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("attribute", "lds", "train", "settings"):
        assert command in result.output
    result = runner.invoke(app, ["attribute", "--help"])
    assert result.exit_code == 0
    for option in ("--method", "--ensemble", "--members", "--damping", "--lds"):
        assert option in result.output


def test_settings_lists_the_named_settings():
    result = runner.invoke(app, ["settings"])
    assert result.exit_code == 0
    assert "digits-mlp" in result.output and "fmnist-mlp" in result.output


def test_attribute_writes_loadable_scores(tmp_path):
    out = tmp_path / "scores"
    result = _invoke(
        ["attribute", "-s", "digits-logreg", "-m", "graddot", "--no-lds", "--out", str(out)],
        tmp_path,
    )
    assert result.exit_code == 0, result.output
    scores = Scores.load(out)
    assert scores.shape == (200, 1000)
    assert scores.method == "graddot"
    assert scores.config["setting"]["name"] == "digits-logreg"
    assert scores.costs.train_s > 0  # the model's training time is part of the cost
    text = _text(result)
    assert "serve" in text and "proponents" in text and "LDS" not in text

    # Second run: the model comes from the cache, with its original training time.
    again = _invoke(
        ["attribute", "-s", "digits-logreg", "-m", "graddot", "--no-lds", "--out", str(out)],
        tmp_path,
    )
    assert again.exit_code == 0, again.output
    reused = Scores.load(out)
    assert reused.config["models"][0]["cached"]
    assert reused.costs.train_s == scores.costs.train_s
    np.testing.assert_array_equal(reused.values, scores.values)


def test_attribute_with_lds_and_a_cheap_ensemble(tmp_path):
    out = tmp_path / "trak"
    args = ["attribute", "-s", "digits-mlp", "-m", "trak", "-e", "dropout-forward", "-M", "2"]
    args += ["--lds", "--n-subsets", "3", "--executor", "inprocess", "--out", str(out)]
    result = _invoke(args, tmp_path)
    assert result.exit_code == 0, result.output
    scores = Scores.load(out)
    info = scores.config["lds"]
    assert info["jobs_trained"] == 3 and info["jobs_cached"] == 0
    assert -1.0 <= info["mean"] <= 1.0
    assert len(scores.config["members"]) == 2
    text = _text(result)
    assert "LDS" in text and "damping" in text

    # The ground truth is reused by the lds command.
    result = _invoke(
        ["lds", "-s", "digits-mlp", "--n-subsets", "3", "--executor", "inprocess"], tmp_path
    )
    assert result.exit_code == 0, result.output
    assert "3 cached, 0 trained" in _text(result)


def test_train_prints_accuracy_and_seconds(tmp_path):
    result = _invoke(["train", "-s", "digits-logreg", "--models", "2"], tmp_path)
    assert result.exit_code == 0, result.output
    text = _text(result)
    assert "test acc" in text and text.count("trained") >= 2
    result = _invoke(["train", "-s", "digits-logreg", "--models", "2"], tmp_path)
    assert _text(result).count("cache") >= 2


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["-m", "nosuchmethod"], "nosuchmethod"),
        (["-s", "nosuchsetting"], "nosuchsetting"),
        (["-e", "bagging"], "bagging"),
        (["-M", "0"], "--members"),
        (["--models", "-1"], "--models"),
        (["--projection", "pca"], "pca"),
        (["--damping", "lots"], "lots"),
        (["-m", "graddot", "--damping", "0.1"], "no damping"),
        (["--lds", "--n-subsets", "1"], "--n-subsets"),
    ],
)
def test_bad_options_are_usage_errors(tmp_path, args, needle):
    result = _invoke(["attribute", "-s", "digits-logreg", *args], tmp_path)
    assert result.exit_code == 2
    assert needle in _text(result)
    assert not (tmp_path / "models").exists()  # rejected before any training


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["-e", "none", "-M", "3"], "exactly one member"),
        (["-m", "graddot", "-e", "dropout-forward"], "dropout-forward"),
        (["-m", "tracin", "-e", "checkpoints"], "TracIn"),
        (["-e", "checkpoints", "-M", "60"], "60 checkpoints"),
        (["-e", "dropout"], "no dropout layers"),
        (["--projection", "none", "--proj-dim", "8"], "proj_dim=8 has no effect"),
        (["--projection", "identity", "--proj-dim", "8"], "projection='identity'"),
    ],
)
def test_bad_combinations_are_reported_in_red(tmp_path, args, needle):
    result = _invoke(["attribute", "-s", "digits-logreg", "--no-lds", *args], tmp_path)
    assert result.exit_code == 2
    assert "error:" in result.stderr and needle in _text(result)
    assert not (tmp_path / "models").exists()  # rejected before any training


def test_attribute_repair_recomputes_a_damaged_store(tmp_path):
    """A flipped byte in the feature store: refused in red, naming --repair; with --repair
    the damaged rows are recomputed and the scores are those of the undamaged run."""
    store = tmp_path / "store"
    args = ["attribute", "-s", "digits-logreg", "-m", "graddot", "--no-lds"]
    args += ["--projection", "gaussian", "--proj-dim", "16", "--store", str(store)]
    first = _invoke([*args, "--out", str(tmp_path / "a")], tmp_path)
    assert first.exit_code == 0, first.output
    phi = store / "member-000" / "train" / "phi.npy"
    raw = bytearray(phi.read_bytes())
    raw[-5] ^= 0xFF  # the last training example
    phi.write_bytes(bytes(raw))
    refused = _invoke([*args, "--out", str(tmp_path / "b")], tmp_path)
    assert refused.exit_code == 2
    assert "error:" in refused.stderr and "fail their checksum" in _text(refused)
    assert "--repair" in _text(refused)
    repaired = _invoke([*args, "--repair", "--out", str(tmp_path / "c")], tmp_path)
    assert repaired.exit_code == 0, repaired.output
    np.testing.assert_array_equal(
        Scores.load(tmp_path / "c").values, Scores.load(tmp_path / "a").values
    )
    assert Scores.load(tmp_path / "c").config["options"]["repair"] is True


# ------------------------------------------------------------------ experiment helpers


def test_make_ensemble_covers_every_kind():
    built = {kind: make_ensemble(kind, None if kind == "none" else 2) for kind in ENSEMBLES}
    assert type(built["none"]) is Independent
    assert isinstance(built["checkpoints"], Checkpoints)
    assert isinstance(built["projection-seeds"], ProjectionSeeds)
    assert isinstance(built["lora"], LoRA) and built["lora"].n_members == 2
    assert isinstance(built["dropout"], Dropout) and built["dropout"].mode == "fixed"
    assert built["dropout-per-example"].mode == "per-example"
    assert built["dropout-forward"].forward_only
    for kind, ens in built.items():
        assert ensemble_kind(ens) == kind
    with pytest.raises(ValueError, match="unknown ensemble"):
        make_ensemble("bagging")
    with pytest.raises(ValueError, match="positive"):
        make_ensemble("dropout", 0)
    with pytest.raises(ValueError, match="dropout"):
        make_ensemble("lora", 2, p=0.1)


def test_checkpoint_schedule_and_damping_parsing():
    assert checkpoint_schedule(20, 5) == [4, 8, 12, 16, 20]
    assert checkpoint_schedule(5, 4) == [1, 3, 4, 5]
    assert checkpoint_schedule(3, 3) == [1, 2, 3]
    with pytest.raises(ValueError):
        checkpoint_schedule(3, 4)
    assert parse_damping(None) is None
    assert parse_damping("auto") == "auto"
    assert parse_damping("trace:0.1") == "trace:0.1"
    assert parse_damping("1e-3") == pytest.approx(1e-3)
    for bad in ("-1", "trace:x", "nan", "big"):
        with pytest.raises(ValueError):
            parse_damping(bad)


def test_run_attribution_checkpoints_and_tracin(tmp_path):
    common = {"model_dir": tmp_path / "models", "progress": False}
    scores, result = run_attribution("digits-mlp", "graddot", "checkpoints", members=2, **common)
    assert result is None
    assert scores.config["checkpoint_epochs"] == [10, 20]
    assert len(scores.config["members"]) == 2
    tracin, _ = run_attribution("digits-mlp", "tracin", "none", n_checkpoints=2, **common)
    assert tracin.shape == (200, 1000)
    assert tracin.config["models"][0]["cached"]  # reuses the run with its checkpoints
    assert tracin.config["tracin_checkpoint_bytes"] > 0
