"""Training and test data as etda reads them.

``train=`` and ``test=`` accept ``(x, y)`` (tensors or arrays; ``x`` may be a dict of
tensors such as ``{"input_ids", "attention_mask"}``), a ``Dataset`` of ``(x, y)`` pairs, a
``DataLoader``, or any re-iterable of batches (``(x, y)`` tuples, or dicts with the targets
under ``"labels"``). Example ``i`` is the ``i``-th example the data yield, which is why a
shuffling loader is refused.

:func:`as_source` (the engine's reader) streams everything that is not already tensors: one
first pass counts the examples, checks them for NaN/inf, hashes them (the feature store's
data key) and keeps the targets (small: one label, or one row of token labels, per
example); afterwards the inputs are read a chunk at a time (:class:`StreamedInputs`), so a
training set larger than memory is featurized with one chunk in memory. :func:`as_tensors`
reads everything into memory (the application layer's retraining needs it whole).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler

from etda import batch
from etda.features.featurize import NonFiniteError

LABEL_KEYS = ("labels", "label", "y")


def as_tensors(data: object, name: str) -> tuple[batch.Inputs, Tensor]:
    """``(x, y)``: inputs (a tensor or a dict of tensors) and targets, validated."""
    if isinstance(data, tuple | list) and len(data) == 2 and not _is_batch_list(data):
        x, y = _inputs(data[0], name), _tensor(data[1])
    elif isinstance(data, DataLoader):
        x, y = _from_loader(data, name)
    elif isinstance(data, Dataset):
        x, y = _from_items([data[i] for i in range(len(data))], name)  # type: ignore[arg-type]
    elif isinstance(data, Iterable) and not isinstance(data, Tensor | Mapping | str):
        x, y = _from_items(list(data), name, batched=True)
    else:
        raise TypeError(
            f"{name} must be (x, y) tensors, a Dataset of (x, y) pairs, a DataLoader or an "
            f"iterable of batches; got {type(data).__name__}"
        )
    _validate(x, y, name)
    return x, (y if y.is_floating_point() else y.long())


def _is_batch_list(data: tuple | list) -> bool:
    """Two batches, not an ``(x, y)`` pair: both elements are pairs or dicts themselves."""
    return all(isinstance(d, tuple | list) and len(d) == 2 for d in data) or all(
        isinstance(d, Mapping) and any(k in d for k in LABEL_KEYS) for d in data
    )


def _tensor(v: Any) -> Tensor:
    return v if isinstance(v, Tensor) else torch.as_tensor(np.asarray(v))


def _inputs(x: Any, name: str, batched: bool = True) -> batch.Inputs:
    """A tensor or a dict of tensors; a batch's tensors must share their first dimension
    (one example's need not)."""
    if isinstance(x, Mapping):
        out = {str(k): _tensor(v) for k, v in x.items()}
        if not out:
            raise ValueError(f"{name} inputs are an empty dict")
        sizes = {k: v.shape[0] if v.ndim else 0 for k, v in out.items()}
        if batched and len(set(sizes.values())) != 1:
            raise ValueError(f"{name} input tensors differ in their first dimension: {sizes}")
        return out
    return _tensor(x)


def _refuse_shuffling(loader: DataLoader, name: str) -> None:
    if isinstance(loader.sampler, RandomSampler):
        raise ValueError(
            f"the {name} DataLoader shuffles (shuffle=True): example indices must be the dataset "
            "order, so pass a loader with shuffle=False (or the dataset itself)"
        )


def _from_loader(loader: DataLoader, name: str) -> tuple[batch.Inputs, Tensor]:
    _refuse_shuffling(loader, name)
    return _from_items(list(loader), name, batched=True)


def _split(item: Any, name: str) -> tuple[Any, Any]:
    """``(x, y)`` of one item or batch: a pair, or a dict with its targets under 'labels'."""
    if isinstance(item, Mapping):
        key = next((k for k in LABEL_KEYS if k in item), None)
        if key is None:
            raise ValueError(
                f"{name} batches are dicts without targets: put them under 'labels' "
                f"(keys seen: {sorted(item)})"
            )
        return {k: v for k, v in item.items() if k != key}, item[key]
    if isinstance(item, tuple | list) and len(item) == 2:
        return item[0], item[1]
    raise TypeError(f"{name} items must be (x, y) pairs or dicts with 'labels'")


def _from_items(items: list, name: str, batched: bool = False) -> tuple[batch.Inputs, Tensor]:
    if not items:
        raise ValueError(f"{name} set is empty")
    pairs = [_split(i, name) for i in items]
    xs = [_inputs(x, name, batched) for x, _ in pairs]
    ys = [_tensor(y) for _, y in pairs]
    join = torch.cat if batched else torch.stack
    if isinstance(xs[0], Mapping):
        x: batch.Inputs = {k: join([d[k] for d in xs]) for k in xs[0]}
    else:
        x = join(xs)
    return x, join(ys)


def _validate(x: batch.Inputs, y: Tensor, name: str, first_index: int = 0) -> None:
    n = batch.n_rows(x)
    if n == 0:
        raise ValueError(f"{name} set is empty")
    if y.ndim == 0 or y.shape[0] != n:
        raise ValueError(f"{name}: x has {n} examples but y has {y.shape[0] if y.ndim else 0}")
    for t in batch.leaves(x):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = (~torch.isfinite(t.reshape(n, -1))).any(1).nonzero()[:10, 0] + first_index
            raise NonFiniteError(f"{name} inputs contain NaN/inf at example index {bad.tolist()}")
    if y.is_floating_point() and not bool(torch.isfinite(y).all()):
        bad = (~torch.isfinite(y.reshape(n, -1))).any(1).nonzero()[:10, 0] + first_index
        raise NonFiniteError(f"{name} targets contain NaN/inf at example index {bad.tolist()}")
    if y.dtype == torch.bool:
        raise ValueError(f"{name} targets must be integers or floats, got {y.dtype}")


# ------------------------------------------------------------------------- streamed data

SCAN_CHUNK = 1024  # examples per read on the first pass over a Dataset


def as_source(data: object, name: str) -> tuple[batch.Inputs, Tensor]:
    """``(x, y)`` for the engine: tensors as :func:`as_tensors` gives them, and for a
    ``Dataset``, ``DataLoader`` or iterable of batches :class:`StreamedInputs` (read a chunk
    at a time) with the targets in memory."""
    if isinstance(data, tuple | list) and len(data) == 2 and batch.is_lazy(data[0]):
        return data[0], data[1]  # already a source (self-influence passes its own)
    if isinstance(data, DataLoader):
        _refuse_shuffling(data, name)
        return _scan(_BatchReader(data, name), name)
    if isinstance(data, Dataset) and not isinstance(data, Iterable):
        return _scan(_ItemReader(data, name), name)
    if isinstance(data, tuple | list) and len(data) == 2 and not _is_batch_list(data):
        return as_tensors(data, name)
    if isinstance(data, Iterable) and not isinstance(data, Tensor | Mapping | str):
        if iter(data) is data:  # a generator or an iterator: one pass only
            raise TypeError(
                f"{name} is an iterator (a generator?), which can be read only once; etda reads "
                "the data once per member: pass a list of batches, a Dataset or a DataLoader"
            )
        return _scan(_BatchReader(data, name), name)
    return as_tensors(data, name)


class StreamedInputs(batch.LazyInputs):
    """Inputs of a Dataset or a re-iterable of batches, read ``[lo, hi)`` at a time.

    Sequential reads (what featurization does) cost one pass over the data per pass of etda;
    the last chunk read is kept, so the same range twice reads once. Pickles without its
    open iterator (worker processes read their own ranges)."""

    def __init__(self, reader: Any, n: int, digest: str, keys: tuple[str, ...] | None) -> None:
        self.reader, self.n, self.digest, self.keys = reader, n, digest, keys
        self._last: tuple[int, int, batch.Inputs] | None = None

    def take(self, lo: int, hi: int) -> batch.Inputs:
        lo, hi = max(0, int(lo)), min(self.n, int(hi))
        if self._last is not None and self._last[:2] == (lo, hi):
            return self._last[2]
        x, _ = self.reader.read(lo, hi)
        if batch.n_rows(x) != hi - lo:
            raise ValueError(
                f"the {self.reader.name} data yielded {batch.n_rows(x)} examples for rows "
                f"[{lo}, {hi}): they must yield the same examples on every pass"
            )
        self._last = (lo, hi, x)
        return x

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_last": None}

    def __repr__(self) -> str:
        return f"StreamedInputs({self.reader.name}, n={self.n})"


class _ItemReader:
    """Rows of a map-style ``Dataset`` of ``(x, y)`` pairs (or dicts with 'labels')."""

    def __init__(self, dataset: Dataset, name: str) -> None:
        self.dataset, self.name = dataset, name

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def read(self, lo: int, hi: int) -> tuple[batch.Inputs, Tensor]:
        return _from_items([self.dataset[i] for i in range(lo, hi)], self.name)

    def chunks(self) -> Iterator[tuple[batch.Inputs, Tensor]]:
        n = len(self)
        for lo in range(0, n, SCAN_CHUNK):
            yield self.read(lo, min(lo + SCAN_CHUNK, n))


class _BatchReader:
    """Rows of a re-iterable of batches (a DataLoader, a list, a generator factory's
    iterable): an open iterator serves sequential reads; a read behind it starts a new pass."""

    def __init__(self, batches: Iterable, name: str) -> None:
        self.batches, self.name = batches, name
        self._reset()

    def _reset(self) -> None:
        self._it: Iterator | None = None
        self._pieces: list[tuple[batch.Inputs, Tensor]] = []
        self._start = 0  # row of the first buffered example
        self._end = 0  # rows read from the iterator so far

    def __getstate__(self) -> dict:
        return {"batches": self.batches, "name": self.name}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def chunks(self) -> Iterator[tuple[batch.Inputs, Tensor]]:
        for item in self.batches:
            yield _from_items([item], self.name, batched=True)

    def read(self, lo: int, hi: int) -> tuple[batch.Inputs, Tensor]:
        if self._it is None or lo < self._start:
            self._reset()
            self._it = iter(self.chunks())
        while self._pieces and self._start + _rows(self._pieces[0]) <= lo:
            self._start += _rows(self._pieces.pop(0))
        while self._end < hi:
            piece = next(self._it, None)
            if piece is None:
                break
            self._pieces.append(piece)
            self._end += _rows(piece)
        if not self._pieces:
            raise ValueError(
                f"the {self.name} data ended early: they must yield the same examples each pass"
            )
        x, y = _join(self._pieces)
        a, b = lo - self._start, hi - self._start
        return batch.take(x, a, b), y[a:b]


def _rows(piece: tuple[batch.Inputs, Tensor]) -> int:
    return int(piece[1].shape[0])


def _join(pieces: list[tuple[batch.Inputs, Tensor]]) -> tuple[batch.Inputs, Tensor]:
    if len(pieces) == 1:
        return pieces[0]
    xs, ys = [p[0] for p in pieces], [p[1] for p in pieces]
    if batch.is_dict(xs[0]):
        return {k: torch.cat([d[k] for d in xs]) for k in xs[0]}, torch.cat(ys)
    return torch.cat(xs), torch.cat(ys)


def _scan(reader: Any, name: str) -> tuple[StreamedInputs, Tensor]:
    """The first pass: count, validate (NaN/inf, shapes), hash and keep the targets."""
    h = hashlib.sha256()
    ys: list[Tensor] = []
    keys: tuple[str, ...] | None = None
    n = 0
    for x, y in reader.chunks():
        _validate(x, y, name, first_index=n)
        keys = tuple(sorted(x)) if batch.is_dict(x) else None
        for t in [*batch.leaves(x), y]:
            h.update(f"{tuple(t.shape[1:])}|{t.dtype}|".encode())
            h.update(t.detach().contiguous().cpu().numpy().tobytes())
        ys.append(y)
        n += int(y.shape[0])
    if n == 0:
        raise ValueError(f"{name} set is empty")
    h.update(str(n).encode())
    y_all = torch.cat(ys)
    return StreamedInputs(reader, n, h.hexdigest()[:24], keys), (
        y_all if y_all.is_floating_point() else y_all.long()
    )
