"""Damping rules and the damped solve: GCV on a problem with a known answer, the
spectral-mean rule, Lanczos vs exact GCV, and blocked kernel assembly."""

from __future__ import annotations

import torch

from etda.features import blocks as fb
from etda.methods.solve import GRID, DampedSystem, choose_damping


def ridge_problem(n: int = 300, p: int = 80, noise: float = 1.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    beta = torch.randn(p, generator=g, dtype=torch.float64) / p**0.5 * 3
    y = x @ beta + noise * torch.randn(n, generator=g, dtype=torch.float64)
    return x, beta, y


def test_gcv_recovers_the_risk_optimal_ridge_lambda():
    """GCV's choice has prediction risk within 5 % of the best lambda on the grid, where the
    risk ||X (beta_hat(lam) - beta)||^2 / n is computed from the known beta."""
    x, beta, y = ridge_problem()
    system = DampedSystem({"phi": x}, form="feature")
    d = choose_damping(system, "gcv", y=y)
    lams = torch.tensor(d.grid)

    def risk(lam: float) -> float:
        a = x.T @ x + lam * torch.eye(x.shape[1], dtype=torch.float64)
        b = torch.linalg.solve(a, x.T @ y)
        return float(((x @ (b - beta)) ** 2).mean())

    risks = torch.tensor([risk(float(lam)) for lam in lams])
    assert risk(d.lam) <= 1.05 * float(risks.min())
    # and it is not at the edge of the grid: the criterion found an interior optimum
    assert 0 < d.grid.index(d.lam) < len(d.grid) - 1


def test_gcv_same_in_feature_and_sample_space():
    x, _, y = ridge_problem(n=60, p=20)
    lams = GRID * 10.0
    a = DampedSystem({"phi": x}, form="feature").gcv_exact(y, lams)
    b = DampedSystem({"phi": x}, form="sample").gcv_exact(y, lams)
    torch.testing.assert_close(a, b, rtol=1e-8, atol=0)


def test_lanczos_gcv_tracks_the_exact_curve():
    x, _, y = ridge_problem(n=200, p=150, seed=3)
    system = DampedSystem({"phi": x}, form="sample")
    lams = GRID * system.base
    exact = system.gcv_exact(y, lams)
    system.dim = 10**9  # force the Lanczos path
    approx = system.gcv(y, lams, steps=80, probes=32)
    rel = ((approx - exact).abs() / exact).max()
    assert rel < 0.15
    assert abs(int(approx.argmin()) - int(exact.argmin())) <= 2


def test_spectral_mean_rule():
    x, _, _ = ridge_problem(n=50, p=20)
    for form, dim in (("feature", 20), ("sample", 20)):
        system = DampedSystem({"phi": x}, form=form)
        d = choose_damping(system, "auto")
        assert d.rule == "spectral-mean" and d.c == 1.0
        assert abs(d.lam - float((x**2).sum()) / dim) < 1e-9 * d.lam
        assert abs(choose_damping(system, "trace:0.5").lam - 0.5 * d.lam) < 1e-9 * d.lam


def test_blocked_kernel_assembly_equals_one_shot():
    """The kernel assembled block by block (rows x cols) equals the one-shot kernel, for
    explicit features and for Linear-layer factors (Gram trick)."""
    g = torch.Generator().manual_seed(1)
    blocks = {
        "g": torch.randn(37, 11, generator=g, dtype=torch.float64),
        "d0": torch.randn(37, 5, generator=g, dtype=torch.float64),
        "a0": torch.randn(
            37, 300, generator=g, dtype=torch.float64
        ),  # wide: goes through the memoized Gram
    }
    full = fb.inner(blocks, blocks)
    step = 8
    rows = []
    for i in range(0, 37, step):
        cols = [
            fb.inner(blocks, blocks, rows=slice(i, i + step), cols=slice(j, j + step))
            for j in range(0, 37, step)
        ]
        rows.append(torch.cat(cols, 1))
    torch.testing.assert_close(torch.cat(rows, 0), full, rtol=1e-12, atol=1e-12)
    explicit = blocks["g"] @ blocks["g"].T + (blocks["d0"] @ blocks["d0"].T) * (
        blocks["a0"] @ blocks["a0"].T
    )
    torch.testing.assert_close(full, explicit, rtol=1e-12, atol=1e-12)
    # the memoized Gram is not mutated by later products
    torch.testing.assert_close(fb.inner(blocks, blocks), full, rtol=0, atol=0)
