"""Two processes on one feature store, and on one LDS cache: a ``filelock`` lock makes the
second one wait (then read what the first wrote) or, with a timeout, refuse with a message
naming the store and the process holding it. Rows are never computed twice or interleaved."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from store_child import KW, N_TEST, N_TRAIN, problem

import etda
from etda.evaluate import LDSConfig, ground_truth
from etda.features.featurize import Featurizer
from etda.features.store import SplitStore, StoreLockedError
from etda.settings import get_setting

CHILD = Path(__file__).with_name("store_child.py")
lds_mod = importlib.import_module("etda.evaluate.lds")  # the function lds shadows the module
pytestmark = pytest.mark.usefixtures("one_thread")


def _wait_for_owner(owner: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until ``proc`` holds the lock whose owner file is ``owner``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if json.loads(owner.read_text())["pid"] == proc.pid:
                return
        except (OSError, ValueError, KeyError):
            pass
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the first writer never took the lock"
        time.sleep(0.01)


def _count_rows(monkeypatch) -> list[int]:
    rows: list[int] = []
    original = Featurizer.__call__

    def counted(fz, x, y):
        rows.append(int(x.shape[0]))
        return original(fz, x, y)

    monkeypatch.setattr(Featurizer, "__call__", counted)
    return rows


def test_second_writer_of_a_feature_store_waits_or_refuses(tmp_path, monkeypatch, capfd):
    model, train, test = problem()
    store, log = tmp_path / "store", tmp_path / "first.log"
    args = [str(CHILD), str(store), str(tmp_path / "first.npy"), str(log), "--sleep", "0.3"]
    first = subprocess.Popen([sys.executable, *args], stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_owner(store / "member-000" / "train.lock.owner", first)
        # refuses after its timeout, naming the store and the writer
        refused = etda.FeatureStore(store, lock_timeout=0.2)
        with pytest.raises(StoreLockedError, match=rf"process {first.pid}") as info:
            etda.attribute(model, train, test, store=refused, **KW)
        assert str(store / "member-000" / "train") in str(info.value)
        # waits (saying so), then reads the rows the first process wrote
        rows = _count_rows(monkeypatch)
        second = etda.attribute(model, train, test, store=etda.FeatureStore(store), **KW)
    finally:
        _, err = first.communicate(timeout=240)
    assert first.returncode == 0, err
    assert "etda: waiting for feature store" in capfd.readouterr().err
    mine = sum(rows)
    theirs = sum(int(v) for v in log.read_text().split())
    assert mine + theirs == N_TRAIN + N_TEST, (mine, theirs)  # every row computed once
    assert theirs >= N_TRAIN  # the first writer held the training split throughout
    np.testing.assert_array_equal(second.values, np.load(tmp_path / "first.npy"))
    np.testing.assert_array_equal(second.values, etda.attribute(model, train, test, **KW).values)
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        folder = store / "member-000" / split
        meta = json.loads((folder / "meta.json").read_text())
        st = SplitStore(folder, n, meta["widths"], torch.float64)
        st.verify()
        spans = sorted((lo, hi) for lo, hi, _ in st.done)
        assert sum(hi - lo for lo, hi in spans) == n, spans  # no range recorded twice
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), spans


_SLOW_LDS = """
import importlib, sys, time
import numpy as np
from etda.evaluate import LDSConfig, ground_truth
lds = importlib.import_module("etda.evaluate.lds")
from etda.settings import get_setting

original = lds.retrain_outputs
def slow(*a, **k):
    time.sleep(0.4)
    with open(sys.argv[2], "a") as f:
        f.write("1\\n")
    return original(*a, **k)
lds.retrain_outputs = slow
gt = ground_truth(get_setting("digits-logreg"), LDSConfig(n_subsets=4), sys.argv[1],
                  "inprocess", progress=False)
np.save(sys.argv[3], gt.outputs)
"""


def test_second_writer_of_an_lds_cache_waits_or_refuses(tmp_path, monkeypatch, capfd):
    setting, config = get_setting("digits-logreg"), LDSConfig(n_subsets=4)
    cache, log, out = tmp_path / "lds", tmp_path / "jobs.log", tmp_path / "first.npy"
    script = [sys.executable, "-c", textwrap.dedent(_SLOW_LDS), str(cache), str(log), str(out)]
    first = subprocess.Popen(script, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    jobs: list[int] = []
    original = lds_mod.retrain_outputs
    monkeypatch.setattr(lds_mod, "retrain_outputs", lambda *a: jobs.append(1) or original(*a))
    try:
        folder = lds_mod.cache_folder(setting, config, cache)
        _wait_for_owner(folder / ".lock.owner", first)
        with pytest.raises(StoreLockedError, match=rf"LDS cache .* process {first.pid}"):
            ground_truth(setting, config, cache, "inprocess", progress=False, lock_timeout=0.2)
        gt = ground_truth(setting, config, cache, "inprocess", progress=False)
    finally:
        _, err = first.communicate(timeout=240)
    assert first.returncode == 0, err
    assert "etda: waiting for LDS cache" in capfd.readouterr().err
    assert jobs == [] and len(log.read_text().split()) == 4  # each job trained once
    np.testing.assert_array_equal(gt.outputs, np.load(out))
