"""Every script in examples/ runs in its fast mode, and what it reports makes sense.

Each example's ``main(fast=True)`` returns a small dict of results; the assertions below are
the sanity checks the scripts print (label agreement, padding invariance, equal scores from
a DataLoader and from tensors, ...), at the sizes of the fast mode.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from conftest import needs_kjv

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytestmark = pytest.mark.usefixtures("one_thread")


def load(name: str) -> ModuleType:
    """``examples/<name>.py`` as a module (examples/ is not a package)."""
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"etda_example_{name}", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_example_is_tested_and_documented() -> None:
    scripts = sorted(p.stem for p in EXAMPLES.glob("*.py"))
    tested = sorted(
        name.removeprefix("test_")
        for name in globals()
        if name.startswith("test_") and name.removeprefix("test_") in scripts
    )
    assert tested == scripts, f"examples without a test: {sorted(set(scripts) - set(tested))}"
    readme = (EXAMPLES / "README.md").read_text()
    for name in scripts:
        assert f"python examples/{name}.py" in readme, f"{name} is not in examples/README.md"


def test_own_mlp_digits(capsys) -> None:
    pytest.importorskip("sklearn")
    r = load("own_mlp_digits").main(fast=True)
    assert r["shape"] == (30, 300)
    assert r["accuracy"] > 0.8
    # proponents share the test digit's label far more often than chance (10%)
    assert r["agreement_trak"] > 0.5
    assert r["agreement_dropout"] > 0.5
    # the 10% most self-influential examples hold most of the flipped labels
    assert r["flips_found_top10"] > 0.5
    assert "top-10 proponents share the test digit's label" in capsys.readouterr().out


def test_regression() -> None:
    pytest.importorskip("sklearn")
    r = load("regression").main(fast=True)
    assert r["shape"] == (40, 402) and r["task"] == "regression"
    # IF = residual_t * residual_i * TRAK kernel, up to the curvature's damping
    assert r["if_trak_corr"] > 0.8
    # ground truth by retraining: removing helpful rows hurts, removing harmful ones helps
    assert r["mse_without_helpful"] > r["mse_without_random"] > r["mse_without_harmful"]
    assert r["mse_without_helpful"] > r["mse"] > r["mse_without_harmful"]


def test_hf_text_classifier() -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    r = load("hf_text_classifier").main(fast=True)
    assert r["shape"] == (16, 160)
    assert r["accuracy"] >= 0.75
    assert r["gradcos_same_label"] > 0.8 and r["trak_same_label"] > 0.8  # chance: 50%
    assert r["trak_same_key"] > 0.25  # chance: 10%
    assert r["padding_change"] < 1e-4  # padded positions change no score


@needs_kjv
def test_gpt2_kjv() -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    r = load("gpt2_kjv").main(fast=True)
    assert r["shape"] == (12, 240) and r["task"] == "sequence"
    assert r["loss_after"] < r["loss_before"] - 0.5  # it learned something
    assert r["same_book"] > r["chance"] + 0.05  # proponents come from the test verse's book


def test_dataloader_of_dicts() -> None:
    r = load("dataloader_of_dicts").main(fast=True)
    assert r["shape"] == (10, 200)
    assert r["accuracy"] > 0.6
    assert r["diff_loader"] < 1e-6 and r["diff_list"] < 1e-6
    assert r["shuffle_refused"]


def test_examples_share_one_command_line() -> None:
    """``--fast`` is the flag; ``main`` is what the command line calls."""
    for path in EXAMPLES.glob("*.py"):
        text = path.read_text()
        assert "def main(fast: bool = False) -> dict:" in text, path.name
        assert 'parser.add_argument("--fast"' in text, path.name
        assert "main(fast=parser.parse_args().fast)" in text, path.name
