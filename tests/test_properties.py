"""Property tests (hypothesis) on tiny shapes: what must hold for every model, data set and
option, not just for the examples the other tests chose.

* Grad-Dot is symmetric in train and test when they are the same set;
* Grad-Cos does not change when the loss is scaled by a positive constant;
* an ensemble of M identical members equals one member (every method);
* the chunk size never changes a result.

float64 throughout; "equal" means within 1e-10 of the largest score (sums in another order).
Examples are few (20 per property, no deadline) so that the suite stays fast.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import etda
from etda.task import ClassificationTask

pytestmark = pytest.mark.usefixtures("one_thread")
FEW = settings(
    max_examples=20,
    deadline=None,
    derandomize=True,  # the same examples on every run: a CI failure reproduces locally
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@st.composite
def problems(draw, min_train: int = 2):
    """A tiny MLP or linear model with its data: (model, (x, y) train, (x, y) test)."""
    d = draw(st.integers(2, 5))
    c = draw(st.integers(2, 3))
    n_train = draw(st.integers(min_train, 9))
    n_test = draw(st.integers(1, 4))
    hidden = draw(st.sampled_from([None, 2, 4]))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    if hidden is None:
        model = nn.Linear(d, c)
    else:
        model = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, c))
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n_train + n_test, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n_train + n_test,), generator=g)
    return model.double(), (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


PROJ = st.sampled_from(
    [{"projection": "identity"}, {"projection": "none"}, {"projection": "gaussian", "proj_dim": 7}]
)


def _close(a: np.ndarray, b: np.ndarray, tol: float = 1e-10) -> None:
    scale = max(float(np.abs(b).max()), 1e-300)
    np.testing.assert_allclose(a, b, rtol=0, atol=tol * scale)


def _run(model, train, test, method="graddot", **kw) -> np.ndarray:
    kw.setdefault("dtype", "float64")
    if method in ("trak", "if"):
        kw.setdefault("damping", 0.1)
    return etda.attribute(model, train, test, method=method, **kw).values


@FEW
@given(problem=problems(), proj=PROJ)
def test_graddot_is_symmetric_on_one_set(problem, proj):
    model, train, _ = problem
    values = _run(model, train, train, **proj)
    assert values.shape == (len(train[1]),) * 2
    _close(values, values.T)
    assert (np.diag(values) >= -1e-12 * np.abs(values).max()).all()  # squared norms


class ScaledLoss(ClassificationTask):
    """Cross-entropy times a constant: every loss gradient is scaled by it."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def loss(self, out, y):
        return super().loss(out, y) * self.scale


@FEW
@given(problem=problems(), proj=PROJ, scale=st.floats(1e-3, 1e3))
def test_gradcos_is_invariant_to_scaling_the_loss(problem, proj, scale):
    model, train, test = problem
    plain = _run(model, train, test, "gradcos", **proj)
    scaled = _run(model, train, test, "gradcos", task=ScaledLoss(scale), **proj)
    _close(scaled, plain)
    graddot = _run(model, train, test, "graddot", task=ScaledLoss(scale), **proj)
    _close(graddot, scale**2 * _run(model, train, test, "graddot", **proj))  # the scale is real


EXACT = st.sampled_from([{"projection": "identity"}, {"projection": "none"}])


@FEW
@given(
    problem=problems(),
    method=st.sampled_from(["graddot", "gradcos", "if", "trak"]),
    members=st.integers(2, 4),
    proj=EXACT,  # exact features: independent members would differ only in projection seeds
)
def test_identical_members_equal_one(problem, method, members, proj):
    model, train, test = problem
    one = _run(model, train, test, method, **proj)
    copies = [copy.deepcopy(model) for _ in range(members)]
    many = etda.attribute(
        copies,
        train,
        test,
        method=method,
        dtype="float64",
        **proj,
        **({"damping": 0.1} if method in ("trak", "if") else {}),
    )
    assert len(many.config["members"]) == members
    _close(many.values, one)


@FEW
@given(
    problem=problems(min_train=3), method=st.sampled_from(["graddot", "if", "trak"]), data=st.data()
)
def test_chunk_size_never_changes_a_result(problem, method, data):
    model, train, test = problem
    proj = data.draw(PROJ)
    chunk = data.draw(st.integers(1, len(train[1]) + 2))
    whole = _run(model, train, test, method, chunk_size=64, **proj)
    _close(_run(model, train, test, method, chunk_size=chunk, **proj), whole)
