"""Shared helpers for the benchmark scripts: settings, cached models, ground truth, RSS."""

from __future__ import annotations

import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from etda.evaluate.lds import LDSConfig, ground_truth
from etda.settings import get_setting
from etda.zoo import trained_models

RESULTS = Path(__file__).parent / "results"


def setup(setting_name: str = "fmnist-mlp", n_models: int = 1, threads: int = 2):
    """The setting, its data, ``n_models`` cached trained models and the LDS ground truth."""
    torch.set_num_threads(threads)
    setting = get_setting(setting_name)
    data = setting.data()
    models = trained_models(setting, n_models)
    gt = ground_truth(setting, LDSConfig(), cache_dir="runs/lds-cache", progress=True)
    return setting, data, models, gt


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_time(fn, repeats: int = 3) -> tuple[float, object]:
    """Median wall seconds of ``fn()`` over ``repeats`` runs, and the last result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def machine() -> dict:
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "cpus": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def write(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=float))
    return path
