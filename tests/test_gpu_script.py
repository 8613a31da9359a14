"""``benchmarks/gpu.py``: its tiny CPU mode end to end, the early CUDA error, and the pieces
the GPU run relies on (the traker side's copy of the CNN, the etda/traker table)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_fast_cpu_mode_writes_rows_with_finite_lds(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # nothing may land in the repository's runs/ or results/
    work, out = tmp_path / "work", tmp_path / "out"
    missing = tmp_path / "no-peers" / "python"  # the traker side is absent: skipped, said why
    proc = _run(
        ["--device", "cpu", "--fast", "--threads", "1", "--work", str(work), "--out", str(out)]
        + ["--peers-python", str(missing)],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "traker rows SKIPPED" in proc.stdout and str(missing) in proc.stdout
    payload = json.loads((out / "gpu.json").read_text())
    rows = {(r["setting"], r["name"]): r for r in payload["rows"]}
    assert set(rows) == {
        ("digits-mlp", "etda-trak-p2048"),
        ("digits-mlp", "etda-trak-exact"),
        ("digits-mlp", "traker-1"),
    }
    for name, projection in (("etda-trak-p2048", "factored"), ("etda-trak-exact", "none")):
        r = rows[("digits-mlp", name)]
        assert "error" not in r, r
        assert math.isfinite(r["lds"]) and math.isfinite(r["sem"]) and r["lds"] > 0
        assert r["wall_s"] > 0 and r["peak_rss_mb"] > 0 and r["peak_gpu_mb"] is None
        assert r["projection"] == projection and r["device"] == "cpu" and r["n_train"] == 1000
    skipped = rows[("digits-mlp", "traker-1")]["skipped"]
    assert "does not exist" in skipped and "setup.sh" in skipped
    meta = payload["meta"]
    assert meta["device"]["device"] == "cpu" and meta["device"]["torch"] == torch.__version__
    assert meta["lds"]["n_subsets"] == 4 and meta["peers"]["skipped"] == skipped
    md = (out / "gpu.md").read_text()
    assert "traker rows skipped" in md and "| etda-trak-exact |" in md
    # its own caches, under the work folder
    assert list((work / "models").glob("digits-mlp-*")) and list((work / "lds-cache").iterdir())
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_fails_early_and_clearly(tmp_path) -> None:
    work = tmp_path / "work"
    proc = _run(["--device", "cuda", "--fast", "--work", str(work)], tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "--device cuda was asked but CUDA is not available" in proc.stderr
    assert "--device cpu --fast" in proc.stderr
    assert not work.exists()  # before anything was trained or written


def test_traker_side_rebuilds_the_cnn_etda_attributes() -> None:
    from etda.settings import get_setting

    setting = get_setting("fmnist2-cnn")
    model = setting.make_model(0).eval()
    kw = json.loads(json.dumps(dict(setting.model_kwargs)))
    copy = gpu._peer_model({"arch": setting.model_name, "model_kwargs": kw}, rp=None).eval()
    copy.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(copy(x), model(x))


def test_table_pairs_etda_with_traker() -> None:
    base = {"setting": "s", "sem": 0.01, "peak_rss_mb": 900.0, "what": ""}
    rows = [
        {**base, "name": "etda-trak-p2048", "library": "etda", "lds": 0.3, "wall_s": 2.0}
        | {"peak_gpu_mb": 100.0, "projection": "factored", "proj_dim": 2048},
        {**base, "name": "traker-1", "library": "traker", "lds": 0.2, "wall_s": 8.0}
        | {"peak_gpu_mb": 400.0, "projection": "BasicProjector", "proj_dim": 2048},
        {**base, "name": "traker-5", "library": "traker", "skipped": "no traker here"},
        {**base, "name": "etda-trak-exact", "library": "etda", "error": "RuntimeError: x"},
        {**base, "name": "etda-trak-naive-5", "library": "etda", "lds": 0.4, "wall_s": 3.0},
    ]
    pairs = gpu._pairs(rows)
    assert pairs == [
        {
            "setting": "s",
            "etda": "etda-trak-p2048",
            "traker": "traker-1",
            "k_etda": 2048,
            "k_traker": 2048,
            "time_ratio_etda_over_traker": 0.25,
            "gpu_memory_ratio_etda_over_traker": 0.25,
            "lds_etda": 0.3,
            "lds_traker": 0.2,
        }
    ]
    meta = {
        "date": "d",
        "command": "python -m benchmarks.gpu",
        "device": {"device": "cuda", "device_name": "GPU", "torch": "t", "cuda": "c"}
        | {"cudnn": 1},
        "cpus": 16,
        "threads": None,
        "etda": "0",
        "lds": {"n_subsets": 50, "fraction": 0.5},
        "repeats": 1,
        "settings": ["s"],
        "peers": {"skipped": None, "traker": "0.3.2", "python_path": "py"},
    }
    md = gpu.table({"meta": meta, "rows": rows, "pairs": pairs})
    assert "| etda-trak-exact |  | failed: RuntimeError: x |" in md
    assert "| s | etda-trak-p2048 (2048) | traker-1 (2048) | 0.300 | 0.200 | 0.25 | 0.25 |" in md
    assert "| traker-5 |  | skipped: no traker here |" in md
