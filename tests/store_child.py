"""A child process for the kill and concurrency tests: one attribution on a feature store,
optionally SIGKILLed at a chosen point, or slowed down so that another process meets it.

``python store_child.py STORE OUT LOG [--kill MODE K] [--sleep S] [--hold FILE]``: runs TRAK
(float64,
Gaussian sketch, chunk 4) of :func:`problem` with ``store=STORE``, appends the row count of
every featurizer call to LOG (flushed before anything else happens) and saves the scores to
OUT. Kill modes (K counts the calls of this run, from 1):

* ``before-record``: rows of chunk K written, killed before they are recorded as done;
* ``after-record``: killed right after chunk K is recorded;
* ``torn-write``: killed halfway through writing the bytes of chunk K;
* ``done-json``: killed between writing the K-th ``done.json`` to its temporary file and
  renaming it into place.
"""

from __future__ import annotations

import argparse
import os
import signal
import time

import numpy as np
import torch
from torch import nn

N_TRAIN, N_TEST, CHUNK = 23, 6, 4
KW = {
    "method": "trak",
    "projection": "gaussian",
    "proj_dim": 32,
    "dtype": "float64",
    "chunk_size": CHUNK,
    "damping": 0.1,
}


def problem() -> tuple[nn.Module, tuple, tuple]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N_TRAIN + N_TEST, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N_TRAIN + N_TEST,), generator=g)
    return model, (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install(kill: str | None, k: int, log: str, sleep: float, hold: str | None) -> None:
    from etda.features import store as store_mod
    from etda.features.featurize import Featurizer
    from etda.features.store import SplitStore

    calls = {"n": 0}
    featurize = Featurizer.__call__

    def counted(fz, x, y):
        if sleep:
            time.sleep(sleep)
        blocks = featurize(fz, x, y)
        with open(log, "a") as f:
            f.write(f"{x.shape[0]}\n")
            f.flush()
            os.fsync(f.fileno())
        while hold is not None and not os.path.exists(hold):  # wait for the other process
            time.sleep(0.01)
        return blocks

    Featurizer.__call__ = counted
    if kill is None:
        return

    def tick() -> bool:
        calls["n"] += 1
        return calls["n"] == k

    record, write, atomic = (
        SplitStore.record,
        SplitStore.write_encoded,
        store_mod._atomic_write_json,
    )

    def before_record(self, lo, hi, cs):
        if tick():
            _die()
        record(self, lo, hi, cs)

    def after_record(self, lo, hi, cs):
        record(self, lo, hi, cs)
        if tick():
            _die()

    def torn_write(self, lo, hi, arrays):
        if not tick():
            return write(self, lo, hi, arrays)
        key = sorted(arrays)[-1]  # "q": written last, so the earlier blocks are whole
        data = np.ascontiguousarray(arrays[key]).tobytes()
        row = self.widths[key] * self.np_dtypes[key].itemsize
        with open(self.folder / f"{key}.npy", "r+b") as f:
            f.seek(self.offsets[key] + lo * row)
            f.write(b"\xff" * (len(data) // 2))  # garbage where half the rows should be
            f.flush()
            os.fsync(f.fileno())
        _die()

    def done_json(path, obj):
        if path.name == "done.json" and tick():
            path.with_suffix(".tmp").write_text("{half-written")
            _die()
        atomic(path, obj)

    if kill == "before-record":
        SplitStore.record = before_record
    elif kill == "after-record":
        SplitStore.record = after_record
    elif kill == "torn-write":
        SplitStore.write_encoded = torn_write
    elif kill == "done-json":
        store_mod._atomic_write_json = done_json
    else:
        raise SystemExit(f"unknown kill mode {kill!r}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("store")
    ap.add_argument("out")
    ap.add_argument("log")
    ap.add_argument("--kill", nargs=2, default=None)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--hold", default=None, help="after each chunk, wait until this file exists")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import etda

    kill, k = (args.kill[0], int(args.kill[1])) if args.kill else (None, 0)
    _install(kill, k, args.log, args.sleep, args.hold)
    model, train, test = problem()
    store = etda.FeatureStore(args.store, lock_timeout=60)
    scores = etda.attribute(model, train, test, store=store, **KW)
    np.save(args.out, scores.values)


if __name__ == "__main__":
    main()
