"""The main job (`etda demo`) runs end to end on a tiny setting and prints LDS and costs."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from etda.cli import app


def test_demo_prints_quality_and_costs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # caches go under tmp_path/runs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(
            app,
            [
                "demo",
                "--setting",
                "digits-mlp",
                "--naive",
                "2",
                "--efficient",
                "dropout:2,checkpoints:2",
                "--n-subsets",
                "6",
                "--executor",
                "inprocess",
                "--top",
                "1",
            ],
        )
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "single model" in out and "naive ensemble (2 models)" in out
    assert "dropout ensemble (2 members" in out and "checkpoints ensemble (2" in out
    assert "LDS" in out and "serve" in out and "proponents" in out
    assert "vs naive: LDS" in out
