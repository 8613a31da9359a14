"""TRAK(solve="shared"): the members' kernels averaged and solved once equals TRAK on every
member's features side by side, scaled by 1 / sqrt(M) (float64), and per-member solves where
the members are identical."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import etda
from etda.methods.solve import DampedSystem

D64 = torch.float64


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=D64), torch.randint(0, 3, (n,), generator=g)


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(D64)


TRAIN, TEST = data(30, 1), data(7, 2)
SHARED = etda.get_method("trak", solve="shared")
KW = dict(dtype="float64", projection="identity")


def test_identical_members_give_the_per_member_scores() -> None:
    model = mlp(0)
    per = etda.attribute([model, model], TRAIN, TEST, method="trak", **KW)
    shared = etda.attribute([model, model], TRAIN, TEST, SHARED, **KW)
    np.testing.assert_allclose(shared.values, per.values, rtol=1e-10, atol=1e-12)
    one = etda.attribute(model, TRAIN, TEST, SHARED, **KW)
    np.testing.assert_allclose(one.values, per.values, rtol=1e-10, atol=1e-12)
    assert shared.config["shared_solve"]["form"] == "shared"


@pytest.mark.parametrize("damping", ["auto", 0.05])
def test_shared_solve_is_trak_on_concatenated_features(damping) -> None:
    models = [mlp(0), mlp(1), mlp(2)]
    got = etda.attribute(
        models, TRAIN, TEST, etda.get_method("trak", damping=damping, solve="shared"), **KW
    )
    feats, tests, qs = [], [], []
    for m in models:  # each member's exact features (flat gradients) and Q, by hand
        phi, phi_t, q = _features(m)
        feats.append(phi), tests.append(phi_t), qs.append(q)
    m = len(models)
    phi = torch.cat(feats, 1) / m**0.5  # (n, sum p)
    phi_t = torch.cat(tests, 1) / m**0.5
    kernel = phi @ phi.T
    lam = float(kernel.diagonal().sum()) / kernel.shape[0] if damping == "auto" else damping
    want = phi_t @ phi.T @ torch.linalg.inv(kernel + lam * torch.eye(len(kernel)))
    want = want * torch.stack(qs).mean(0)[None, :]
    # Q (a per-example scalar) is stored in float32 beside the features: 1e-7 relative
    np.testing.assert_allclose(got.values, want.numpy(), rtol=1e-6, atol=1e-9)


def _features(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat per-example gradients of TRAK's margin on the train and test sets, and Q."""
    from etda.task import ClassificationTask

    task = ClassificationTask()

    def grads(x, y):
        rows = []
        for i in range(len(x)):
            model.zero_grad()
            out = model(x[i : i + 1])
            task.output(out, y[i : i + 1]).sum().backward()
            rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        return torch.stack(rows)

    with torch.no_grad():
        q = task.q(model(TRAIN[0]), TRAIN[1]).to(D64)
    return grads(*TRAIN), grads(*TEST), q


def test_from_kernel_matches_the_feature_system() -> None:
    g = torch.Generator().manual_seed(0)
    phi, phi_t = (
        torch.randn(12, 4, generator=g, dtype=D64),
        torch.randn(3, 4, generator=g, dtype=D64),
    )
    a = DampedSystem({"phi": phi}, form="sample")
    b = DampedSystem.from_kernel(phi @ phi.T, width=4)
    assert a.base == pytest.approx(b.base)
    np.testing.assert_allclose(
        b.left_from_cross(phi_t @ phi.T, 0.3), a.left(etda_features(phi_t), 0.3), rtol=1e-10
    )


def etda_features(phi: torch.Tensor):
    from etda.features.blocks import Features

    return Features({"phi": phi})


def test_shared_solve_refuses_what_it_cannot_do() -> None:
    with pytest.raises(ValueError, match="solve must be"):
        etda.get_method("trak", solve="once")
    with pytest.raises(ValueError, match="solve='member'"):
        etda.self_influence(mlp(0), TRAIN, SHARED, **KW)
    with pytest.raises(ValueError, match="out-of-core"):
        etda.attribute(
            mlp(0),
            TRAIN,
            TEST,
            SHARED,
            dtype="float64",
            proj_dim=8,
            out_of_core=True,
        )


def test_the_cli_takes_a_shared_solve(tmp_path, monkeypatch) -> None:
    import json

    from typer.testing import CliRunner

    from etda.cli import app

    monkeypatch.setenv("ETDA_CACHE_DIR", str(tmp_path))
    args = ["attribute", "-s", "digits-logreg", "-m", "trak", "-K", "2", "--solve", "shared"]
    result = CliRunner().invoke(app, [*args, "--json", "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    saved = etda.Scores.load(json.loads(result.output)["out"])
    assert saved.config["method_options"]["solve"] == "shared"
    assert "shared_solve" in saved.config
    bad = CliRunner().invoke(
        app, ["attribute", "-s", "digits-logreg", "-m", "if", "--solve", "shared"]
    )
    assert bad.exit_code == 2 and "no shared solve" in bad.output
