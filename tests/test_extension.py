"""A new method and a new ensemble are one class each: defined here, in the test file, they
run through ``etda.attribute``, the ``etda`` command and ``etda bench`` with no other file
changed (the registries carry them everywhere)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import etda
from etda.bench import BenchConfig, Sweep, run_bench
from etda.cli import app
from etda.ensemble.base import BuildContext, Member, member_seed, prepared_copy
from etda.evaluate.lds import LDSConfig
from etda.features.blocks import Features, TrainFeatures
from etda.methods.base import MemberContext, MemberFactors

D64 = torch.float64


def _define() -> tuple[type, type]:
    """Define (and so register) the toy method and ensemble; called by the fixture below,
    so that other test files never see them in the registries."""

    class TwiceGradDot(etda.Method):
        """Twice the gradient dot product: scores scale, rankings (and LDS) do not change."""

        name = "toy-twice-graddot"
        title = "2x Grad-Dot"
        description = "a test method: twice the dot product of the loss gradients"

        def factors(
            self, train: TrainFeatures, test: Features, ctx: MemberContext
        ) -> MemberFactors:
            if train.explicit_width is not None:
                return MemberFactors(2.0 * test.rows(0, test.n), "feature")
            return MemberFactors(2.0 * train.inner(test), "sample")

    class Twins(etda.Ensemble):
        """Each given model twice, with the same projection seed: the mean equals one member."""

        name = "toy-twins"
        presets = {"toy-twins": ("a test ensemble: every model twice", "twins", {})}

        def __init__(self, seed: int | None = None) -> None:
            self.seed = seed

        def size(self, n_models: int) -> int:
            return 2 * n_models

        def members(self, models: list[nn.Module], ctx: BuildContext) -> Iterator[Member]:
            seed = ctx.seed if self.seed is None else self.seed
            for k, m in enumerate(models):
                for j in range(2):
                    yield Member(
                        prepared_copy(m, ctx.dtype),
                        member_seed(seed, k, 0),
                        f"twin{k}.{j}",
                        model_index=k,
                    )

    return TwiceGradDot, Twins


@pytest.fixture(scope="module")
def toys():
    method, ensemble = _define()
    yield method, ensemble
    etda.METHODS.remove(method.name)
    etda.ENSEMBLES.remove("toy-twins")


@pytest.fixture(autouse=True)
def _registered(toys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the classes registered themselves when defined: nothing else was told about them
    assert "toy-twice-graddot" in etda.METHODS and "toy-twins" in etda.ENSEMBLES


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=D64), torch.randint(0, 3, (n,), generator=g)


def test_toy_method_and_ensemble_through_attribute(toys) -> None:
    _, Twins = toys
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(D64)
    train, test = _data(20, 1), _data(5, 2)
    base = etda.attribute(model, train, test, method="graddot", dtype="float64")
    toy = etda.attribute(
        model, train, test, method="toy-twice-graddot", ensemble=Twins(), dtype="float64"
    )
    assert toy.values.shape == (5, 20)
    np.testing.assert_allclose(toy.values, 2.0 * base.values, rtol=1e-12)
    assert len(toy.config["members"]) == 2
    # by name, with the options a preset takes
    named = etda.attribute(
        model,
        train,
        test,
        method="toy-twice-graddot",
        ensemble=etda.ensemble.make_ensemble("toy-twins"),
        dtype="float64",
    )
    np.testing.assert_array_equal(named.values, toy.values)


def test_toy_method_and_ensemble_through_the_cli(tmp_path) -> None:
    out = tmp_path / "scores"
    args = ["attribute", "-s", "digits-logreg", "-m", "toy-twice-graddot", "-e", "toy-twins"]
    caches = ["--model-dir", str(tmp_path / "models"), "--no-lds", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, *caches, "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    scores = etda.Scores.load(out)
    assert scores.method == "toy-twice-graddot" and scores.shape == (200, 1000)
    assert len(scores.config["members"]) == 2


def test_toy_method_and_ensemble_through_bench(tmp_path) -> None:
    sweep = Sweep(
        "toy",
        (BenchConfig("graddot", "none", 1), BenchConfig("toy-twice-graddot", "toy-twins", 1)),
    )
    res = run_bench(
        "digits-logreg",
        sweep=sweep,
        out=tmp_path / "out",
        executor="inprocess",
        model_dir=tmp_path / "models",
        lds_cache=tmp_path / "lds",
        lds_config=LDSConfig(n_subsets=4),
        log=lambda s: None,
        mislabel=False,
        variance=False,
    )
    assert not res["failed"], res["failed"]
    toy = res["configs"]["toy-twice-graddot/toy-twins/k1/m1"]
    base = res["configs"]["graddot/none/k1/m1"]
    # twice the scores, one model: the same ranking, so the same LDS
    assert toy["lds"]["mean"] == pytest.approx(base["lds"]["mean"], abs=1e-12)
    assert toy["n_members"] == 2 and toy["label"] == "twins 1"
    assert (tmp_path / "out" / "report.md").is_file()
