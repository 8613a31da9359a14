"""Tests for etda.train and etda.settings on the small digits data."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch

from etda.data import digits
from etda.models import create_model
from etda.settings import SETTINGS, Setting, get_setting, margin
from etda.train import TrainRecipe, load_weights, save_weights, train_model

FAST = TrainRecipe(epochs=3, batch_size=64)


@pytest.fixture(scope="module")
def data():
    return digits(300, 100, seed=0)


def _mlp(seed=0, dropout=0.1):
    return create_model("mlp", seed, in_features=64, hidden=(32,), dropout=dropout)


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def test_recipe_validation_and_dict():
    d = TrainRecipe().to_dict()
    assert d["optimizer"] == "sgd" and d["epochs"] == 20
    for f in dataclasses.fields(TrainRecipe):
        assert f.metadata.get("help"), f.name
    with pytest.raises(ValueError, match="optimizer"):
        TrainRecipe(optimizer="lbfgs")
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainRecipe(lr_schedule="exponential")
    with pytest.raises(ValueError, match="epochs"):
        TrainRecipe(epochs=0)


def test_training_deterministic(data):
    torch.manual_seed(7)
    rng_before = torch.random.get_rng_state()
    r1 = train_model(_mlp(), data.x_train, data.y_train, FAST, seed=3)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # caller's RNG untouched
    r2 = train_model(_mlp(), data.x_train, data.y_train, FAST, seed=3)
    r3 = train_model(_mlp(), data.x_train, data.y_train, FAST, seed=4)
    assert _same(r1.model.state_dict(), r2.model.state_dict())
    assert not _same(r1.model.state_dict(), r3.model.state_dict())
    assert not r1.model.training and r1.seconds > 0 and r1.seed == 3 and r1.recipe == FAST


def test_training_learns(data):
    r = train_model(_mlp(), data.x_train, data.y_train, TrainRecipe(epochs=10, batch_size=50), 0)
    with torch.no_grad():
        acc = (r.model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    assert acc > 0.8


def test_adam_and_constant_schedule(data):
    recipe = TrainRecipe(optimizer="adam", lr=1e-2, lr_schedule="constant", epochs=2)
    r = train_model(_mlp(), data.x_train, data.y_train, recipe, 0, checkpoint_epochs=[1, 2])
    assert r.checkpoint_lrs == [1e-2, 1e-2]


def test_adamw_cosine_warmup_and_clipping(data):
    recipe = TrainRecipe(
        optimizer="adamw", lr=0.01, lr_schedule="cosine", warmup=0.25, grad_clip=0.5, epochs=2
    )
    total = 8
    rates = [recipe.lr_at(s, total) for s in range(total)]
    assert rates[:2] == [0.005, 0.01]  # two warm-up steps, linear to lr
    np.testing.assert_allclose(
        rates[2:], [0.01 * 0.5 * (1 + np.cos(np.pi * k / 6)) for k in range(6)]
    )
    assert recipe.lr_at_epoch(0) == pytest.approx(0.01 / 500)  # the first of 500 warm-up steps
    # the recipe's run equals a hand-written AdamW loop with the same rates and clipping
    model, ref = _mlp(dropout=0.0), _mlp(dropout=0.0)
    r = train_model(model, data.x_train, data.y_train, recipe, 3)
    opt = torch.optim.AdamW(ref.parameters(), lr=0.01, weight_decay=recipe.weight_decay)
    gen, step = torch.Generator().manual_seed(3), 0
    steps = 2 * 3
    for _ in range(2):
        for idx in torch.randperm(300, generator=gen).split(100):
            for g in opt.param_groups:
                g["lr"] = recipe.lr_at(step, steps)
            loss = torch.nn.functional.cross_entropy(ref(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
            opt.step()
            step += 1
    assert _same(r.model.state_dict(), ref.state_dict())
    assert len(r.losses) == 2 and r.losses[1] < r.losses[0]
    # fields added later stay out of to_dict at their defaults: old fingerprints hold
    assert set(TrainRecipe().to_dict()) == {
        "optimizer",
        "lr",
        "momentum",
        "weight_decay",
        "epochs",
        "batch_size",
        "lr_schedule",
    }
    assert recipe.to_dict()["warmup"] == 0.25 and recipe.to_dict()["grad_clip"] == 0.5
    for bad in (dict(warmup=1.0), dict(warmup=-0.1), dict(grad_clip=0.0)):
        with pytest.raises(ValueError):
            TrainRecipe(**bad)


def test_checkpoints(data):
    recipe = TrainRecipe(epochs=4, batch_size=100, lr=0.1)  # 3 steps per epoch, 12 in all
    model = _mlp()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    r = train_model(model, data.x_train, data.y_train, recipe, 0, checkpoint_epochs=(4, 0, 2))
    assert len(r.checkpoints) == 3 and len(r.checkpoint_lrs) == 3
    assert _same(r.checkpoints[0], init)
    assert _same(r.checkpoints[2], r.model.state_dict())
    assert not _same(r.checkpoints[1], r.checkpoints[2])
    # linear decay: epoch 2 holds steps 3..5 -> mean lr 0.1 * (1 - 4/12)
    np.testing.assert_allclose(r.checkpoint_lrs, [0.1, 0.1 * (1 - 4 / 12), 0.1 * (1 - 10 / 12)])
    r.model.state_dict()["net.1.weight"].add_(1.0)  # checkpoints are clones
    assert not _same(r.checkpoints[2], r.model.state_dict())
    with pytest.raises(ValueError, match="checkpoint_epochs"):
        train_model(_mlp(), data.x_train, data.y_train, recipe, 0, checkpoint_epochs=[5])


def test_bad_inputs(data):
    x, y = data.x_train, data.y_train
    with pytest.raises(ValueError, match="y has shape"):
        train_model(_mlp(), x, y[:-1], FAST, 0)
    with pytest.raises(ValueError, match="empty"):
        train_model(_mlp(), x[:0], y[:0], FAST, 0)
    with pytest.raises(ValueError, match="labels"):
        train_model(_mlp(), x, y + 5, FAST, 0)
    with pytest.raises(ValueError, match="labels"):
        train_model(_mlp(), x, y - 1, FAST, 0)
    with pytest.raises(ValueError, match="integer"):
        train_model(_mlp(), x, y.float(), FAST, 0)


def test_batchnorm_model_trains_with_odd_batch(data):
    # 129 examples at batch 64 leave a final batch of 1, which BatchNorm cannot train on.
    model = create_model("resnet9", 0, in_channels=1, num_classes=10, width=4)
    recipe = TrainRecipe(epochs=1, batch_size=64)
    r = train_model(model, data.x_train[:129], data.y_train[:129], recipe, 0)
    assert not r.model.training


def test_save_load_round_trip(tmp_path, data):
    r = train_model(_mlp(), data.x_train, data.y_train, FAST, 0)
    path = tmp_path / "sub" / "w.safetensors"
    save_weights(r.model, path)
    loaded = load_weights(_mlp(seed=9), path)
    assert _same(loaded.state_dict(), r.model.state_dict())
    save_weights(r.model.state_dict(), tmp_path / "s.safetensors")  # a state dict also works
    assert _same(
        load_weights(_mlp(9), tmp_path / "s.safetensors").state_dict(), r.model.state_dict()
    )
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["w.safetensors"]
    # BatchNorm buffers (incl. int64 num_batches_tracked) survive too
    cnn = create_model("resnet9", 0, width=4)
    save_weights(cnn, tmp_path / "cnn.safetensors")
    assert _same(
        load_weights(
            create_model("resnet9", 1, width=4), tmp_path / "cnn.safetensors"
        ).state_dict(),
        cnn.state_dict(),
    )


def test_load_errors(tmp_path):
    save_weights(_mlp(), tmp_path / "w.safetensors")
    wrong_shape = create_model("mlp", 0, in_features=64, hidden=(16,))
    with pytest.raises(ValueError, match=r"wrong shapes.*net\.1\.weight"):
        load_weights(wrong_shape, tmp_path / "w.safetensors")
    wrong_keys = create_model("mlp", 0, in_features=64, hidden=(32, 32))
    with pytest.raises(ValueError, match="missing keys"):
        load_weights(wrong_keys, tmp_path / "w.safetensors")
    with pytest.raises(FileNotFoundError):
        load_weights(_mlp(), tmp_path / "nope.safetensors")


# --- settings -------------------------------------------------------------------------------


def test_settings_registry():
    assert {"fmnist-mlp", "fmnist2-cnn", "digits-mlp", "digits-logreg"} <= set(SETTINGS)
    assert get_setting("digits-mlp") is SETTINGS["digits-mlp"]
    with pytest.raises(ValueError, match="known settings.*digits-mlp"):
        get_setting("cifar")


def test_margin_matches_naive():
    logits = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    p = logits.softmax(1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(margin(logits, y), torch.log(p / (1 - p)))
    big = torch.tensor([[1000.0, 0.0, -1000.0]])  # stable where the naive form overflows
    assert torch.isfinite(margin(big, torch.tensor([0]))).all()


def test_setting_train_output_subset():
    s = get_setting("digits-mlp")
    s = dataclasses.replace(s, recipe=dataclasses.replace(s.recipe, epochs=3))
    d = s.data()
    assert s.data() is d  # cached
    r = s.train(seed=0)
    out = s.output(r.model, d.x_test, d.y_test, batch_size=64)
    assert out.shape == (d.n_test,) and out.dtype == torch.float64
    with torch.no_grad():
        ref = margin(r.model(d.x_test), d.y_test)
    torch.testing.assert_close(out, ref)
    assert not r.model.training
    # bool mask and the equivalent int indices train the same model
    mask = np.zeros(d.n_train, dtype=bool)
    mask[::2] = True
    ra = s.train(seed=1, subset=mask)
    rb = s.train(seed=1, subset=np.flatnonzero(mask))
    assert _same(ra.model.state_dict(), rb.model.state_dict())
    assert not _same(ra.model.state_dict(), r.model.state_dict())
    with pytest.raises(ValueError, match="mask has shape"):
        s.train(seed=0, subset=mask[:-1])
    with pytest.raises(ValueError, match="indices must lie"):
        s.train(seed=0, subset=np.array([0, d.n_train]))


def test_setting_fingerprint_and_pickle():
    s = get_setting("digits-logreg")
    fp = s.fingerprint()
    assert len(fp) == 64 and fp == s.fingerprint()
    other = dataclasses.replace(s, recipe=dataclasses.replace(s.recipe, lr=0.01))
    assert other.fingerprint() != fp
    clone = pickle.loads(pickle.dumps(s))
    assert isinstance(clone, Setting) and clone.fingerprint() == fp
    assert clone.make_model(0).linear.in_features == 64
