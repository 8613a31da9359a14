"""Trajectory ensembles (Snapshots, Forks): members are continuations of one trained run."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import etda
from etda.ensemble.base import member_seed
from etda.train import TrainRecipe, train_model

D64 = torch.float64


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=D64), torch.randint(0, 3, (n,), generator=g)


def trained(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(D64)
    x, y = data(40, 1)
    recipe = TrainRecipe(lr=0.1, epochs=3, batch_size=10)
    train_model(model, x, y, recipe, seed=seed)
    return model.eval()


TRAIN, TEST = data(40, 1), data(6, 2)
OPTS = dict(method="trak", dtype="float64")


def test_one_constant_snapshot_equals_a_plain_checkpoint_member() -> None:
    base = trained()
    got = etda.attribute(
        base, TRAIN, TEST, ensemble=etda.Snapshots(1, epochs=2, schedule="constant"), **OPTS
    )
    # the reference: the same continuation trained by hand, attributed as a checkpoint
    model = trained()
    recipe = TrainRecipe(lr=0.01, epochs=2, lr_schedule="constant")
    train_model(model, *TRAIN, recipe, seed=member_seed(0, 0, 0))
    ref = etda.attribute([model.eval()], TRAIN, TEST, ensemble=etda.Checkpoints(), **OPTS)
    np.testing.assert_allclose(got.values, ref.values, rtol=1e-12, atol=1e-14)
    assert got.costs.train_s > 0 and got.config["members"][0]["label"] == "model0-snapshot0"


def test_snapshots_are_the_checkpoints_of_one_continuation() -> None:
    base = trained()
    ens = etda.Snapshots(3, epochs=1, lr=0.05)
    got = etda.attribute(base, TRAIN, TEST, ensemble=ens, **OPTS)
    model, snaps = trained(), []
    for j in range(3):  # cycle j: one epoch, lr decaying from 0.05 to 0, its own data order
        recipe = TrainRecipe(lr=0.05, epochs=1, lr_schedule="linear")
        train_model(model, *TRAIN, recipe, seed=member_seed(0, 0, j))
        snaps.append(copy.deepcopy(model).eval())
    ref = etda.attribute(snaps, TRAIN, TEST, ensemble=etda.Checkpoints(), **OPTS)
    np.testing.assert_allclose(got.values, ref.values, rtol=1e-12, atol=1e-14)
    again = etda.attribute(base, TRAIN, TEST, ensemble=ens, **OPTS)
    np.testing.assert_array_equal(again.values, got.values)  # seeded


def test_forks_without_training_equal_the_base_model() -> None:
    base = trained()
    one = etda.attribute(base, TRAIN, TEST, **OPTS)
    got = etda.attribute(base, TRAIN, TEST, ensemble=etda.Forks(3, epochs=0), **OPTS)
    np.testing.assert_allclose(got.values, one.values, rtol=1e-12, atol=1e-14)


def test_forks_on_subsets_differ_and_are_seeded() -> None:
    base = trained()
    ens = etda.Forks(2, epochs=2, lr=0.05, subset=0.5)
    masks = [ens.keep_mask(40, member_seed(0, 0, j)) for j in range(2)]
    assert all(m.sum() == 20 for m in masks) and not np.array_equal(*masks)
    got = etda.attribute(base, TRAIN, TEST, ensemble=ens, **OPTS)
    refs = []
    for j, keep in enumerate(masks):
        model = trained()
        idx = torch.as_tensor(np.flatnonzero(keep))
        recipe = TrainRecipe(lr=0.05, epochs=2, lr_schedule="linear")
        train_model(model, TRAIN[0][idx], TRAIN[1][idx], recipe, seed=member_seed(0, 0, j))
        refs.append(model.eval())
    ref = etda.attribute(refs, TRAIN, TEST, **OPTS)  # independent members, same combine
    np.testing.assert_allclose(got.values, ref.values, rtol=1e-12, atol=1e-14)
    assert got.costs.train_s > 0


def test_a_user_training_function_trains_each_cycle() -> None:
    calls = []

    def train_fn(model, x, y, seed):
        calls.append(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.9)

    got = etda.attribute(
        trained(), TRAIN, TEST, ensemble=etda.Snapshots(2, train_fn=train_fn), **OPTS
    )
    assert calls == [member_seed(0, 0, 0), member_seed(0, 0, 1)]
    assert np.isfinite(got.values).all()


def test_bad_options_are_clear() -> None:
    with pytest.raises(ValueError, match="schedule"):
        etda.Snapshots(schedule="triangle")
    with pytest.raises(ValueError, match="subset"):
        etda.Forks(subset=1.5)
    with pytest.raises(ValueError, match="epochs"):
        etda.Forks(epochs=-1)
    with pytest.raises(ValueError, match="members"):
        etda.Snapshots(members=0)
    assert etda.ENSEMBLES.get_entry("forks").build(members=3).n_members == 3


def test_members_are_placed_in_a_known_run() -> None:
    recipe = TrainRecipe(lr=0.1, epochs=20, batch_size=50, lr_schedule="linear", optimizer="sgd")
    snaps = etda.Snapshots(5, tail=0.25)
    assert snaps.run_start(20) == 15
    fitted = snaps.fit_run(recipe)  # 5 one-epoch cycles restarting at the rate of epoch 15
    assert (fitted.epochs, fitted.lr, fitted.batch_size) == (1, pytest.approx(0.025), 50)
    assert snaps.epochs == 1 and snaps.lr == 0.01  # the original is unchanged
    forks = etda.Forks(3, at=0.5).fit_run(recipe)  # the run's second half, own data order
    assert (forks.epochs, forks.lr, forks.schedule) == (10, pytest.approx(0.05), "cyclic")
    assert etda.Forks(3, at=1.0).fit_run(recipe).epochs == 0  # forks of the final model
    assert etda.Forks(3, at=None).run_start(20) is None  # the given model as it is
    assert etda.Dropout(2).run_start(20) is None and etda.LoRA(2).fit_run(recipe).n_members == 2


def test_a_built_in_setting_continues_its_run(tmp_path) -> None:
    from etda.experiment import run_attribution
    from etda.settings import get_setting
    from etda.zoo import trained_models

    kw = dict(progress=False, model_dir=tmp_path)
    scores, _ = run_attribution("digits-logreg", "graddot", "forks", members=2, **kw)
    (tm,) = trained_models(get_setting("digits-logreg"), 1, tmp_path)
    members = scores.config["members"]
    assert [m["label"] for m in members] == ["model0-fork0", "model0-fork1"]
    # half of the run's training time counts (the forks start at its midpoint), plus theirs
    assert scores.costs.train_s >= 0.5 * tm.seconds
    one, _ = run_attribution("digits-logreg", "graddot", "forks", members=1, **kw)
    assert one.values.shape == scores.values.shape


def test_trained_members_count_as_stored_models() -> None:
    from etda.cost import weights_bytes

    base = trained()
    one = weights_bytes(base)
    snaps = etda.attribute(base, TRAIN, TEST, ensemble=etda.Snapshots(2), **OPTS)
    assert snaps.costs.weights_bytes == 3 * one  # the base model and two snapshots
    forks = etda.attribute(base, TRAIN, TEST, ensemble=etda.Forks(2, epochs=0), **OPTS)
    assert forks.costs.weights_bytes == one  # untrained forks are the base model


def test_curvature_with_trajectory_members_is_the_mean_of_its_members() -> None:
    # K-FAC influence over snapshots: each member fits its own curvature; Mean combines
    base = trained()
    ens = etda.Snapshots(2, epochs=1, lr=0.05)
    opts = dict(dtype="float64")
    kfac = etda.get_method("if", curvature="kfac", fisher="empirical", damping=1e-3)
    got = etda.attribute(base, TRAIN, TEST, kfac, ens, **opts)
    model, singles = trained(), []
    for j in range(2):
        recipe = TrainRecipe(lr=0.05, epochs=1, lr_schedule="linear")
        train_model(model, *TRAIN, recipe, seed=member_seed(0, 0, j))
        snap = copy.deepcopy(model).eval()
        singles.append(etda.attribute(snap, TRAIN, TEST, kfac, **opts).values)
    np.testing.assert_allclose(got.values, np.mean(singles, 0), rtol=1e-9, atol=1e-12)
