"""Damping criteria chosen without ground truth: the evidence (log marginal likelihood) of the
linearized Bayesian ridge model, against a planted prior and a brute-force Gaussian
likelihood; its Lanczos path against its eigen path; the effective-dimension rule; bad input;
and the rules recorded end to end (float64 throughout)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.distributions import MultivariateNormal

import etda
import etda.methods.solve as solve
from etda.experiment import parse_damping
from etda.methods import get_method
from etda.methods.solve import GRID, DampedSystem, choose_damping

D64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def planted(n: int, k: int, sigma_w: float, sigma: float, seed: int) -> tuple[Tensor, Tensor]:
    """Features ``(n, k)`` and targets ``y = Phi w + eps``, ``w ~ N(0, sigma_w^2 I)``,
    ``eps ~ N(0, sigma^2 I)``: the evidence's own model, with ``lam = sigma^2 / sigma_w^2``."""
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(n, k, generator=g, dtype=D64)
    w = sigma_w * torch.randn(k, generator=g, dtype=D64)
    return phi, phi @ w + sigma * torch.randn(n, generator=g, dtype=D64)


@pytest.mark.parametrize("form", ["feature", "sample"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evidence_recovers_the_planted_prior(form, seed):
    """The evidence-maximizing lam is within a factor 2 of ``sigma^2 / sigma_w^2`` (the grid
    steps by 10^0.2 = 1.6 and sigma_w^2 is estimated from 60 weights), and is recorded with
    its grid and curve."""
    phi, y = planted(n=600, k=60, sigma_w=0.3, sigma=1.0, seed=seed)
    d = choose_damping(DampedSystem({"phi": phi}, form=form), "evidence", y=y)
    truth = 1.0 / 0.3**2
    assert d.rule == "evidence"
    assert truth / 2 < d.lam < truth * 2, (d.lam, truth)
    assert d.lam in d.grid and len(d.grid) == len(d.curve) == len(GRID)
    assert int(np.argmax(d.curve)) == d.grid.index(d.lam)
    assert 0 < d.grid.index(d.lam) < len(d.grid) - 1  # an interior optimum
    base = float((phi**2).sum()) / 60
    assert d.c == pytest.approx(d.lam / base, rel=1e-12)


def brute_force_evidence(phi: Tensor, y: Tensor, lam: float) -> tuple[float, float]:
    """``max_s log N(y; 0, s (Phi Phi^T + lam I))`` by ``MultivariateNormal``, at the closed-form
    best scale, and the best log-likelihood over a scan of scales around it."""
    n = y.shape[0]
    cov = phi @ phi.T + lam * torch.eye(n, dtype=D64)
    s_hat = float(y @ torch.linalg.solve(cov, y)) / n
    at = float(MultivariateNormal(torch.zeros(n, dtype=D64), s_hat * cov).log_prob(y))
    scan = max(
        float(MultivariateNormal(torch.zeros(n, dtype=D64), s * cov).log_prob(y))
        for s in s_hat * torch.logspace(-1, 1, 41, dtype=D64)
    )
    return at, scan


@pytest.mark.parametrize("form,k", [("feature", 6), ("sample", 6), ("sample", 40)])
def test_evidence_equals_a_brute_force_marginal_likelihood(form, k):
    """The profiled curve equals the Gaussian log-likelihood of ``y`` at the best scale, on a
    small problem (k < n: the zero eigenvalues count; k > n: K is full rank)."""
    phi, y = planted(n=25, k=k, sigma_w=0.5, sigma=0.7, seed=4)
    system = DampedSystem({"phi": phi}, form=form)
    d = choose_damping(system, "evidence", y=y)
    brute = [brute_force_evidence(phi, y, lam) for lam in d.grid]
    at = np.array([b[0] for b in brute])
    np.testing.assert_allclose(d.curve, at, rtol=1e-10)
    scan = np.array([b[1] for b in brute])
    assert (scan <= at + 1e-9 * np.abs(at)).all()  # the profiled scale is the best one
    assert d.lam == d.grid[int(np.argmax(at))]


def test_evidence_same_in_feature_and_sample_space():
    phi, y = planted(n=80, k=20, sigma_w=0.4, sigma=1.0, seed=5)
    lams = GRID * 7.0
    a = DampedSystem({"phi": phi}, form="feature").evidence_exact(y, lams)
    b = DampedSystem({"phi": phi}, form="sample").evidence_exact(y, lams)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=0)


def test_lanczos_evidence_tracks_the_eigen_path(monkeypatch):
    """Above EXACT_GCV_MAX the evidence is estimated by Lanczos quadrature (stochastic for
    the log determinant); where both apply it follows the exact curve within 3 % (loosest at
    the smallest lam, where log(s + lam) is hardest to integrate) and picks the same lam up to
    one grid step."""
    phi, y = planted(n=200, k=150, sigma_w=0.3, sigma=1.0, seed=3)
    exact = choose_damping(DampedSystem({"phi": phi}, form="sample"), "evidence", y=y)
    monkeypatch.setattr(solve, "EXACT_GCV_MAX", 0)
    approx = choose_damping(DampedSystem({"phi": phi}, form="sample"), "evidence", y=y)
    a, e = np.array(approx.curve), np.array(exact.curve)
    assert (np.abs(a - e) < 0.03 * np.abs(e)).all()
    i, j = exact.grid.index(exact.lam), approx.grid.index(approx.lam)
    assert abs(i - j) <= 1
    assert e[j] >= e[i] - 1.0  # the Lanczos choice gives up less than 1 nat of evidence
    # the Lanczos GCV on the same system reuses the probes' Lanczos nodes: same answer
    system = DampedSystem({"phi": phi}, form="sample")
    lams = GRID * system.base
    first = system.gcv(y, lams)
    system.evidence(y, lams)
    torch.testing.assert_close(system.gcv(y, lams), first, rtol=0, atol=0)


@pytest.mark.parametrize("form", ["feature", "sample"])
@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.8])
def test_edof_rule_hits_its_effective_dimension(form, fraction):
    phi, y = planted(n=120, k=40, sigma_w=1.0, sigma=1.0, seed=6)
    system = DampedSystem({"phi": phi}, form=form)
    d = choose_damping(system, f"edof:{fraction}")
    s = torch.linalg.eigvalsh(phi.T @ phi)
    dof = float((s / (s + d.lam)).sum())
    assert dof == pytest.approx(fraction * 40, rel=0.01)
    assert d.rule == f"edof:{fraction:g}" and d.c == pytest.approx(d.lam / system.base)
    assert len(d.grid) == len(d.curve)


def test_lanczos_edof_tracks_the_exact_count(monkeypatch):
    phi, _ = planted(n=200, k=150, sigma_w=1.0, sigma=1.0, seed=7)
    exact = choose_damping(DampedSystem({"phi": phi}, form="sample"), "edof:0.2")
    monkeypatch.setattr(solve, "EXACT_GCV_MAX", 0)
    approx = choose_damping(DampedSystem({"phi": phi}, form="sample"), "edof:0.2")
    assert approx.lam == pytest.approx(exact.lam, rel=0.15)


def test_bad_input_gets_a_clear_error():
    phi, y = planted(n=30, k=5, sigma_w=1.0, sigma=1.0, seed=8)
    system = DampedSystem({"phi": phi}, form="feature")
    with pytest.raises(ValueError, match="needs regression targets"):
        choose_damping(system, "evidence")
    bad = y.clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="finite targets"):
        choose_damping(system, "evidence", y=bad)
    with pytest.raises(ValueError, match="29 targets for 30 examples"):
        choose_damping(system, "evidence", y=y[:29])
    with pytest.raises(ValueError, match="not all zero"):
        choose_damping(system, "evidence", y=torch.zeros(30, dtype=D64))
    nan_phi = phi.clone()
    nan_phi[0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite, nonzero training features"):
        choose_damping(DampedSystem({"phi": nan_phi}, form="sample"), "evidence", y=y)
    for text in ("edof:0", "edof:1.5", "edof:x", "edof:nan"):
        with pytest.raises(ValueError, match="edof:F needs a fraction"):
            choose_damping(system, text)
        with pytest.raises(ValueError, match="edof:F needs a fraction"):
            parse_damping(text)
    with pytest.raises(ValueError, match="'evidence'"):
        choose_damping(system, "marginal")
    assert parse_damping(" evidence ") == "evidence" and parse_damping("edof:0.1") == "edof:0.1"


def tiny_problem() -> tuple[nn.Module, tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(D64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 6, generator=g, dtype=D64)
    y = torch.randint(0, 3, (30,), generator=g)
    return model, (x[:24], y[:24]), (x[24:], y[24:])


@pytest.mark.parametrize(
    "method",
    [get_method("trak", damping="evidence"), "trak", "if", get_method("trak", damping="edof:0.2")],
)
def test_rule_is_recorded_end_to_end(method):
    """``damping="evidence"`` (object or string form) is recorded per member with its grid and
    curve, and the scores are those of the chosen lam given as a number."""
    model, train, test = tiny_problem()
    kw = {"dtype": "float64", "projection": "identity"}
    extra = {} if not isinstance(method, str) else {"damping": "evidence"}
    s = etda.attribute(model, train, test, method=method, **kw, **extra)
    d = s.config["members"][0]["damping"]
    rule = "edof:0.2" if "edof" in str(getattr(method, "damping", "")) else "evidence"
    assert d["rule"] == rule and d["lam"] > 0 and math.isfinite(d["c"])
    assert len(d["grid"]) == len(d["curve"]) > 0
    if rule == "evidence":
        assert d["grid"][int(np.argmax(d["curve"]))] == d["lam"]
    name = method if isinstance(method, str) else method.name
    lam = d.get("lam_H", d["lam"])  # IF records lam in units of H = Phi^T Phi / n
    fixed = etda.attribute(model, train, test, method=name, damping=lam, **kw)
    np.testing.assert_allclose(s.values, fixed.values, rtol=1e-8, atol=1e-12)


def test_shared_solve_applies_the_evidence_to_the_mean_kernel():
    model, train, test = tiny_problem()
    other = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(D64)
    s = etda.attribute(
        [model, other],
        train,
        test,
        method=get_method("trak", damping="evidence", solve="shared"),
        dtype="float64",
        projection="identity",
    )
    d = s.config["shared_solve"]["damping"]
    assert d["rule"] == "evidence" and d["grid"][int(np.argmax(d["curve"]))] == d["lam"]


def test_evidence_is_refused_out_of_core():
    model, train, test = tiny_problem()
    with pytest.raises(ValueError, match="'evidence'"):
        etda.attribute(
            model,
            train,
            test,
            method="trak",
            damping="evidence",
            proj_dim=8,
            projection="factored",
            out_of_core=True,
        )
