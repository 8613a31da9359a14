"""Counterfactual removal: removing a test example's top proponents (by TRAK) moves its
margin more than removing as many random training examples."""

from __future__ import annotations

import numpy as np
import pytest

import etda
from etda.evaluate.counterfactual import cleaning_effects, removal_effects, removal_sets
from etda.settings import get_setting
from etda.zoo import trained_models


def test_removal_sets() -> None:
    scores = np.array([[0.1, 0.9, -0.5, 0.3]])
    assert list(removal_sets(scores, 0, 2, 4, seed=0)) == [1, 3]
    r = removal_sets(None, 0, 2, 4, seed=0)
    assert len(set(r)) == 2 and list(r) == list(removal_sets(None, 0, 2, 4, seed=0))


def test_proponents_matter_more_than_random_examples(tmp_path) -> None:
    # regression guard on digits-logreg: measured margin drop 3.25 (TRAK) vs 0.013 (random)
    setting = get_setting("digits-logreg")
    data = setting.data()
    model = trained_models(setting, 1, tmp_path / "models")[0].model
    s = etda.attribute(
        model, (data.x_train, data.y_train), (data.x_test, data.y_test), method="trak"
    )
    out = removal_effects(setting, {"trak": s.values, "random": None}, [0, 1, 2], [60], seeds=[0])
    trak, rand = out["methods"]["trak"]["60"], out["methods"]["random"]["60"]
    assert trak["margin_drop"] > rand["margin_drop"] + 1.0
    assert 0.0 <= trak["flip_rate"] <= 1.0


def test_removing_nothing_reproduces_the_base_model_bit_for_bit() -> None:
    setting = get_setting("digits-logreg")
    n = setting.data().n_train
    scores = np.random.default_rng(0).normal(size=(3, n))
    out = removal_effects(setting, {"any": scores}, [0, 1], [0], seeds=[0])
    assert out["methods"]["any"]["0"] == {"flip_rate": 0.0, "margin_drop": 0.0}


def test_cleaning_removes_flipped_labels_first() -> None:
    from etda.evaluate.counterfactual import cleaning_effects
    from etda.evaluate.mislabel import flip_labels, noisy_setting

    base = get_setting("digits-logreg")
    noisy = noisy_setting(base, 0.2, 0)
    _, flipped = flip_labels(base.data().y_train, 0.2, base.data().num_classes, 0)
    oracle = flipped.numpy().astype(float)  # the flips ranked first
    test = np.arange(base.data().n_test)
    out = cleaning_effects(noisy, {"oracle": oracle, "random": None}, [0.0, 0.2], test, [0])
    m = out["methods"]
    assert m["oracle"]["0"] == m["none"]["0"]  # removing nothing: the base model exactly
    # regression guard (measured: accuracy 0.955 removing the flips, 0.910 at random, 0.930
    # removing nothing): removing the 20 % flips beats removing 20 % at random
    assert m["oracle"]["0.2"]["accuracy"] > m["random"]["0.2"]["accuracy"] + 0.02


# ------------------------------------------------------- harness properties (retrain cache)


def _blobs_setting(n: int = 60):
    """Two Gaussian blobs in 5 dimensions, logistic regression fitted to convergence
    (float64 full-batch gradient descent: deterministic and cheap to retrain n times)."""
    import torch
    from torch import nn

    from etda.usercode import UserSetting

    g = torch.Generator().manual_seed(0)

    def blobs(m: int) -> tuple:
        y = torch.randint(0, 2, (m,), generator=g)
        x = torch.randn(m, 5, generator=g, dtype=torch.float64) + 1.2 * (2 * y[:, None] - 1)
        return x, y

    def fit(x, y, seed):
        torch.manual_seed(seed)
        model = nn.Linear(5, 2).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(150):
            opt.zero_grad()
            (
                nn.functional.cross_entropy(model(x), y) + 1e-2 * model.weight.square().sum()
            ).backward()
            opt.step()
        return model.eval()

    return UserSetting("blobs", fit, blobs(n), blobs(6))


def test_an_oracle_ranking_beats_random_and_neighbours(tmp_path) -> None:
    # the oracle: each training example's leave-one-out effect on the test margin, by
    # retraining without it; removing the top-k by it must move margins most
    from etda.evaluate.counterfactual import counterfactual
    from etda.evaluate.retrain import retrain_many

    setting = _blobs_setting()
    n = setting.data().n_train
    full = np.ones(n, dtype=bool)
    jobs = [(full, 0)] + [(np.arange(n) != i, 0) for i in range(n)]
    run = retrain_many(setting, jobs, tmp_path, "inprocess", progress=False)
    base = run.results[0].output
    oracle = np.stack([base - r.output for r in run.results[1:]], axis=1)  # (n_test, n_train)
    out = counterfactual(setting, {"oracle": oracle}, 6, (10,), (0,), cache_dir=tmp_path)
    m = out["methods"]
    oracle_drop = m["oracle"]["6"]["margin_drop"]
    assert oracle_drop > m["random"]["6"]["margin_drop"] + 0.2
    assert oracle_drop > m["nearest neighbours"]["6"]["margin_drop"]


def test_resumed_runs_equal_uninterrupted_ones(tmp_path, monkeypatch) -> None:
    import etda.evaluate.retrain as retrain

    setting = _blobs_setting()
    scores = {"a": np.random.default_rng(0).normal(size=(6, setting.data().n_train))}
    fresh = removal_effects(
        setting, dict(scores), [0, 2, 4], [5, 15], (0, 1), cache_dir=tmp_path / "fresh"
    )
    real, calls = retrain.retrain_eval, []

    def dies_after_five(*args):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(retrain, "retrain_eval", dies_after_five)
    with pytest.raises(KeyboardInterrupt):
        removal_effects(
            setting, dict(scores), [0, 2, 4], [5, 15], (0, 1), cache_dir=tmp_path / "resumed"
        )
    monkeypatch.setattr(retrain, "retrain_eval", real)
    resumed = removal_effects(
        setting, dict(scores), [0, 2, 4], [5, 15], (0, 1), cache_dir=tmp_path / "resumed"
    )
    assert resumed["methods"] == fresh["methods"]
    assert resumed["costs"]["cached"] == 5 and resumed["costs"]["trained"] == 14 - 5


def test_a_corrupt_or_foreign_job_file_is_recomputed(tmp_path) -> None:
    from etda.evaluate.retrain import cache_folder, job_name, retrain_many

    setting = _blobs_setting()
    n = setting.data().n_train
    jobs = [(np.ones(n, dtype=bool), 0), (np.arange(n) >= 3, 1)]
    first = retrain_many(setting, jobs, tmp_path, "inprocess", progress=False)
    folder = cache_folder(setting, tmp_path)
    (folder / job_name(*jobs[0])).write_bytes(b"not a zip")
    # a file holding another job under this job's name (a hash collision or a copy)
    (folder / job_name(*jobs[1])).write_bytes((folder / job_name(*jobs[0])).read_bytes())
    with pytest.warns(RuntimeWarning, match="corrupt retraining job"):
        again = retrain_many(setting, jobs, tmp_path, "inprocess", progress=False)
    assert again.trained == 2
    for a, b in zip(first.results, again.results, strict=True):
        np.testing.assert_array_equal(a.output, b.output)


def test_the_full_training_set_reproduces_the_trained_model_bit_for_bit(tmp_path) -> None:
    from etda.evaluate.retrain import evaluate_model, retrain_many

    setting = get_setting("digits-logreg")
    n = setting.data().n_train
    model = trained_models(setting, 1, tmp_path / "models")[0].model
    run = retrain_many(
        setting, [(np.ones(n, dtype=bool), 0)], tmp_path, "inprocess", progress=False
    )
    for got, want in zip(
        (run.results[0].output, run.results[0].loss, run.results[0].pred),
        evaluate_model(setting, model),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want)


def test_process_workers_give_the_in_process_numbers(tmp_path) -> None:
    from etda.evaluate.mislabel import noisy_setting

    noisy = noisy_setting("digits-logreg", 0.2, 0)  # not registered: shipped to the workers
    rank = {"r": np.random.default_rng(1).normal(size=noisy.data().n_train)}
    test = np.arange(0, noisy.data().n_test, 2)
    a = cleaning_effects(noisy, rank, [0.1], test, [0, 1], tmp_path / "a", "inprocess")
    b = cleaning_effects(noisy, rank, [0.1], test, [0, 1], tmp_path / "b", "process", workers=2)
    assert a["methods"] == b["methods"]


def test_neighbour_scores_are_minus_squared_distances() -> None:
    from etda.evaluate.counterfactual import neighbour_scores

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 2, 3)), rng.normal(size=(4, 2, 3))
    got = neighbour_scores(a, b)
    want = -((b.reshape(4, 1, 6) - a.reshape(1, 7, 6)) ** 2).sum(-1)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got.shape == (4, 7)


def test_bad_inputs_are_clear() -> None:
    from etda.evaluate.counterfactual import counterfactual
    from etda.evaluate.retrain import retrain_many

    setting = _blobs_setting()
    n = setting.data().n_train
    with pytest.raises(ValueError, match="expected \\(n_test, 60\\)"):
        removal_effects(setting, {"a": np.zeros((6, 5))}, [0], [3])
    with pytest.raises(ValueError, match="bool mask"):
        retrain_many(setting, [(np.ones(n), 0)], progress=False)
    with pytest.raises(ValueError, match="keeps no training example"):
        retrain_many(setting, [(np.zeros(n, dtype=bool), 0)], progress=False)
    with pytest.raises(ValueError, match="unknown baseline"):
        counterfactual(setting, {}, 2, (10,), baselines=("knn",))
    with pytest.raises(TypeError, match="lacks"):
        retrain_many(object(), [], progress=False)


def test_counterfactual_and_clean_commands_on_a_built_in_setting(tmp_path, monkeypatch) -> None:
    import json

    from typer.testing import CliRunner

    from etda.cli import app

    monkeypatch.setenv("ETDA_CACHE_DIR", str(tmp_path))
    common = ["-s", "digits-logreg", "--seeds", "1", "--json", "--no-progress"]
    args = ["counterfactual", *common, "-m", "if", "--tests", "2", "--percent", "10"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert set(out["methods"]) == {"if", "random", "nearest neighbours"}
    # removing 10 % of the training set by IF moves the margins more than at random
    assert (
        out["methods"]["if"]["100"]["margin_drop"] > out["methods"]["random"]["100"]["margin_drop"]
    )
    args = ["clean", *common, "--noise", "0.1", "-m", "if", "--percent", "5"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)["methods"]
    assert {"none", "if harm", "random", "training loss"} <= set(got)
