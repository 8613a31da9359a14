"""Feature store: every member's features on disk (memory-mapped), resumable and validated.

Layout (one folder per member and split)::

    ROOT/member-000/meta.json          what produced it (weights hash, data, spec, version)
    ROOT/member-000/train/<block>.npy  (n, width) arrays, memory-mapped
    ROOT/member-000/train/done.json    completed row ranges with a checksum each

Rows are written, flushed, and only then recorded in ``done.json`` (atomically, by
rename), so a killed run never leaves half-written rows marked valid; the next run
computes just the missing ranges. A folder whose metadata differs from the request is
refused (never silently reused) and a range whose checksum fails is reported as corrupt,
or, with ``repair=True``, recomputed (only the failing ranges).

One writer at a time: opening a split that still has rows to compute takes an exclusive
lock (``ROOT/member-000/train.lock``, a ``filelock`` lock) until the split is complete, so
a second process on the same store waits (or, after ``lock_timeout`` seconds, refuses with
:class:`StoreLockedError`) and then finds the rows done instead of writing them again.
Only JSON and ``.npy`` arrays (never pickles) are read back, and everything read is
validated. ``FeatureStore(None)`` keeps everything in memory with the same interface.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch import Tensor


class StaleStoreError(RuntimeError):
    """The stored features were made by a different model, data or configuration."""


class CorruptStoreError(RuntimeError):
    """Stored features fail their checksum or are unreadable."""


class StoreLockedError(RuntimeError):
    """Another process is writing the same feature store (its lock was not released in time)."""


REPAIR_HINT = (
    "pass repair=True (CLI --repair) to recompute only the damaged rows, or delete the folder "
    "to recompute everything"
)

# Locks this process holds, by lock file: a process may open the same split several times
# (members sharing features, the driver of worker jobs); filelock counts re-entries.
_LOCKS: dict[str, FileLock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock(path: Path) -> FileLock:
    with _LOCKS_GUARD:
        key = str(path.resolve())
        if key not in _LOCKS:
            _LOCKS[key] = FileLock(key, thread_local=False)
        return _LOCKS[key]


def acquire_lock(path: Path, timeout: float | None, what: str) -> FileLock:
    """Take the writer lock ``path`` (re-entrant within this process): wait up to ``timeout``
    seconds (None: as long as it takes, saying so on stderr) or raise StoreLockedError."""
    lock = _lock(path)
    owner = path.with_name(path.name + ".owner")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = _read_owner(owner)
        if timeout is not None and timeout <= 0:
            raise StoreLockedError(_locked_message(what, path, holder, timeout)) from None
        print(f"etda: waiting for {what}: {path} is held by {holder}", file=sys.stderr)
        try:
            lock.acquire(timeout=-1 if timeout is None else timeout)
        except Timeout:
            raise StoreLockedError(_locked_message(what, path, holder, timeout)) from None
    if lock.lock_counter == 1:
        with contextlib.suppress(OSError):  # informational only
            owner.write_text(json.dumps({"pid": os.getpid()}))
    return lock


def _read_owner(owner: Path) -> str:
    try:
        return f"process {int(json.loads(owner.read_text())['pid'])}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _locked_message(what: str, path: Path, holder: str, timeout: float | None) -> str:
    return (
        f"{what} is being written by {holder} (lock {path}, not released within {timeout} s); "
        "wait for that run to finish and retry, or use another directory"
    )


def release_lock(lock: FileLock) -> None:
    """Undo one :func:`acquire_lock`; the last release frees the lock for other processes."""
    if not lock.is_locked:
        return
    if lock.lock_counter == 1:
        with contextlib.suppress(OSError):
            Path(lock.lock_file + ".owner").unlink(missing_ok=True)
    lock.release()
    if not lock.is_locked:
        with _LOCKS_GUARD:  # forget it: a long session opens many stores
            if _LOCKS.get(lock.lock_file) is lock:
                del _LOCKS[lock.lock_file]


def _atomic_write_json(path: Path, obj: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


STORAGE = ("float32", "float16", "bfloat16")
EXTRA_BLOCKS = ("f", "q")  # outputs and TRAK's Q: not features, kept at full precision


def storage_np_dtype(storage: str) -> np.dtype:
    """The on-disk numpy dtype of a storage precision (bfloat16 as its raw 16-bit words)."""
    if storage not in STORAGE:
        raise ValueError(f"storage must be one of {STORAGE}, got {storage!r}")
    return np.dtype(np.uint16) if storage == "bfloat16" else np.dtype(storage)


def to_storage(t: Tensor, storage: str) -> np.ndarray:
    """A (rows, width) feature tensor as the stored numpy array; refuses overflow to inf."""
    t = t.detach().cpu()
    if storage == "float32":
        return t.to(torch.float32).numpy()
    low = t.to(getattr(torch, storage))
    if not bool(torch.isfinite(low).all()) and bool(torch.isfinite(t).all()):
        big = float(t.abs().max())
        raise OverflowError(
            f"features up to {big:.3g} overflow {storage} (max {torch.finfo(low.dtype).max:.3g}); "
            "store them as bfloat16 or float32 instead"
        )
    return low.view(torch.uint16).numpy() if storage == "bfloat16" else low.numpy()


def from_storage(a: np.ndarray, storage: str, dtype: torch.dtype) -> Tensor:
    """Stored rows back as a tensor of the compute ``dtype`` (shares memory when the
    stored dtype is the compute dtype, else a converted copy)."""
    t = torch.from_numpy(a)
    if storage == "bfloat16":
        t = t.view(torch.bfloat16)
    return t if t.dtype == dtype else t.to(dtype)


class SplitStore:
    """Feature blocks of one member on one split (``train`` or ``test``).

    ``dtype`` is the compute dtype the features come back in; ``storage`` the precision of
    the feature blocks on disk (``float32`` default; ``float16``/``bfloat16`` halve the
    bytes; the width-1 output and Q blocks always keep the compute dtype). On disk, rows are
    written and read with plain file I/O, so streaming over a large store (``rows``) does
    not grow the process's resident memory; ``load`` maps whole arrays for small problems.

    Reopening a folder validates ``done.json`` and the array headers and checks every
    recorded range against its checksum: a failing range raises :class:`CorruptStoreError`,
    or with ``repair=True`` is dropped from ``done.json`` (listed in ``repaired``) so that it
    is computed again; unreadable arrays are then recreated. ``lock``: the writer lock held
    for this split (released when the split is complete, on :meth:`close`, or when the
    store is garbage collected).
    """

    def __init__(
        self,
        folder: Path | None,
        n: int,
        widths: dict[str, int],
        dtype: torch.dtype,
        storage: str = "float32",
        repair: bool = False,
        lock: FileLock | None = None,
    ) -> None:
        self.folder, self.n, self.widths = folder, n, dict(sorted(widths.items()))
        self.dtype, self.storage = dtype, storage
        compute = np.dtype(str(dtype).removeprefix("torch."))
        low = storage_np_dtype(storage) if storage != "float32" else compute
        self.kinds = {k: ("float32" if k in EXTRA_BLOCKS else storage) for k in self.widths}
        self.np_dtypes = {k: (compute if k in EXTRA_BLOCKS else low) for k in self.widths}
        self.arrays: dict[str, np.ndarray] = {}
        self.offsets: dict[str, int] = {}
        self.done: list[list] = []  # [lo, hi, checksum]
        self.repaired: list[tuple[int, int]] = []  # ranges dropped by repair=True
        self._verified: set[tuple[int, int, str]] = set()
        self._lock, self._finalizer = lock, None
        if lock is not None:
            self._finalizer = weakref.finalize(self, release_lock, lock)
        if folder is None:
            self.arrays = {k: np.zeros((n, w), self.np_dtypes[k]) for k, w in self.widths.items()}
            return
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / "done.json").exists():
            try:
                self._open_existing()
            except CorruptStoreError:
                if not repair:
                    raise
                self.done, self.repaired = [], [(0, n)]
                self._create_arrays()
            if repair:
                self._repair()
        else:
            self._create_arrays()
        if self.complete:
            self.close()

    def _create_arrays(self) -> None:
        assert self.folder is not None
        for k, w in self.widths.items():
            a = np.lib.format.open_memmap(
                self.folder / f"{k}.npy", mode="w+", dtype=self.np_dtypes[k], shape=(self.n, w)
            )
            self.offsets[k] = a.offset
            del a  # header written; rows go through file I/O
        self._save_done()

    def _open_existing(self) -> None:
        """Read ``done.json`` and the array headers, validating both (CorruptStoreError)."""
        assert self.folder is not None
        folder = self.folder
        name = "done.json"
        try:
            self.done = _valid_ranges(json.loads((folder / name).read_text()), self.n)
            for k, w in self.widths.items():
                name = f"{k}.npy"
                # allow_pickle=False (numpy's default, stated): an object array never loads.
                a = np.load(folder / name, mmap_mode="r", allow_pickle=False)
                if a.shape != (self.n, w) or a.dtype != self.np_dtypes[k]:
                    raise ValueError(
                        f"shape {a.shape} and dtype {a.dtype}, expected {(self.n, w)} "
                        f"{self.np_dtypes[k]}"
                    )
                self.offsets[k] = a.offset
                del a
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CorruptStoreError(
                f"feature store {folder}: {name} is unreadable ({e}); {REPAIR_HINT}"
            ) from e

    def _repair(self) -> None:
        """Drop every recorded range that fails its checksum (they are then missing)."""
        kept = []
        for lo, hi, cs in self.done:
            try:
                ok = self._checksum_of(lo, hi) == cs
            except CorruptStoreError:
                ok = False
            if ok:
                kept.append([lo, hi, cs])
                self._verified.add((lo, hi, cs))
            else:
                self.repaired.append((lo, hi))
        if len(kept) != len(self.done):
            self.done = kept
            self._save_done()

    def _save_done(self) -> None:
        if self.folder is not None:
            _atomic_write_json(self.folder / "done.json", {"ranges": self.done})

    def close(self) -> None:
        """Release this split's writer lock (if held); reading stays possible."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None

    def _covered(self) -> np.ndarray:
        covered = np.zeros(self.n, dtype=bool)
        for lo, hi, _ in self.done:
            covered[lo:hi] = True
        return covered

    def missing(self, chunk: int) -> Iterator[tuple[int, int]]:
        """Row ranges ``[lo, hi)`` still to compute, at most ``chunk`` rows each.

        Ranges end on multiples of ``chunk`` where possible, so every run (in one process
        or sharded over workers) computes the same chunks."""
        covered = self._covered()
        i = 0
        while i < self.n:
            if covered[i]:
                i += 1
                continue
            j = i + 1
            while j < self.n and not covered[j] and j % chunk:
                j += 1
            yield i, j
            i = j

    @property
    def complete(self) -> bool:
        return bool(self._covered().all())

    def encode(self, blocks: dict[str, Tensor]) -> dict[str, np.ndarray]:
        """Computed blocks as the arrays this store keeps (storage precision)."""
        if set(blocks) != set(self.widths):
            raise ValueError(
                f"blocks {sorted(blocks)} do not match the store's {sorted(self.widths)}"
            )
        out = {}
        for k, t in blocks.items():
            if self.kinds[k] == "float32":
                a = t.detach().cpu().numpy().astype(self.np_dtypes[k], copy=False)
            else:
                a = to_storage(t, self.kinds[k])
            out[k] = np.ascontiguousarray(a)
        return out

    def write(self, lo: int, hi: int, blocks: dict[str, Tensor]) -> None:
        """Store rows ``[lo, hi)``; they are recorded as done only after reaching the file."""
        arrays = self.encode(blocks)
        self.write_encoded(lo, hi, arrays)
        cs = _checksum([arrays[k] for k in self.widths], 0, hi - lo)
        self._verified.add((lo, hi, cs))
        self.record(lo, hi, cs)

    def write_encoded(self, lo: int, hi: int, arrays: dict[str, np.ndarray]) -> None:
        """Write encoded rows without recording them (workers write, the driver records)."""
        for k, a in arrays.items():
            if a.shape != (hi - lo, self.widths[k]) or a.dtype != self.np_dtypes[k]:
                raise ValueError(f"rows of {k} have shape {a.shape} and dtype {a.dtype}")
            if self.folder is None:
                self.arrays[k][lo:hi] = a
                continue
            row = self.widths[k] * self.np_dtypes[k].itemsize
            with open(self.folder / f"{k}.npy", "r+b") as f:
                f.seek(self.offsets[k] + lo * row)
                f.write(np.ascontiguousarray(a).tobytes())
                f.flush()
                os.fsync(f.fileno())

    def record(self, lo: int, hi: int, checksum: str) -> None:
        """Mark rows ``[lo, hi)`` as done (their bytes have the given checksum)."""
        self.done.append([lo, hi, checksum])
        self._save_done()
        if self.complete:
            self.close()

    def raw(self, key: str, lo: int, hi: int) -> np.ndarray:
        """Stored rows ``[lo, hi)`` of block ``key`` as a fresh array (storage precision)."""
        if self.folder is None:
            return self.arrays[key][lo:hi]
        w, dt = self.widths[key], self.np_dtypes[key]
        with open(self.folder / f"{key}.npy", "rb") as f:
            f.seek(self.offsets[key] + lo * w * dt.itemsize)
            a = np.fromfile(f, dtype=dt, count=(hi - lo) * w)
        if a.size != (hi - lo) * w:
            raise CorruptStoreError(
                f"feature store {self.folder}: {key}.npy is truncated; {REPAIR_HINT}"
            )
        return a.reshape(hi - lo, w)

    def rows(self, lo: int, hi: int, keys: list[str] | None = None) -> dict[str, Tensor]:
        """Rows ``[lo, hi)`` of every block (or of ``keys``) in the compute dtype."""
        return {
            k: from_storage(self.raw(k, lo, hi), self.kinds[k], self.dtype)
            for k in (keys or list(self.widths))
        }

    def _checksum_of(self, lo: int, hi: int) -> str:
        return _checksum([self.raw(k, lo, hi) for k in self.widths], 0, hi - lo)

    def verify(self) -> None:
        """Check every recorded range against its checksum (reads each range once per
        store object: ranges this object wrote or already checked are not read again)."""
        if self.folder is None:
            return
        for lo, hi, cs in self.done:
            if (lo, hi, cs) in self._verified:
                continue
            if self._checksum_of(lo, hi) != cs:
                raise CorruptStoreError(
                    f"feature store {self.folder}: rows {lo}:{hi} fail their checksum "
                    f"(the files were modified or damaged); {REPAIR_HINT}"
                )
            self._verified.add((lo, hi, cs))

    def load(self, verify: bool = True) -> dict[str, Tensor]:
        """All blocks as tensors ``{name: (n, width)}`` in the compute dtype (float32 on
        disk: memory-mapped; lower precision: converted copies)."""
        if not self.complete:
            raise RuntimeError(f"feature store {self.folder} is incomplete")
        if verify:
            self.verify()
        out = {}
        for k in self.widths:
            a = (
                self.arrays[k]
                if self.folder is None
                else np.load(self.folder / f"{k}.npy", mmap_mode="r+", allow_pickle=False)
            )
            out[k] = from_storage(a, self.kinds[k], self.dtype)
        return out

    def feature_nbytes(self) -> int:
        """Bytes of the stored feature blocks (storage precision; not outputs or Q)."""
        return int(
            sum(
                self.n * w * self.np_dtypes[k].itemsize
                for k, w in self.widths.items()
                if k not in EXTRA_BLOCKS
            )
        )


def _valid_ranges(obj: object, n: int) -> list[list]:
    """``done.json`` content -> its ranges, each ``[lo, hi, checksum]`` with
    ``0 <= lo < hi <= n``; anything else raises ValueError."""
    ranges = obj.get("ranges") if isinstance(obj, dict) else None
    if not isinstance(ranges, list):
        raise ValueError("done.json must hold {'ranges': [[lo, hi, checksum], ...]}")
    out = []
    for r in ranges:
        ok = isinstance(r, list) and len(r) == 3 and isinstance(r[2], str)
        ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in r[:2])
        if not ok or not 0 <= r[0] < r[1] <= n:
            raise ValueError(f"done.json holds an invalid range {r!r} for {n} rows")
        out.append([r[0], r[1], r[2]])
    return out


def _checksum(arrays: list[np.ndarray], lo: int, hi: int) -> str:
    """Checksum of rows ``[lo, hi)`` of ``arrays`` (the bytes exactly as stored)."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a[lo:hi]).tobytes())
    return h.hexdigest()[:32]


class FeatureStore:
    """Root of a feature store; ``root=None`` keeps features in memory only.

    ``repair``: recompute the recorded ranges that fail their checksum (and recreate
    unreadable arrays) instead of refusing the store. ``lock_timeout``: seconds to wait for
    another process writing the same split (None: as long as it takes; 0: refuse at once)
    before :class:`StoreLockedError`.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        repair: bool = False,
        lock_timeout: float | None = None,
    ) -> None:
        self.root = Path(root) if root is not None else None
        self.repair, self.lock_timeout = bool(repair), lock_timeout

    def split(
        self,
        member: str,
        split: str,
        meta: dict,
        n: int,
        widths: dict[str, int],
        dtype: torch.dtype,
        storage: str = "float32",
    ) -> SplitStore:
        """Open (resume) or create the store of one member's split, validating ``meta``.

        ``storage``: precision of the stored features (``float32 | float16 | bfloat16``).
        Holds the split's writer lock while it has rows to compute (see the module doc), and
        checks the rows recorded by earlier runs against their checksums."""
        storage_np_dtype(storage)  # validates the name
        if self.root is None:
            return SplitStore(None, n, widths, dtype, storage)
        folder = self.root / member / split
        meta = json.loads(
            json.dumps({**meta, "n": n, "widths": widths, "storage": storage}, sort_keys=True)
        )
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = acquire_lock(
            folder.parent / f"{split}.lock", self.lock_timeout, f"feature store {folder}"
        )
        try:
            self._check_meta(folder, meta)
            st = SplitStore(folder, n, widths, dtype, storage, self.repair, lock)
            # Rows recorded by an earlier run are checked once here, so that streamed (out of
            # core) reads, which never call load(), do not use damaged rows either.
            st.verify()
            return st
        except BaseException:
            release_lock(lock)
            raise

    def _check_meta(self, folder: Path, meta: dict) -> None:
        """Refuse a folder written for something else; start a fresh one (under the lock)."""
        meta_file = folder / "meta.json"
        old: object = None
        if meta_file.exists():
            try:
                old = json.loads(meta_file.read_text())
                if not isinstance(old, dict):
                    raise ValueError(f"expected a JSON object, got {type(old).__name__}")
            except (OSError, ValueError) as e:
                if not self.repair:
                    raise CorruptStoreError(
                        f"{meta_file} is unreadable ({e}); pass repair=True (CLI --repair) to "
                        f"recompute the store, or delete {folder}"
                    ) from e
                old = None
        if isinstance(old, dict):
            if old != meta:
                diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
                raise StaleStoreError(
                    f"feature store {folder} was written for a different {', '.join(diff)}; "
                    "it is not reused. Delete it, or pass another store directory."
                )
            return
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.npy"):
            stale.unlink()
        (folder / "done.json").unlink(missing_ok=True)
        _atomic_write_json(meta_file, meta)
