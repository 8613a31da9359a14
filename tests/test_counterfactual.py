"""Counterfactual removal: removing a test example's top proponents (by TRAK) moves its
margin more than removing as many random training examples."""

from __future__ import annotations

import numpy as np

import etda
from etda.evaluate.counterfactual import removal_effects, removal_sets
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
