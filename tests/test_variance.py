"""Ensemble-variance theory: c_w / c_b recovered from a hierarchical Gaussian model."""

from __future__ import annotations

import numpy as np
import pytest

from etda.evaluate.variance import (
    VarianceAccumulator,
    ensemble_variance,
    fit_variance,
    measure,
    predict,
    theory_table,
)

# u_kmtd = signal_td + model_ktd + member_kmtd: c_b = s^2, c_w = s^2 + a^2, v = s^2 + a^2 + e^2
SIG, MOD, MEM = 1.0, 0.7, 1.2


def _draw(K: int, M: int, T: int = 20, D: int = 3000, seed: int = 0, noise_y: float = 1.0):
    rng = np.random.default_rng(seed)
    signal = rng.normal(0, SIG, (T, D))
    model = rng.normal(0, MOD, (K, 1, T, D))
    member = rng.normal(0, MEM, (K, M, T, D))
    u = signal + model + member + 5.0  # an offset: covariances must be centred
    y = signal + rng.normal(0, noise_y, (T, D))
    return u, y


def test_recovers_known_covariances() -> None:
    u, y = _draw(K=4, M=5)
    st = fit_variance(u, y)
    assert st.K == 4 and st.M == 5 and st.D == 3000
    assert st.c_b == pytest.approx(SIG**2, rel=0.06)
    assert st.c_w == pytest.approx(SIG**2 + MOD**2, rel=0.06)
    assert st.v == pytest.approx(SIG**2 + MOD**2 + MEM**2, rel=0.03)
    assert st.r == pytest.approx(SIG**2, rel=0.06)
    assert st.var_y == pytest.approx(SIG**2 + 1.0, rel=0.03)
    assert st.per_test["v"].shape == (20,)


def test_accumulator_equals_all_pairs_covariance() -> None:
    u, _ = _draw(K=3, M=4, T=5, D=50, seed=1)
    st = fit_variance(u)
    K, M, T, D = u.shape
    flat = u.reshape(K * M, T, D)
    for t in range(T):
        c = np.cov(flat[:, t, :])  # (KM, KM), unbiased
        same = np.kron(np.eye(K), np.ones((M, M))).astype(bool)
        diag = np.eye(K * M, dtype=bool)
        assert st.per_test["v"][t] == pytest.approx(c[diag].mean())
        assert st.per_test["c_w"][t] == pytest.approx(c[same & ~diag].mean())
        assert st.per_test["c_b"][t] == pytest.approx(c[~same].mean())
    # streaming, members in any order, gives the same
    acc = VarianceAccumulator()
    for m in reversed(range(M)):
        for k in range(K):
            acc.add(k, u[k, m])
    assert acc.stats().c_w == pytest.approx(st.c_w)


def test_formula_matches_the_variance_of_the_mean() -> None:
    # Var(mean of K x M) = (v + (M-1) c_w + M (K-1) c_b) / (K M), checked against the direct
    # double sum of the covariance matrix.
    v, cw, cb, K, M = 3.0, 1.5, 0.8, 3, 4
    cov = np.full((K * M, K * M), cb)
    for k in range(K):
        cov[k * M : (k + 1) * M, k * M : (k + 1) * M] = cw
    np.fill_diagonal(cov, v)
    assert ensemble_variance(v, cw, cb, K, M) == pytest.approx(cov.sum() / (K * M) ** 2)
    assert ensemble_variance(v, np.nan, np.nan, 1, 1) == v  # nothing to estimate at 1 x 1
    assert ensemble_variance(v, cw, cb, 1, 10**9) == pytest.approx(cw)
    assert ensemble_variance(v, cw, cb, 10**9, 1) == pytest.approx(cb)


def test_predicted_correlation_matches_measured_subensembles() -> None:
    u, y = _draw(K=4, M=6, T=10, D=4000, seed=2)
    st = fit_variance(u, y)
    sizes = [(1, 1), (1, 6), (2, 3), (4, 6)]
    got = measure(u, y, sizes, draws=4)
    for row in got:
        p = predict(st, row["K"], row["M"])
        assert float(p["correlation"]) == pytest.approx(row["pearson"], abs=0.02)
        assert float(p["variance"]) == pytest.approx(row["variance"], rel=0.06)
        assert abs(row["spearman"] - row["pearson"]) < 0.05  # Gaussian: close
    # more members, more models: better; extra models beat extra members here (c_w > c_b)
    p = predict(st, np.array([1, 1, 4]), np.array([1, 6, 1]))
    assert p["correlation"][0] < p["correlation"][1] < p["correlation"][2] + 0.1
    table = theory_table(st, got, ks=[1, 2], ms=[1, 5])
    assert len(table["predicted"]) == 4 and table["stats"]["K"] == 4


def test_single_model_has_no_between_covariance() -> None:
    u, _ = _draw(K=1, M=3, T=4, D=200)
    st = fit_variance(u)
    assert np.isnan(st.c_b) and np.isfinite(st.c_w)
    assert float(predict(st, 1, 3)["relative"]) < 1.0


def test_bad_shapes() -> None:
    with pytest.raises(ValueError, match="K, M"):
        fit_variance(np.zeros((2, 3, 4)))
    acc = VarianceAccumulator()
    acc.add(0, np.zeros((2, 5)))
    with pytest.raises(ValueError, match="differ"):
        acc.add(0, np.zeros((2, 6)))


@pytest.mark.parametrize("method", ["graddot", "trak"])
def test_member_projections_of_a_real_hybrid(method) -> None:
    import torch

    import etda
    from etda.evaluate.variance import member_projections
    from etda.models import MLP

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 5, generator=g), torch.randint(0, 3, (30,), generator=g)
    xt, yt = torch.randn(7, 5, generator=g), torch.randint(0, 3, (7,), generator=g)
    models = []
    for s in range(2):
        torch.manual_seed(s)
        models.append(MLP(5, (8,), 3, dropout=0.3).eval())
    masks = np.random.default_rng(0).random((6, 30)) < 0.5
    ens = etda.Dropout(3, mode="fixed")
    scores, u = member_projections(models, (x, y), (xt, yt), masks, method, ens, dtype="float64")
    assert u.shape == (2, 3, 7, 6)
    full = etda.attribute(models, (x, y), (xt, yt), method, ens, dtype="float64")
    np.testing.assert_allclose(scores.values, full.values, rtol=1e-8, atol=1e-12)
    if method == "graddot":  # mean of members = the ensemble
        np.testing.assert_allclose(u.mean((0, 1)), full.values @ masks.T, rtol=1e-8)
    assert np.isfinite(fit_variance(u).c_b)
