"""Real kills: featurization SIGKILLed (not an in-process exception) at several points, each
run resuming the store the previous one left; the last run recomputes exactly the rows not
recorded as done, and its scores are bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from store_child import CHUNK, KW, N_TEST, N_TRAIN, problem

import etda
from etda.features.store import SplitStore

CHILD = Path(__file__).with_name("store_child.py")
pytestmark = pytest.mark.usefixtures("one_thread")


def _child(store: Path, out: Path, log: Path, kill: tuple[str, int] | None) -> int:
    args = [sys.executable, str(CHILD), str(store), str(out), str(log)]
    if kill is not None:
        args += ["--kill", kill[0], str(kill[1])]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=240)
    if kill is None:
        assert proc.returncode == 0, proc.stderr
    return proc.returncode


def _featurized(log: Path) -> int:
    return sum(int(line) for line in log.read_text().split()) if log.exists() else 0


def _recorded(store: Path) -> dict[str, list[list]]:
    """Recorded ranges per split; every one of them must pass its checksum."""
    out = {}
    for split in ("train", "test"):
        folder = store / "member-000" / split
        if not (folder / "done.json").exists():
            continue
        meta = json.loads((folder / "meta.json").read_text())
        st = SplitStore(folder, meta["n"], meta["widths"], torch.float64)
        st.verify()  # a kill never leaves a range marked done with wrong bytes
        out[split] = st.done
    return out


def _rows(ranges: dict[str, list[list]]) -> int:
    return sum(hi - lo for rs in ranges.values() for lo, hi, _ in rs)


# (kill mode, call number): where each run of the sequence dies. Chunks of 4 rows: 6 train
# chunks then 2 test chunks (23 + 6 rows).
KILLS = [
    ("before-record", 2),  # chunk 2 written, not recorded
    ("torn-write", 2),  # chunk 2 recomputed and recorded; chunk 3 half written
    ("done-json", 2),  # chunk 3 recorded; chunk 4's done.json never renamed into place
    ("after-record", 4),  # chunks 4-6 recorded (train complete), first test chunk recorded
]


def test_sigkill_at_several_points_then_resume(tmp_path):
    model, train, test = problem()
    reference = etda.attribute(model, train, test, **KW).values
    store, log = tmp_path / "store", tmp_path / "rows.log"
    before = 0
    for i, kill in enumerate(KILLS):
        log.unlink(missing_ok=True)
        rc = _child(store, tmp_path / f"out{i}.npy", log, kill)
        assert rc == -signal.SIGKILL, f"run {i} ({kill[0]}) was not killed: exit code {rc}"
        recorded = _rows(_recorded(store))
        assert recorded > before, f"run {i} ({kill[0]}) recorded nothing new"
        # a run computes from the first missing row: what it featurized is what it recorded
        # plus the chunk it died in (whose rows are not recorded)
        assert _featurized(log) == recorded - before + CHUNK * (kill[0] != "after-record"), i
        before = recorded
    assert before == N_TRAIN + CHUNK  # train complete, one test chunk
    log.unlink()
    _child(store, tmp_path / "final.npy", log, None)
    assert _featurized(log) == N_TRAIN + N_TEST - before == N_TEST - CHUNK  # only the missing
    np.testing.assert_array_equal(np.load(tmp_path / "final.npy"), reference)
    done = _recorded(store)
    assert _rows(done) == N_TRAIN + N_TEST  # every row once: no range recorded twice
    assert not list(store.rglob("*.tmp")), "a temporary file was left behind"
