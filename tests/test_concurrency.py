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
import threading
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
    """The first writer (a child process) stops after its first chunk until the second one
    is seen waiting for the lock: the order of events is forced, not left to timing."""
    from etda.features import store as store_mod

    model, train, test = problem()
    store, log, go = tmp_path / "store", tmp_path / "first.log", tmp_path / "go"
    args = [str(CHILD), str(store), str(tmp_path / "first.npy"), str(log), "--hold", str(go)]
    first = subprocess.Popen([sys.executable, *args], stderr=subprocess.PIPE, text=True)
    waiting = threading.Event()
    read_owner = store_mod._read_owner

    def seen_waiting(owner):  # called where a writer finds the lock taken
        waiting.set()
        return read_owner(owner)

    def release_first():
        waiting.wait(timeout=120)
        go.touch()

    try:
        _wait_for_owner(store / "member-000" / "train.lock.owner", first)
        # refuses after its timeout, naming the store and the writer
        refused = etda.FeatureStore(store, lock_timeout=0.2)
        with pytest.raises(StoreLockedError, match=rf"process {first.pid}") as info:
            etda.attribute(model, train, test, store=refused, **KW)
        assert str(store / "member-000" / "train") in str(info.value)
        # waits (saying so), then reads the rows the first process wrote
        monkeypatch.setattr(store_mod, "_read_owner", seen_waiting)
        threading.Thread(target=release_first, daemon=True).start()
        rows = _count_rows(monkeypatch)
        second = etda.attribute(model, train, test, store=etda.FeatureStore(store), **KW)
    finally:
        go.touch()
        _, err = first.communicate(timeout=240)
    assert first.returncode == 0, err
    assert waiting.is_set() and "etda: waiting for feature store" in capfd.readouterr().err
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
import importlib, os, sys, time
import numpy as np
from etda.evaluate import LDSConfig, ground_truth
lds = importlib.import_module("etda.evaluate.lds")
from etda.settings import get_setting

original = lds.retrain_outputs
def slow(*a, **k):
    out = original(*a, **k)
    with open(sys.argv[2], "a") as f:
        f.write("1\\n")
    while not os.path.exists(sys.argv[4]):  # hold the lock until the other run waits
        time.sleep(0.01)
    return out
lds.retrain_outputs = slow
gt = ground_truth(get_setting("digits-logreg"), LDSConfig(n_subsets=4), sys.argv[1],
                  "inprocess", progress=False)
np.save(sys.argv[3], gt.outputs)
"""


def test_second_writer_of_an_lds_cache_waits_or_refuses(tmp_path, monkeypatch, capfd):
    from etda.features import store as store_mod

    setting, config = get_setting("digits-logreg"), LDSConfig(n_subsets=4)
    cache, log, out, go = (tmp_path / n for n in ("lds", "jobs.log", "first.npy", "go"))
    code = textwrap.dedent(_SLOW_LDS)
    script = [sys.executable, "-c", code, str(cache), str(log), str(out), str(go)]
    first = subprocess.Popen(script, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    jobs: list[int] = []
    original = lds_mod.retrain_outputs
    monkeypatch.setattr(lds_mod, "retrain_outputs", lambda *a: jobs.append(1) or original(*a))
    waiting = threading.Event()
    read_owner = store_mod._read_owner

    def seen_waiting(owner):
        waiting.set()
        return read_owner(owner)

    def release_first():
        waiting.wait(timeout=120)
        go.touch()

    try:
        folder = lds_mod.cache_folder(setting, config, cache)
        _wait_for_owner(folder / ".lock.owner", first)
        with pytest.raises(StoreLockedError, match=rf"LDS cache .* process {first.pid}"):
            ground_truth(setting, config, cache, "inprocess", progress=False, lock_timeout=0.2)
        monkeypatch.setattr(store_mod, "_read_owner", seen_waiting)
        threading.Thread(target=release_first, daemon=True).start()
        gt = ground_truth(setting, config, cache, "inprocess", progress=False)
    finally:
        go.touch()
        _, err = first.communicate(timeout=240)
    assert first.returncode == 0, err
    assert waiting.is_set() and "etda: waiting for LDS cache" in capfd.readouterr().err
    assert jobs == [] and len(log.read_text().split()) == 4  # each job trained once
    np.testing.assert_array_equal(gt.outputs, np.load(out))


def test_locks_are_released_after_success_and_after_a_failure(tmp_path, monkeypatch):
    """A finished run frees its locks; so does one interrupted mid-featurization once its
    stores are gone (another open of the lock file, as another process would, succeeds)."""
    import gc

    from etda.features import store as store_mod

    model, train, test = problem()
    etda.attribute(model, train, test, store=tmp_path / "ok", **KW)
    for split in ("train", "test"):
        _free(tmp_path / "ok" / "member-000" / f"{split}.lock")
    original = Featurizer.__call__
    calls = {"n": 0}

    def failing(fz, x, y):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("interrupted")
        return original(fz, x, y)

    monkeypatch.setattr(Featurizer, "__call__", failing)
    with pytest.raises(KeyboardInterrupt):
        etda.attribute(model, train, test, store=tmp_path / "cut", **KW)
    gc.collect()
    _free(tmp_path / "cut" / "member-000" / "train.lock")
    assert not any(str(tmp_path) in key for key in store_mod._LOCKS)
    assert not (tmp_path / "cut" / "member-000" / "train.lock.owner").exists()


def _free(path: Path) -> None:
    """The lock file can be taken at once by a new handle (as by another process)."""
    from filelock import FileLock

    lock = FileLock(path)
    with lock.acquire(timeout=0):
        assert lock.is_locked
