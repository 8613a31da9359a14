"""The on-disk feature store: reuse, resumption, staleness and corruption detection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import etda
from etda.features import store as store_mod
from etda.features.featurize import Featurizer

D64 = torch.float64
N_TR, N_TE, CHUNK = 23, 6, 4
N_CHUNKS = -(-N_TR // CHUNK) + -(-N_TE // CHUNK)  # 6 train + 2 test


pytestmark = pytest.mark.usefixtures("one_thread")


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3)).to(D64)


def make_data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 10, generator=g, dtype=D64), torch.randint(0, 3, (n,), generator=g)


MODEL = make_mlp()
TRAIN, TEST = make_data(N_TR, 1), make_data(N_TE, 2)


def run(store=None, model=MODEL, train=TRAIN, test=TEST, **kw) -> etda.Scores:
    kw = {
        "method": "trak",
        "projection": "gaussian",
        "proj_dim": 32,
        "dtype": "float64",
        "chunk_size": CHUNK,
        **kw,
    }
    if kw["method"] in ("trak", "if"):
        kw.setdefault("damping", 0.1)
    if kw["projection"] in ("none", "identity"):  # exact features take no proj_dim
        kw.pop("proj_dim")
    return etda.attribute(model, train=train, test=test, store=store, **kw)


def assert_same(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to float64 rounding (different chunkings sum in a different order)."""
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12 * np.abs(b).max())


class CallCounter:
    """Counts featurizer chunk calls; optionally raises on call number ``fail_at`` (1-based)."""

    def __init__(self, monkeypatch, fail_at: int | None = None) -> None:
        self.calls, self.fail_at = 0, fail_at
        original = Featurizer.__call__
        counter = self

        def wrapped(fz, x, y):
            counter.calls += 1
            if counter.fail_at is not None and counter.calls == counter.fail_at:
                raise KeyboardInterrupt("simulated interruption")
            return original(fz, x, y)

        monkeypatch.setattr(Featurizer, "__call__", wrapped)


def split_dir(root: Path, split: str = "train", member: str = "member-000") -> Path:
    return root / member / split


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return run().values


# ----------------------------------------------------------------------------- reuse


def test_features_are_persisted_and_reused(tmp_path, monkeypatch, reference):
    counter = CallCounter(monkeypatch)
    first = run(tmp_path)
    assert counter.calls == N_CHUNKS
    np.testing.assert_array_equal(first.values, reference)
    for split, n in (("train", N_TR), ("test", N_TE)):
        folder = split_dir(tmp_path, split)
        assert (folder / "meta.json").exists() and (folder / "done.json").exists()
        phi = np.load(folder / "phi.npy")
        assert phi.shape == (n, 32) and phi.dtype == np.float64
        ranges = json.loads((folder / "done.json").read_text())["ranges"]
        assert sum(hi - lo for lo, hi, _ in ranges) == n
    before = snapshot(tmp_path)

    counter.calls = 0
    second = run(tmp_path)
    assert counter.calls == 0, "a complete store must not be recomputed"
    np.testing.assert_array_equal(second.values, first.values)
    assert snapshot(tmp_path) == before, "reusing a complete store must not rewrite it"
    # a different chunk size reads the same store
    third = run(tmp_path, chunk_size=9)
    assert counter.calls == 0
    assert_same(third.values, first.values)


def test_store_per_member_and_checkpoint(tmp_path, monkeypatch):
    ens = etda.ProjectionSeeds(members=2)
    ckpts = [make_mlp(5).state_dict(), make_mlp(6).state_dict()]
    plain_ens = run(ensemble=ens).values
    plain_tracin = run(method="tracin", checkpoints=ckpts, checkpoint_lrs=[1.0, 0.5]).values
    counter = CallCounter(monkeypatch)
    a = run(tmp_path / "ens", ensemble=ens).values
    b = run(tmp_path / "tracin", method="tracin", checkpoints=ckpts, checkpoint_lrs=[1.0, 0.5])
    assert counter.calls == 4 * N_CHUNKS
    assert sorted(p.name for p in (tmp_path / "ens").iterdir()) == ["member-000", "member-001"]
    counter.calls = 0
    np.testing.assert_array_equal(run(tmp_path / "ens", ensemble=ens).values, a)
    again = run(tmp_path / "tracin", method="tracin", checkpoints=ckpts, checkpoint_lrs=[1.0, 0.5])
    np.testing.assert_array_equal(again.values, b.values)
    assert counter.calls == 0
    np.testing.assert_array_equal(a, plain_ens)
    np.testing.assert_array_equal(b.values, plain_tracin)


# ------------------------------------------------------------------------ resumption


@pytest.mark.parametrize("resume_chunk", [CHUNK, 5, 1])
def test_interrupted_featurization_resumes(tmp_path, monkeypatch, reference, resume_chunk):
    done_before = 3
    counter = CallCounter(monkeypatch, fail_at=done_before + 1)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path)
    ranges = json.loads((split_dir(tmp_path) / "done.json").read_text())["ranges"]
    assert [r[:2] for r in ranges] == [[0, 4], [4, 8], [8, 12]]
    assert not (split_dir(tmp_path, "test") / "done.json").exists()

    counter.calls, counter.fail_at = 0, None
    resumed = run(tmp_path, chunk_size=resume_chunk)
    remaining_train = N_TR - done_before * CHUNK
    expected = -(-remaining_train // resume_chunk) + -(-N_TE // resume_chunk)
    assert counter.calls == expected, "only the missing rows may be recomputed"
    assert_same(resumed.values, reference)


def test_half_written_rows_are_never_read_as_valid(tmp_path, monkeypatch, reference):
    """Rows written to the arrays but not recorded in done.json (a kill between the two)
    and garbage in unrecorded rows are recomputed, not trusted."""
    calls = {"n": 0}
    original = store_mod._checksum

    def dying_checksum(arrays, lo, hi):
        calls["n"] += 1
        if calls["n"] == 3:  # the third chunk's rows are written and flushed, not recorded
            raise KeyboardInterrupt("killed before done.json was updated")
        return original(arrays, lo, hi)

    monkeypatch.setattr(store_mod, "_checksum", dying_checksum)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path)
    monkeypatch.setattr(store_mod, "_checksum", original)
    folder = split_dir(tmp_path)
    ranges = json.loads((folder / "done.json").read_text())["ranges"]
    assert [r[:2] for r in ranges] == [[0, 4], [4, 8]]
    phi = np.load(folder / "phi.npy", mmap_mode="r+")
    assert np.any(phi[8:12] != 0), "the unrecorded chunk was written (the case under test)"
    phi[8:] = np.nan  # garbage in every row that is not recorded as done
    phi.flush()
    del phi

    counter = CallCounter(monkeypatch)
    resumed = run(tmp_path)
    assert counter.calls == N_CHUNKS - 2
    np.testing.assert_array_equal(resumed.values, reference)


# ------------------------------------------------------------------------- staleness


@pytest.mark.parametrize(
    "change,field",
    [
        ({"model": make_mlp(seed=1)}, "weights"),
        ({"train": (TRAIN[0] + 1e-3, TRAIN[1])}, "data"),
        ({"train": (TRAIN[0][:-1], TRAIN[1][:-1])}, "data"),
        ({"projection": "sparse"}, "spec"),
        ({"proj_dim": 16}, "spec"),
        ({"seed": 1}, "spec"),
        ({"method": "graddot"}, "spec"),  # loss instead of margin gradients
        ({"use_hooks": False}, "hooks"),
    ],
)
def test_stale_store_is_refused(tmp_path, change, field):
    run(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(etda.StaleStoreError) as info:
        run(tmp_path, **change)
    msg = str(info.value)
    assert "different" in msg and field in msg and "member-000" in msg
    assert "Delete" in msg or "delete" in msg
    assert snapshot(tmp_path) == before, "a refused store must be left untouched"


def test_stale_test_split_is_refused(tmp_path):
    run(tmp_path)
    with pytest.raises(etda.StaleStoreError, match="data"):
        run(tmp_path, test=(TEST[0] * 2, TEST[1]))


# ------------------------------------------------------------------------ corruption


def _data_offset(path: Path) -> int:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            np.lib.format.read_array_header_1_0(f)
        else:
            np.lib.format.read_array_header_2_0(f)
        return f.tell()


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("block", ["phi", "q"])
def test_flipped_bytes_raise_corrupt_store(tmp_path, split, block):
    run(tmp_path)
    path = split_dir(tmp_path, split) / f"{block}.npy"
    raw = bytearray(path.read_bytes())
    pos = _data_offset(path) + 8 * 3 + 2  # a byte inside the 4th value
    raw[pos] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(etda.CorruptStoreError, match="checksum"):
        run(tmp_path)


def test_flipped_bytes_are_caught_out_of_core(tmp_path, reference):
    """Streaming reads never load the whole store: the recorded rows are verified when the
    store is reopened, so damaged rows cannot reach out-of-core scores either."""
    first = run(tmp_path, out_of_core=True)
    np.testing.assert_allclose(first.values, reference, rtol=1e-6)
    path = split_dir(tmp_path) / "phi.npy"
    raw = bytearray(path.read_bytes())
    raw[_data_offset(path) + 8 * 40 + 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(etda.CorruptStoreError, match="checksum"):
        run(tmp_path, out_of_core=True)
    fixed = run(tmp_path, out_of_core=True, repair=True)
    np.testing.assert_array_equal(fixed.values, first.values)


@pytest.mark.parametrize(
    "damage",
    ["npy-header", "npy-truncated", "npy-missing", "done-json", "meta-json"],
)
def test_damaged_files_raise_corrupt_store(tmp_path, damage):
    run(tmp_path)
    folder = split_dir(tmp_path)
    npy = folder / "phi.npy"
    if damage == "npy-header":
        raw = bytearray(npy.read_bytes())
        raw[:6] = b"garbag"
        npy.write_bytes(bytes(raw))
    elif damage == "npy-truncated":
        npy.write_bytes(npy.read_bytes()[:-100])
    elif damage == "npy-missing":
        npy.unlink()
    elif damage == "done-json":
        (folder / "done.json").write_text('{"ranges": [[0, 4, ')
    else:
        (folder / "meta.json").write_text("{not json")
    with pytest.raises(etda.CorruptStoreError) as info:
        run(tmp_path)
    assert str(folder) in str(info.value)


def test_in_memory_store_matches_disk_store(tmp_path, reference):
    np.testing.assert_array_equal(run(etda.FeatureStore(None)).values, reference)
    np.testing.assert_array_equal(run(etda.FeatureStore(tmp_path)).values, reference)
    np.testing.assert_array_equal(run(str(tmp_path)).values, reference)


def test_lora_members_are_reproducible_and_reuse_the_store(tmp_path, monkeypatch):
    """Adapters are re-trained from their seeds; identical weights find their stored features."""
    ens = etda.LoRA(members=2, rank=2, epochs=1)
    first = run(tmp_path, method="graddot", projection="identity", ensemble=ens)
    counter = CallCounter(monkeypatch)
    second = run(tmp_path, method="graddot", projection="identity", ensemble=ens)
    assert counter.calls == 0
    np.testing.assert_array_equal(second.values, first.values)


# --------------------------------------------------------------------------- repair


def _flip_byte(path: Path, row: int, width: int, itemsize: int = 8) -> None:
    raw = bytearray(path.read_bytes())
    raw[_data_offset(path) + row * width * itemsize + 3] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("rows", [[5], [5, 17], [22]])
def test_repair_recomputes_only_the_ranges_failing_their_checksum(
    tmp_path, monkeypatch, reference, rows
):
    run(tmp_path)
    folder = split_dir(tmp_path)
    for r in rows:
        _flip_byte(folder / "phi.npy", r, 32)
    with pytest.raises(etda.CorruptStoreError, match=r"repair=True \(CLI --repair\)"):
        run(tmp_path)
    counter = CallCounter(monkeypatch)
    fixed = run(tmp_path, repair=True)
    chunks = {r // CHUNK for r in rows}
    assert counter.calls == len(chunks)  # one featurizer call per damaged chunk, no more
    np.testing.assert_array_equal(fixed.values, reference)
    counter.calls = 0
    np.testing.assert_array_equal(run(tmp_path).values, reference)  # the store is whole again
    assert counter.calls == 0


def test_repair_through_a_feature_store_object(tmp_path, monkeypatch, reference):
    run(tmp_path)
    _flip_byte(split_dir(tmp_path, "test") / "q.npy", 1, 1)
    counter = CallCounter(monkeypatch)
    fixed = run(etda.FeatureStore(tmp_path, repair=True))
    assert counter.calls == 1
    np.testing.assert_array_equal(fixed.values, reference)


@pytest.mark.parametrize("damage", ["npy-header", "npy-missing", "done-json", "meta-json"])
def test_repair_rebuilds_unreadable_files(tmp_path, monkeypatch, reference, damage):
    run(tmp_path)
    folder = split_dir(tmp_path)
    if damage == "npy-header":
        (folder / "phi.npy").write_bytes(b"garbage" + (folder / "phi.npy").read_bytes()[7:])
    elif damage == "npy-missing":
        (folder / "phi.npy").unlink()
    elif damage == "done-json":
        (folder / "done.json").write_text('{"ranges": [[0, 4, ')
    else:
        (folder / "meta.json").write_text("{not json")
    counter = CallCounter(monkeypatch)
    fixed = run(tmp_path, repair=True)
    assert counter.calls == -(-N_TR // CHUNK)  # the damaged split only, every chunk of it
    np.testing.assert_array_equal(fixed.values, reference)


def test_repair_does_not_reuse_a_stale_store(tmp_path):
    """repair is for damaged rows: a store of another model is still refused."""
    run(tmp_path)
    with pytest.raises(etda.StaleStoreError, match="weights"):
        run(tmp_path, model=make_mlp(seed=1), repair=True)


@pytest.mark.parametrize("repair", [1, "yes", None])
def test_repair_must_be_a_bool(repair):
    with pytest.raises(ValueError, match="repair must be True or False"):
        run(repair=repair)


# ---------------------------------------------------------------------- safe loading


@pytest.mark.parametrize(
    "ranges",
    [
        "not a list",
        [[0, 4]],
        [[0, 4, 7]],
        [[0, 99, "abc"]],
        [[-1, 4, "abc"]],
        [[4, 4, "abc"]],
        [[0.0, 4, "abc"]],
        [[0, True, "abc"]],
    ],
)
def test_tampered_done_json_is_refused(tmp_path, ranges):
    run(tmp_path)
    (split_dir(tmp_path) / "done.json").write_text(json.dumps({"ranges": ranges}))
    with pytest.raises(etda.CorruptStoreError, match="done.json") as info:
        run(tmp_path)
    assert str(split_dir(tmp_path)) in str(info.value)


def test_overlapping_ranges_do_not_make_a_store_look_complete(tmp_path, monkeypatch, reference):
    """Two records of rows 0:20 sum to 40 >= 23 rows: coverage, not a row count, decides."""
    run(tmp_path)
    done = split_dir(tmp_path) / "done.json"
    first = json.loads(done.read_text())["ranges"]
    kept = [r for r in first if r[1] <= 20]
    done.write_text(json.dumps({"ranges": kept + kept}))
    counter = CallCounter(monkeypatch)
    np.testing.assert_array_equal(run(tmp_path).values, reference)
    assert counter.calls == 1  # rows 20:23 were missing and are computed


@pytest.mark.parametrize("meta", ["[1, 2]", '"text"', "null"])
def test_tampered_meta_json_is_refused(tmp_path, meta):
    run(tmp_path)
    (split_dir(tmp_path) / "meta.json").write_text(meta)
    with pytest.raises(etda.CorruptStoreError, match="meta.json"):
        run(tmp_path)


def test_an_object_array_in_the_store_is_never_unpickled(tmp_path):
    """A store array replaced by a pickled object array: refused, its pickle never runs."""
    run(tmp_path)
    marker = tmp_path / "executed"
    np.save(split_dir(tmp_path) / "phi.npy", np.array([_Payload(marker)], dtype=object))
    with pytest.raises(etda.CorruptStoreError, match="phi"):
        run(tmp_path)
    with pytest.raises(etda.CorruptStoreError):
        run(tmp_path, out_of_core=True)
    assert not marker.exists()


class _Payload:
    """Unpickling it would create ``marker`` (the test asserts it never happens)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))
