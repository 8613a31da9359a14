"""Mixed-precision kernels (``kernel_dtype``): float32 or bfloat16 Gram products summed and
solved in float64 stay close to the float64 kernel, for exact factors and projections."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import etda
from etda.features.blocks import inner


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g), torch.randint(0, 4, (n,), generator=g)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))


TRAIN, TEST = data(300, 1), data(20, 2)


@pytest.mark.parametrize("projection", ["none", "factored"])
@pytest.mark.parametrize("method", ["trak", "graddot", "if"])
def test_float32_and_bfloat16_kernels_are_close_to_float64(method, projection) -> None:
    kw = {"method": method, "projection": projection}
    if projection == "factored":
        kw["proj_dim"] = 256
    ref = etda.attribute(mlp(), TRAIN, TEST, **kw)
    f32 = etda.attribute(mlp(), TRAIN, TEST, kernel_dtype="float32", **kw)
    bf16 = etda.attribute(mlp(), TRAIN, TEST, kernel_dtype="bfloat16", **kw)
    scale = np.abs(ref.values).max()
    np.testing.assert_allclose(f32.values, ref.values, rtol=0, atol=1e-4 * scale)
    assert not np.array_equal(f32.values, ref.values) or projection == "none"
    # bfloat16 keeps 8 bits of mantissa: about 1 % of the scale, and the ranking
    np.testing.assert_allclose(bf16.values, ref.values, rtol=0, atol=3e-2 * scale)
    rho = np.corrcoef(bf16.values.ravel(), ref.values.ravel())[0, 1]
    assert rho > 0.999
    assert f32.config["options"]["kernel_dtype"] == "float32"


def test_inner_sums_each_layers_product_in_float64() -> None:
    g = torch.Generator().manual_seed(3)
    a = {"d0": torch.randn(5, 3, generator=g), "a0": torch.randn(5, 7, generator=g)}
    b = {"d0": torch.randn(4, 3, generator=g), "a0": torch.randn(4, 7, generator=g)}
    exact = inner(a, b)
    got = inner(a, b, compute=torch.float32)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, exact, rtol=1e-6, atol=1e-6)
    want = (a["d0"].double() @ b["d0"].double().T) * (a["a0"].double() @ b["a0"].double().T)
    torch.testing.assert_close(exact, want, rtol=1e-12, atol=1e-12)


def test_an_unknown_kernel_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="kernel_dtype"):
        etda.attribute(mlp(), TRAIN, TEST, method="graddot", kernel_dtype="float16")


def _factors(n: int, seed: int, widths: tuple[int, ...] = (3, 300)) -> dict[str, torch.Tensor]:
    """Exact factors of two layers; the second is wide enough to use the input-Gram cache."""
    g = torch.Generator().manual_seed(seed)
    return {
        "d0": torch.randn(n, widths[0], generator=g),
        "a0": torch.randn(n, 7, generator=g),
        "d1": torch.randn(n, 5, generator=g),
        "a1": torch.randn(n, widths[1], generator=g),
        "phi": torch.randn(n, 9, generator=g),
    }


def test_the_float32_self_kernel_computes_one_triangle_and_mirrors_it() -> None:
    a = _factors(257, 4)  # 257: not a multiple of the mirror's block
    want = inner(a, dict(a))  # float64, general products (a different dict: no shortcut)
    for _ in range(2):  # the second pass reads the cached triangle of the wide input Gram
        got = inner(a, a, compute=torch.float32)
        assert got.dtype == torch.float64 and got.is_contiguous()
        assert torch.equal(got, got.T)  # exactly symmetric
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    general = inner(a, dict(a), compute=torch.float32)  # the general float32 path
    torch.testing.assert_close(got, general, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    # a mirror over several blocks equals the full symmetric matrix
    from etda.features.blocks import _mirror_upper

    upper = want.triu()
    full = upper + want.triu(1).T
    assert torch.equal(_mirror_upper(upper.clone(), block=60), full)
    assert torch.equal(_mirror_upper(upper.T.clone().T, block=60), full)  # column-major too


@pytest.mark.parametrize("method", ["trak", "if"])
@pytest.mark.parametrize("projection", ["none", "factored"])
def test_float32_solves_stay_close_to_float64(method, projection) -> None:
    kw = {"method": method, "projection": projection}
    if projection == "factored":
        kw["proj_dim"] = 128
    ref = etda.attribute(mlp(), TRAIN, TEST, **kw)
    fast = etda.attribute(mlp(), TRAIN, TEST, kernel_dtype="float32", solve_dtype="float32", **kw)
    scale = np.abs(ref.values).max()
    np.testing.assert_allclose(fast.values, ref.values, rtol=0, atol=1e-4 * scale)
    assert fast.config["options"]["solve_dtype"] == "float32"
    # float32 solves alone (float64 kernel) too, and self-influence in either form
    alone = etda.attribute(mlp(), TRAIN, TEST, solve_dtype="float32", **kw)
    np.testing.assert_allclose(alone.values, ref.values, rtol=0, atol=1e-4 * scale)
    if method == "trak":
        si_ref = etda.self_influence(mlp(), TRAIN, **kw).values[0]
        si = etda.self_influence(mlp(), TRAIN, solve_dtype="float32", **kw).values[0]
        np.testing.assert_allclose(si, si_ref, rtol=1e-3, atol=1e-4 * np.abs(si_ref).max())


def test_an_unknown_solve_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="solve_dtype"):
        etda.attribute(mlp(), TRAIN, TEST, method="trak", solve_dtype="bfloat16")


@pytest.mark.parametrize("damping", ["gcv", "evidence", "edof:0.2"])
def test_the_fast_path_keeps_its_kernel_in_float32_and_every_damping_rule_works(damping) -> None:
    from etda.features.blocks import Features
    from etda.methods.solve import DampedSystem, choose_damping

    blocks = _factors(120, 5)
    fast = DampedSystem(Features(blocks, torch.float32, torch.float32))
    exact = DampedSystem(Features(blocks))
    assert fast.kmat.dtype == torch.float32 and exact.kmat.dtype == torch.float64
    assert fast.trace == pytest.approx(exact.trace, rel=1e-5)
    y = torch.randn(120, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got, want = choose_damping(fast, damping, y=y), choose_damping(exact, damping, y=y)
    assert got.c == pytest.approx(want.c, rel=0.05)
    v = torch.randn(120, 3, dtype=torch.float64)
    torch.testing.assert_close(fast.matvec(v), exact.matvec(v), rtol=1e-4, atol=1e-3)
    d_fast, d_exact = fast.diagonal(got.lam), exact.diagonal(got.lam)
    assert d_fast.dtype == torch.float64
    torch.testing.assert_close(d_fast, d_exact, rtol=1e-3, atol=1e-4)
