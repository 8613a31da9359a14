"""ResNet-9 with dropout after every block (``dropout > 0``) and its setting, fmnist2-cnn-dropout.

``dropout=0`` must leave the model exactly as it was without the option (module tree, seeded
parameters, outputs), so fmnist2-cnn's fingerprint and cached models stay valid.
"""

from __future__ import annotations

import pytest
import torch
from conftest import needs_fashion_mnist
from torch import nn

from etda.ensemble.base import BuildContext
from etda.ensemble.dropout import Dropout, MaskedDropout
from etda.models import ResNet9, create_model
from etda.settings import SETTINGS, get_setting
from etda.task import ClassificationTask

KW = {"in_channels": 1, "num_classes": 2, "width": 4}
# fmnist2-cnn's fingerprint before the option existed (also in
# benchmarks/results/fmnist2-cnn/results.json, setting.fingerprint)
FMNIST2_CNN_FINGERPRINT = "9eb3d08edb0eb181fe966a2d9175241889969e205f82163ebe276069f0dc57bc"
# Where the layers go: in the first five blocks, and the one before the head.
BLOCK_DROPOUTS = ["features.0.3", "features.1.4", "features.2.dropout", "features.3.4"]
BLOCK_DROPOUTS += ["features.4.4", "dropout"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _x(n: int = 3) -> torch.Tensor:
    """A fixed batch of images ``(n, 1, 28, 28)``."""
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def _dropouts(model: nn.Module) -> dict[str, nn.Dropout]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Dropout)}


def test_dropout_zero_is_the_model_without_the_option():
    plain, zero = create_model("resnet9", 3, **KW), create_model("resnet9", 3, dropout=0.0, **KW)
    assert [n for n, _ in plain.named_modules()] == [n for n, _ in zero.named_modules()]
    assert repr(plain) == repr(zero)
    assert list(_dropouts(zero)) == ["dropout"]  # only the p=0 layer before the head
    a, b = plain.state_dict(), zero.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    for mode in (True, False):
        plain.train(mode), zero.train(mode)
        torch.testing.assert_close(zero(_x()), plain(_x()), rtol=0, atol=0)


def test_dropout_after_every_block():
    model = create_model("resnet9", 3, dropout=0.1, **KW)
    drops = _dropouts(model)
    assert list(drops) == BLOCK_DROPOUTS and all(d.p == 0.1 for d in drops.values())
    # Dropout has no parameters: the same names and seeded init as without it.
    plain = create_model("resnet9", 3, **KW).state_dict()
    state = model.state_dict()
    assert list(state) == list(plain) and all(torch.equal(state[k], plain[k]) for k in state)
    model.eval()
    torch.testing.assert_close(model(_x()), model(_x()), rtol=0, atol=0)  # eval: off
    model.train()
    torch.manual_seed(0)
    first = model(_x())
    assert not torch.allclose(first, model(_x()))  # train: masks drawn anew
    torch.manual_seed(0)
    torch.testing.assert_close(model(_x()), first)
    with pytest.raises(ValueError, match="dropout"):
        ResNet9(dropout=1.0)


def _member_masks(model: nn.Module, seed: int, members: int = 3) -> list[list[torch.Tensor]]:
    """Each member's fixed masks, one per masked layer, after a forward pass."""
    ctx = BuildContext(torch.zeros(4, 1, 28, 28), torch.zeros(4), ClassificationTask(), seed)
    out = []
    for member in Dropout(members=members).members([model], ctx):
        layers = [m for m in member.model.modules() if isinstance(m, MaskedDropout)]
        assert len(layers) == len(BLOCK_DROPOUTS) and all(m.p == 0.1 for m in layers)
        with torch.no_grad():
            member.model(_x())
        out.append([m.mask.clone() for m in layers])
    return out


def test_dropout_ensemble_masks_every_block():
    model = create_model("resnet9", 3, dropout=0.1, **KW).eval()
    ens, note = Dropout(members=3).for_model(model, adapt=True)
    assert ens.p is None and note == ""  # trained with dropout: masks at the model's rates
    masks = _member_masks(model, seed=7)
    for layer in range(len(BLOCK_DROPOUTS)):
        assert not torch.equal(masks[0][layer], masks[1][layer])
        assert not torch.equal(masks[1][layer], masks[2][layer])
    again = _member_masks(model, seed=7)
    pairs = zip(sum(masks, []), sum(again, []), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    other = _member_masks(model, seed=8)
    assert not torch.equal(other[0][0], masks[0][0])


def test_setting_registered():
    setting = get_setting("fmnist2-cnn-dropout")
    base = get_setting("fmnist2-cnn")
    assert SETTINGS["fmnist2-cnn-dropout"] is setting
    assert setting.model_kwargs == {**base.model_kwargs, "dropout": 0.1}
    assert setting.recipe.to_dict() == base.recipe.to_dict()
    assert setting.data_fn.keywords == base.data_fn.keywords
    assert "dropout 0.1" in setting.description
    model = setting.make_model(0)
    assert list(_dropouts(model)) == BLOCK_DROPOUTS
    assert model(_x()).shape == (3, 2)


@needs_fashion_mnist
def test_fingerprints():
    base = get_setting("fmnist2-cnn").fingerprint()
    assert base == FMNIST2_CNN_FINGERPRINT
    assert get_setting("fmnist2-cnn-dropout").fingerprint() != base
