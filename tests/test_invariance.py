"""Invariances of the attribution engine (float64, tiny models).

Scores must not depend on how examples are chunked, on which test examples are scored
together, on the order of the training set (up to the matching permutation), on the
input container, or on repeating a run; seeds must matter exactly where they should.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

import etda

D64 = torch.float64
PROJECTIONS = ["none", "identity", "gaussian", "rademacher", "sparse", "factored"]
RANDOM = ["gaussian", "rademacher", "sparse", "factored"]
N_TR, N_TE = 23, 9


pytestmark = pytest.mark.usefixtures("one_thread")


def make_mlp(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(10, 8), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(8, 3))
    return nn.Sequential(*layers).to(D64)


def make_data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 10, generator=g, dtype=D64), torch.randint(0, 3, (n,), generator=g)


TRAIN, TEST = make_data(N_TR, 1), make_data(N_TE, 2)


def run(model, method="graddot", train=TRAIN, test=TEST, **kw) -> np.ndarray:
    kw.setdefault("dtype", "float64")
    if kw.get("projection") not in ("none", "identity"):  # exact features take no proj_dim
        kw.setdefault("proj_dim", 48)
    return etda.attribute(model, train=train, test=test, method=method, **kw).values


def assert_same(a: np.ndarray, b: np.ndarray, tol: float = 1e-11) -> None:
    assert a.shape == b.shape
    scale = float(np.abs(b).max())
    assert scale > 1e-8
    err = float(np.abs(a - b).max())
    assert err <= tol * scale, f"max abs difference {err:.3e} (scale {scale:.3e})"


METHOD_OPTS = {
    "graddot": {},
    "gradcos": {},
    "if": {"damping": 0.1},
    "trak": {"damping": "auto"},
}


@pytest.fixture(scope="module")
def model():
    return make_mlp()


# ------------------------------------------------------------------------- chunking


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_chunk_size_invariance(model, projection):
    for method, opts in (("graddot", {}), ("trak", {"damping": 0.2})):
        ref = run(model, method, projection=projection, chunk_size=N_TR + N_TE, **opts)
        for chunk in (1, 7):
            got = run(model, method, projection=projection, chunk_size=chunk, **opts)
            assert_same(got, ref)


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_test_subset_gives_the_matching_rows(model, projection):
    rows = [5, 0, 3, 8]
    sub = (TEST[0][rows], TEST[1][rows])
    for method, opts in METHOD_OPTS.items():
        full = run(model, method, projection=projection, **opts)
        part = run(model, method, test=sub, projection=projection, **opts)
        assert_same(part, full[rows])


PERM = torch.randperm(N_TR, generator=torch.Generator().manual_seed(3))
SHUFFLED = (TRAIN[0][PERM], TRAIN[1][PERM])


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_train_permutation_permutes_columns(model, projection):
    opts = {**METHOD_OPTS, "trak": {"damping": 0.2}, "if": {"damping": 0.1}}
    for method, o in opts.items():
        full = run(model, method, projection=projection, **o)
        got = run(model, method, train=SHUFFLED, projection=projection, **o)
        assert_same(got, full[:, PERM.numpy()], 1e-9)


@pytest.mark.parametrize("projection", ["none", "gaussian"])
def test_auto_damping_does_not_depend_on_training_order(model, projection):
    for method in ("trak", "if"):
        full = etda.attribute(
            model,
            TRAIN,
            TEST,
            method=method,
            projection=projection,
            proj_dim=48 if projection != "none" else None,
            dtype="float64",
            damping="auto",
        )
        got = etda.attribute(
            model,
            SHUFFLED,
            TEST,
            method=method,
            projection=projection,
            proj_dim=48 if projection != "none" else None,
            dtype="float64",
            damping="auto",
        )
        lam = [s.config["members"][0]["damping"]["lam"] for s in (full, got)]
        assert lam[0] == pytest.approx(lam[1], rel=1e-6), lam
        assert_same(got.values, full.values[:, PERM.numpy()], 1e-8)


@pytest.mark.parametrize("projection", ["identity", "gaussian", "rademacher", "sparse"])
def test_hooks_and_vmap_give_the_same_flat_features(model, projection):
    a = run(model, "trak", projection=projection, use_hooks=True, damping=0.3)
    b = run(model, "trak", projection=projection, use_hooks=False, damping=0.3)
    assert_same(a, b)


def test_input_containers_are_equivalent(model):
    ref = run(model, projection="identity")
    as_numpy = run(
        model,
        train=(TRAIN[0].numpy(), TRAIN[1].numpy()),
        test=(TEST[0].numpy(), TEST[1].numpy()),
        projection="identity",
    )
    as_dataset = run(
        model, train=TensorDataset(*TRAIN), test=TensorDataset(*TEST), projection="identity"
    )
    as_list = run(model, train=list(TRAIN), test=list(TEST), projection="identity")
    for got in (as_numpy, as_dataset, as_list):
        np.testing.assert_array_equal(got, ref)


def test_float32_is_close_to_float64(model):
    ref = run(model, "trak", projection="identity", damping=0.3)
    got = run(
        copy.deepcopy(model).float(),
        "trak",
        projection="identity",
        damping=0.3,
        dtype="float32",
        train=(TRAIN[0].float(), TRAIN[1]),
        test=(TEST[0].float(), TEST[1]),
    )
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


# ---------------------------------------------------------------------------- seeds


@pytest.mark.parametrize("projection", RANDOM)
def test_projection_seed(model, projection):
    a = run(model, projection=projection, seed=0)
    b = run(model, projection=projection, seed=0)
    c = run(model, projection=projection, seed=1)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3 * np.abs(a).max(), "another seed must change P"


@pytest.mark.parametrize("projection", ["none", "identity"])
def test_seed_does_not_matter_without_projection(model, projection):
    np.testing.assert_array_equal(
        run(model, projection=projection, seed=0), run(model, projection=projection, seed=5)
    )


@pytest.mark.parametrize("damping,rule", [("auto", "spectral-mean"), ("gcv", "gcv")])
def test_trak_auto_damping_is_deterministic(model, damping, rule):
    runs = [
        etda.attribute(
            model,
            train=TRAIN,
            test=TEST,
            method="trak",
            projection=p,
            proj_dim=16 if p != "none" else None,
            dtype="float64",
            damping=damping,
        )
        for p in ("gaussian", "gaussian", "none", "none")
    ]
    for a, b in (runs[:2], runs[2:]):
        da, db = a.config["members"][0]["damping"], b.config["members"][0]["damping"]
        assert da["rule"] == rule and da["lam"] > 0
        assert da["lam"] == db["lam"] and da["curve"] == db["curve"]
        np.testing.assert_array_equal(a.values, b.values)


# ------------------------------------------------------------- identical members


@pytest.mark.parametrize(
    "method,opts",
    [
        ("graddot", {}),
        ("gradcos", {}),
        ("if", {"damping": 0.1}),
        ("if", {"damping": 2.0, "solver": "cg"}),
        ("trak", {"damping": 0.2}),
        ("trak", {"damping": "auto"}),
        ("tracin", {"checkpoint_lrs": [0.3, 0.1]}),
    ],
)
def test_list_of_identical_models_equals_single_model(model, method, opts):
    opts = dict(opts)
    if method == "tracin":
        opts["checkpoints"] = [make_mlp(7).state_dict(), make_mlp(8).state_dict()]
    cg = opts.get("solver") == "cg"
    for projection in ("identity",) if cg else ("identity", "none"):
        single = run(model, method, projection=projection, **opts)
        for m in (2,) if cg else (2, 3):
            many = run([model] * m, method, projection=projection, **opts)
            assert_same(many, single, 1e-10)


@pytest.mark.parametrize("method", ["graddot", "trak"])
@pytest.mark.parametrize("projection", ["gaussian", "factored"])
def test_one_member_ensembles_equal_the_base_method(method, projection):
    m = make_mlp(dropout=0.1)
    opts = {"damping": 0.2} if method == "trak" else {}
    base = run(m, method, projection=projection, **opts)
    for ens in (
        etda.ProjectionSeeds(members=1),
        etda.Independent(),
        etda.Checkpoints(),
    ):
        np.testing.assert_array_equal(
            run(m, method, projection=projection, ensemble=ens, **opts), base
        )
    # dropout is inactive for non-dropout ensembles (eval mode)
    no_dropout = make_mlp(dropout=0.0)
    np.testing.assert_array_equal(run(no_dropout, method, projection=projection, **opts), base)


def test_auto_projection_resolution(model):
    small = etda.attribute(model, TRAIN, TEST, method="graddot", dtype="float64")
    assert small.config["projection"] == "none"
    np.testing.assert_array_equal(small.values, run(model, projection="none"))
    sketched = etda.attribute(model, TRAIN, TEST, method="graddot", dtype="float64", proj_dim=32)
    assert sketched.config["projection"] == "factored" and sketched.config["proj_dim"] == 32
    np.testing.assert_array_equal(sketched.values, run(model, projection="factored", proj_dim=32))
    tiny_budget = etda.attribute(
        model, TRAIN, TEST, method="graddot", dtype="float64", memory_budget=1000
    )
    assert tiny_budget.config["projection"] == "factored"
