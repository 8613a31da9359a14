"""Mislabel detection: seeded label flips, ROC-AUC / found-at-x%, self-influence diagonals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import etda
from etda.evaluate.mislabel import (
    detection_report,
    flip_labels,
    noisy_setting,
    roc_auc,
    run_mislabel,
    self_influence,
    training_loss,
)
from etda.models import MLP
from etda.settings import get_setting

torch.set_num_threads(1)


def test_flips_are_seeded_exact_and_change_the_label() -> None:
    y = torch.arange(200) % 7
    y1, f1 = flip_labels(y, 0.1, num_classes=7, seed=3)
    y2, f2 = flip_labels(y, 0.1, num_classes=7, seed=3)
    y3, f3 = flip_labels(y, 0.1, num_classes=7, seed=4)
    assert torch.equal(y1, y2) and torch.equal(f1, f2)
    assert not torch.equal(f1, f3)
    assert int(f1.sum()) == 20
    assert bool((y1[f1] != y[f1]).all())  # every flipped label changed class
    assert torch.equal(y1[~f1], y[~f1])  # the others are untouched
    assert int(y1.min()) >= 0 and int(y1.max()) < 7
    # two classes: a flip must go to the other one
    yb, fb_ = flip_labels(torch.zeros(50, dtype=torch.long), 0.2, num_classes=2, seed=0)
    assert bool((yb[fb_] == 1).all())


def test_flip_bad_inputs() -> None:
    with pytest.raises(ValueError, match="fraction"):
        flip_labels(torch.zeros(5, dtype=torch.long), 1.5, 2)
    with pytest.raises(ValueError, match="2 classes"):
        flip_labels(torch.zeros(5, dtype=torch.long), 0.5)


def test_auc_of_perfect_reversed_and_tied_rankings() -> None:
    flipped = np.zeros(100, bool)
    flipped[:10] = True
    perfect = flipped.astype(float) + np.linspace(0, 0.1, 100)
    assert roc_auc(perfect, flipped) == 1.0
    assert roc_auc(-perfect, flipped) == 0.0
    assert roc_auc(np.ones(100), flipped) == 0.5
    # the same as scikit-learn's
    from sklearn.metrics import roc_auc_score

    s = np.random.default_rng(0).normal(size=100) + flipped
    assert roc_auc(s, flipped) == pytest.approx(roc_auc_score(flipped, s))


def test_detection_report_found_at_and_curve() -> None:
    flipped = np.zeros(100, bool)
    flipped[[3, 17, 40, 55, 60, 71, 80, 88, 90, 99]] = True
    rep = detection_report(flipped.astype(float), flipped)
    assert rep["auc"] == 1.0
    assert rep["found_at"] == {"5%": 0.5, "10%": 1.0, "20%": 1.0, "30%": 1.0}
    curve = rep["curve"]
    assert curve["inspected"][0] == 0.0 and curve["found"][0] == 0.0
    assert curve["found"][-1] == 1.0
    assert np.all(np.diff(curve["found"]) >= 0)
    worst = detection_report(-flipped.astype(float), flipped)
    assert worst["auc"] == 0.0 and worst["found_at"]["30%"] == 0.0


def _tiny(n: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    models = []
    for s in range(2):
        torch.manual_seed(s)
        models.append(MLP(6, (8,), 3, dropout=0.2).double().eval())
    return models, x, y


@pytest.mark.parametrize(
    ("method", "opts"),
    [
        ("graddot", {}),
        ("trak", {}),  # exact kernel: sample-space solve
        ("trak", {"proj_dim": 16, "projection": "gaussian", "damping": "trace:0.5"}),  # feature
        ("if", {"proj_dim": 16, "projection": "gaussian"}),
        ("if", {}),
    ],
)
def test_self_influence_is_the_diagonal_of_the_full_attribution(method, opts) -> None:
    models, x, y = _tiny()
    for ens, ms in ((None, models[:1]), (etda.Dropout(3, mode="fixed"), models)):
        diag = self_influence(ms, x, y, method, ens, dtype="float64", **opts)
        full = etda.attribute(ms, (x, y), (x, y), method, ens, dtype="float64", **opts)
        assert diag.shape == (x.shape[0],)
        np.testing.assert_allclose(diag, np.diag(full.values), rtol=1e-7, atol=1e-10)


def test_gradcos_self_influence_is_refused() -> None:
    models, x, y = _tiny()
    with pytest.raises(ValueError, match="cosine"):
        self_influence(models[0], x, y, "gradcos")


def test_training_loss_is_cross_entropy() -> None:
    models, x, y = _tiny()
    want = torch.nn.functional.cross_entropy(models[0](x), y, reduction="none").detach().numpy()
    np.testing.assert_allclose(training_loss(models[0], x, y), want, rtol=1e-10)


def test_noisy_setting_flips_and_overrides() -> None:
    s = noisy_setting("digits-mlp", 0.1, seed=1, dropout=0.0, epochs=3)
    clean = get_setting("digits-mlp").data()
    data = s.data()
    changed = (data.y_train != clean.y_train).numpy()
    assert changed.sum() == 100
    assert s.recipe.epochs == 3 and s.model_kwargs["dropout"] == 0.0
    assert s.fingerprint() != get_setting("digits-mlp").fingerprint()
    with pytest.raises(ValueError, match="no dropout"):
        noisy_setting("digits-logreg", dropout=0.0)


def test_run_mislabel_reports_baselines(tmp_path) -> None:
    rep = run_mislabel(
        "digits-logreg", "graddot", fraction=0.1, seed=0, epochs=5, model_dir=str(tmp_path)
    )
    assert rep["n_flipped"] == 100 and rep["n_train"] == 1000
    for key in ("self_influence", "loss", "random"):
        assert 0.0 <= rep[key]["auc"] <= 1.0
        assert set(rep[key]["found_at"]) == {"5%", "10%", "20%", "30%"}
    assert 0.3 < rep["random"]["auc"] < 0.7
    assert rep["loss"]["auc"] > 0.7  # flips are hard to fit: high loss
    assert rep["costs"]["train_s"] > 0 and 0.0 <= rep["memorized"] <= 1.0
