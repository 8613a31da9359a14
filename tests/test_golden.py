"""The engine reproduces its recorded outputs (``tests/golden``): every method x ensemble
kind, dense and out of core, in process and on worker processes, low-precision storage,
top-k and self-influence.

On the environment that recorded them (same CPU model, torch and numpy) outputs must be
bit-identical, except the cases whose ``tolerance_note`` names a legitimate change of
rounding (a product associated the other way): those agree to 1e-12 of the largest score.
Elsewhere vectorized kernels round differently, so the comparison is at float32 level
(1e-4 of the largest score), and says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from tests.golden.cases import Inputs, cases, run_case
from tests.golden.make import environment

HERE = Path(__file__).parent / "golden"
META = json.loads((HERE / "golden.json").read_text())
TENSORS = load_file(HERE / "golden.safetensors")
SAME_ENV = environment() == META["environment"]
CASES = {c.name: c for c in cases()}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs() -> Inputs:
    t = {k.removeprefix("input."): v for k, v in TENSORS.items() if k.startswith("input.")}
    return Inputs(t, META["checkpoint_lrs"])


def test_every_recorded_case_is_still_defined():
    assert [c["name"] for c in META["cases"]] == list(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_golden(name: str, inputs: Inputs):
    case = CASES[name]
    out = run_case(case, inputs)
    recorded = {
        k.removeprefix(f"case.{name}."): v.numpy()
        for k, v in TENSORS.items()
        if k.startswith(f"case.{name}.")
    }
    assert sorted(out) == sorted(recorded)
    for key, want in recorded.items():
        got = out[key]
        assert got.shape == want.shape and got.dtype == want.dtype, key
        if key.startswith("topk.") and "scores" not in key:
            assert np.array_equal(got, want), f"{name} {key}: top-k indices changed"
            continue
        scale = float(np.abs(want).max()) or 1.0
        err = float(np.abs(got - want).max()) / scale
        if not SAME_ENV:
            assert err <= 1e-4, f"{name} {key}: {err:.2e} of the largest score (other CPU)"
        elif case.tolerance_note:
            assert err <= 1e-12, f"{name} {key}: {err:.2e} ({case.tolerance_note})"
        else:
            assert np.array_equal(got, want), f"{name} {key}: not bit-identical ({err:.2e})"
