"""Feature store: every member's features on disk (memory-mapped), resumable and validated.

Layout (one folder per member and split)::

    ROOT/member-000/meta.json          what produced it (weights hash, data, spec, version)
    ROOT/member-000/train/<block>.npy  (n, width) arrays, memory-mapped
    ROOT/member-000/train/done.json    completed row ranges with a checksum each

Rows are written, flushed, and only then recorded in ``done.json`` (atomically, by
rename), so a killed run never leaves half-written rows marked valid; the next run
computes just the missing ranges. A folder whose metadata differs from the request is
refused (never silently reused) and a range whose checksum fails is reported as corrupt.
``FeatureStore(None)`` keeps everything in memory with the same interface.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


class StaleStoreError(RuntimeError):
    """The stored features were made by a different model, data or configuration."""


class CorruptStoreError(RuntimeError):
    """Stored features fail their checksum or are unreadable."""


def _atomic_write_json(path: Path, obj: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _checksum(arrays: list[np.ndarray], lo: int, hi: int) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a[lo:hi]).tobytes())
    return h.hexdigest()[:32]


class SplitStore:
    """Feature blocks of one member on one split (``train`` or ``test``)."""

    def __init__(
        self, folder: Path | None, n: int, widths: dict[str, int], dtype: torch.dtype
    ) -> None:
        self.folder, self.n, self.widths = folder, n, dict(sorted(widths.items()))
        self.np_dtype = np.dtype(str(dtype).removeprefix("torch."))
        self.arrays: dict[str, np.ndarray] = {}
        self.done: list[list] = []  # [lo, hi, checksum]
        if folder is None:
            self.arrays = {k: np.zeros((n, w), self.np_dtype) for k, w in self.widths.items()}
            return
        folder.mkdir(parents=True, exist_ok=True)
        done_file = folder / "done.json"
        if done_file.exists():
            try:
                self.done = json.loads(done_file.read_text())["ranges"]
                for k, w in self.widths.items():
                    a = np.load(folder / f"{k}.npy", mmap_mode="r+")
                    if a.shape != (n, w) or a.dtype != self.np_dtype:
                        raise CorruptStoreError(
                            f"{folder / k}.npy has shape {a.shape}, expected {(n, w)}"
                        )
                    self.arrays[k] = a
            except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
                raise CorruptStoreError(
                    f"feature store {folder} is unreadable ({e}); delete the folder to recompute"
                ) from e
        else:
            for k, w in self.widths.items():
                self.arrays[k] = np.lib.format.open_memmap(
                    folder / f"{k}.npy", mode="w+", dtype=self.np_dtype, shape=(n, w)
                )
            self._save_done()

    def _save_done(self) -> None:
        if self.folder is not None:
            _atomic_write_json(self.folder / "done.json", {"ranges": self.done})

    def missing(self, chunk: int) -> Iterator[tuple[int, int]]:
        """Row ranges ``[lo, hi)`` still to compute, at most ``chunk`` rows each."""
        covered = np.zeros(self.n, dtype=bool)
        for lo, hi, _ in self.done:
            covered[lo:hi] = True
        i = 0
        while i < self.n:
            if covered[i]:
                i += 1
                continue
            j = i
            while j < self.n and not covered[j] and j - i < chunk:
                j += 1
            yield i, j
            i = j

    @property
    def complete(self) -> bool:
        return sum(hi - lo for lo, hi, _ in self.done) == self.n

    def write(self, lo: int, hi: int, blocks: dict[str, Tensor]) -> None:
        if set(blocks) != set(self.widths):
            raise ValueError(
                f"blocks {sorted(blocks)} do not match the store's {sorted(self.widths)}"
            )
        for k, t in blocks.items():
            self.arrays[k][lo:hi] = t.detach().cpu().numpy().astype(self.np_dtype, copy=False)
        arrays = [self.arrays[k] for k in self.widths]
        if self.folder is not None:
            for a in arrays:
                a.flush()
        self.done.append([lo, hi, _checksum(arrays, lo, hi)])
        self._save_done()

    def load(self, verify: bool = True) -> dict[str, Tensor]:
        """All blocks as tensors ``{name: (n, width)}`` (memory-mapped when on disk)."""
        if not self.complete:
            raise RuntimeError(f"feature store {self.folder} is incomplete")
        if verify and self.folder is not None:
            arrays = [self.arrays[k] for k in self.widths]
            for lo, hi, cs in self.done:
                if _checksum(arrays, lo, hi) != cs:
                    raise CorruptStoreError(
                        f"feature store {self.folder}: rows {lo}:{hi} fail their checksum "
                        "(the files were modified or damaged); delete the folder to recompute"
                    )
        return {k: torch.from_numpy(np.asarray(a)) for k, a in self.arrays.items()}

    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays.values()))


class FeatureStore:
    """Root of a feature store; ``root=None`` keeps features in memory only."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else None

    def split(
        self,
        member: str,
        split: str,
        meta: dict,
        n: int,
        widths: dict[str, int],
        dtype: torch.dtype,
    ) -> SplitStore:
        """Open (resume) or create the store of one member's split, validating ``meta``."""
        if self.root is None:
            return SplitStore(None, n, widths, dtype)
        folder = self.root / member / split
        meta = json.loads(json.dumps({**meta, "n": n, "widths": widths}, sort_keys=True))
        meta_file = folder / "meta.json"
        if meta_file.exists():
            try:
                old = json.loads(meta_file.read_text())
            except json.JSONDecodeError as e:
                raise CorruptStoreError(f"{meta_file} is unreadable; delete {folder}") from e
            if old != meta:
                diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
                raise StaleStoreError(
                    f"feature store {folder} was written for a different {', '.join(diff)}; "
                    "it is not reused. Delete it, or pass another store directory."
                )
        else:
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.glob("*.npy"):
                stale.unlink()
            (folder / "done.json").unlink(missing_ok=True)
            _atomic_write_json(meta_file, meta)
        return SplitStore(folder, n, widths, dtype)
