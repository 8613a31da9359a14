"""Group-level LDS: ground truths that keep or leave out whole groups (data owners), on the
LDS machinery's cached retraining, against closed-form retrainers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from etda.evaluate.lds import (
    LDSConfig,
    cache_folder,
    ground_truth,
    group_lds,
    lds,
    load_ground_truth,
    subset_masks,
)
from etda.generative import by_owner

N_TRAIN, N_TEST = 40, 6
OWNERS = [f"owner{(7 * i) % 9}" for i in range(N_TRAIN)]  # 9 owners of 4-5 examples
CONFIG = LDSConfig(n_subsets=12, fraction=0.5, seed=3)


@dataclass
class Additive:
    """A closed-form retrainer: the 'model' trained on a mask is the mask; its output on test
    example t is ``W[t] @ mask``, squashed by ``tanh`` (monotone, not additive) when
    ``squash``."""

    weights: np.ndarray  # (n_test, n_train)
    squash: bool = True
    name: str = "additive"

    def fingerprint(self) -> str:
        return f"additive-{float(self.weights.sum()):.6f}-{self.squash}"

    def data(self) -> SimpleNamespace:
        x = torch.zeros(N_TEST, 1)
        return SimpleNamespace(n_train=N_TRAIN, n_test=N_TEST, x_test=x, y_test=x[:, 0])

    def train(self, seed: int, subset: np.ndarray) -> SimpleNamespace:
        return SimpleNamespace(model=np.asarray(subset, dtype=np.float64), seconds=0.0)

    def output(self, model: np.ndarray, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        f = self.weights @ model
        return torch.from_numpy(np.tanh(f / 4) if self.squash else f)


def weights(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(N_TEST, N_TRAIN))


def test_group_masks_expand_to_whole_groups() -> None:
    masks, groups, names = subset_masks(N_TRAIN, CONFIG, OWNERS)
    assert groups.shape == (12, 9) and masks.shape == (12, N_TRAIN)
    assert (groups.sum(1) == round(0.5 * 9)).all()
    for s in range(12):
        kept = {names[g] for g in np.flatnonzero(groups[s])}
        assert masks[s].tolist() == [o in kept for o in OWNERS]
    again, _, _ = subset_masks(N_TRAIN, CONFIG, OWNERS)
    np.testing.assert_array_equal(again, masks)
    plain, none, _ = subset_masks(N_TRAIN, CONFIG)
    assert none is None and (plain.sum(1) == N_TRAIN // 2).all()
    with pytest.raises(ValueError, match="group labels for"):
        subset_masks(N_TRAIN, CONFIG, OWNERS[:5])
    with pytest.raises(ValueError, match="at least 2 groups"):
        subset_masks(N_TRAIN, CONFIG, ["one"] * N_TRAIN)


def test_group_lds_of_the_true_effects_is_one(tmp_path) -> None:
    w = weights()
    retrainer = Additive(w)
    gt = ground_truth(
        retrainer, CONFIG, tmp_path, executor="inprocess", progress=False, groups=OWNERS
    )
    assert gt.group_names == list(dict.fromkeys(OWNERS))
    sums, names = by_owner(w, OWNERS)
    assert names == gt.group_names
    one = group_lds(sums, gt)
    assert one.mean == pytest.approx(1.0) and one.per_test == pytest.approx(np.ones(N_TEST))
    np.testing.assert_allclose(lds(w, gt).per_test, one.per_test)  # example scores summed
    # the true leave-one-group-out effect of each owner, measured by retraining
    full = retrainer.output(np.ones(N_TRAIN), None, None).numpy()
    effect = np.stack(
        [
            full - retrainer.output(np.array([o != g for o in OWNERS], float), None, None).numpy()
            for g in names
        ],
        axis=1,
    )
    assert group_lds(effect, gt).mean > 0.9
    assert group_lds(-sums, gt).mean == pytest.approx(-1.0)
    cached = load_ground_truth(retrainer, CONFIG, tmp_path, groups=OWNERS)
    np.testing.assert_array_equal(cached.outputs, gt.outputs)
    np.testing.assert_array_equal(cached.group_masks, gt.group_masks)


def test_group_ground_truth_has_its_own_cache(tmp_path) -> None:
    retrainer = Additive(weights(1), squash=False)
    plain = ground_truth(retrainer, CONFIG, tmp_path, executor="inprocess", progress=False)
    grouped = ground_truth(
        retrainer, CONFIG, tmp_path, executor="inprocess", progress=False, groups=OWNERS
    )
    assert plain.path != grouped.path and plain.path == cache_folder(retrainer, CONFIG, tmp_path)
    assert plain.group_masks is None and "groups" not in json.loads(
        (plain.path / "meta.json").read_text()
    )
    assert json.loads((grouped.path / "meta.json").read_text())["groups"]["n_groups"] == 9
    assert lds(retrainer.weights, plain).mean == pytest.approx(1.0)
    with pytest.raises(ValueError, match="drawn over groups"):
        group_lds(np.zeros((N_TEST, 9)), plain)
    with pytest.raises(ValueError, match="expected"):
        group_lds(np.zeros((N_TEST, 8)), grouped)
    with pytest.raises(FileNotFoundError):
        load_ground_truth(retrainer, CONFIG, tmp_path, groups=OWNERS[::-1])
