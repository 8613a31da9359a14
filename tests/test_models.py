"""Tests for etda.models: shapes, structure, registry, seeded init."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from etda.models import MLP, MODELS, LogisticRegression, ResNet9, create_model


def test_logistic_regression_shape():
    m = LogisticRegression(64, 10)
    assert m(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    assert sum(p.numel() for p in m.parameters()) == 64 * 10 + 10


def test_mlp_structure_and_shape():
    m = MLP(in_features=784, hidden=(128, 64), num_classes=10, dropout=0.2)
    assert m(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    linears = [mod for mod in m.modules() if isinstance(mod, nn.Linear)]
    drops = [mod for mod in m.modules() if isinstance(mod, nn.Dropout)]
    assert [lin.out_features for lin in linears] == [128, 64, 10]
    assert len(drops) == 2 and all(d.p == 0.2 for d in drops)
    m.eval()
    x = torch.randn(4, 784)
    torch.testing.assert_close(m(x), m(x))  # eval: dropout off, deterministic
    with pytest.raises(ValueError, match="dropout"):
        MLP(dropout=1.0)


@pytest.mark.parametrize("size", [28, 32])
def test_resnet9_shapes(size):
    m = ResNet9(in_channels=1, num_classes=2, width=8, dropout=0.1)
    out = m(torch.randn(4, 1, size, size))
    assert out.shape == (4, 2)
    assert any(isinstance(mod, nn.Dropout) for mod in m.modules())
    assert any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())
    # Without dropout the model keeps a p=0 Dropout (the identity, drawing no random
    # numbers) so that dropout ensembles can mask it with a rate override.
    plain = ResNet9(width=8).train()
    drops = [mod for mod in plain.modules() if isinstance(mod, nn.Dropout)]
    assert [d.p for d in drops] == [0.0]
    h = torch.randn(4, 64)
    state = torch.get_rng_state()
    assert torch.equal(drops[0](h), h)
    assert torch.equal(torch.get_rng_state(), state)


def test_registry():
    assert set(MODELS) >= {"logreg", "mlp", "resnet9"}
    with pytest.raises(ValueError, match="known models.*logreg"):
        create_model("vgg", seed=0)
    with pytest.raises(TypeError, match="mlp"):
        create_model("mlp", seed=0, bogus=1)


def test_create_model_seeded_and_rng_isolated():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = create_model("mlp", seed=1, in_features=64, hidden=(16,))
    assert torch.equal(torch.random.get_rng_state(), before)  # global RNG untouched
    b = create_model("mlp", seed=1, in_features=64, hidden=(16,))
    c = create_model("mlp", seed=2, in_features=64, hidden=(16,))
    for (ka, va), (_, vb), (_, vc) in zip(
        a.state_dict().items(), b.state_dict().items(), c.state_dict().items(), strict=True
    ):
        assert torch.equal(va, vb), ka
        if va.is_floating_point():
            assert not torch.equal(va, vc), ka
