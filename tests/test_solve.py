"""DampedSystem.solve: the damped scores in both forms equal the closed form (float64)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from etda.methods.solve import DampedSystem


@pytest.mark.parametrize("form", ["feature", "sample"])
def test_solve_equals_the_closed_form(form) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 5, generator=g, dtype=torch.float64)
    t = torch.randn(4, 5, generator=g, dtype=torch.float64)
    ref = t @ torch.linalg.solve(x.T @ x + 0.5 * torch.eye(5, dtype=torch.float64), x.T)
    got = DampedSystem({"phi": x}, form=form).solve({"phi": t}, 0.5)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-13)


BENCHMARKS = sorted(
    p.stem for p in (Path(__file__).parents[1] / "benchmarks").glob("*.py") if p.stem != "__init__"
)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_scripts_import(name) -> None:
    importlib.import_module(f"benchmarks.{name}")
