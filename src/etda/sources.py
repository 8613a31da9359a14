"""Training and test data as etda reads them.

``train=`` and ``test=`` accept ``(x, y)`` (tensors or arrays; ``x`` may be a dict of
tensors such as ``{"input_ids", "attention_mask"}``), a ``Dataset`` of ``(x, y)`` pairs, a
``DataLoader``, or any re-iterable of batches (``(x, y)`` tuples, or dicts with the targets
under ``"labels"``). Batches are read in order and concatenated: example ``i`` is the
``i``-th example the loader yields, which is why a shuffling loader is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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


def _from_loader(loader: DataLoader, name: str) -> tuple[batch.Inputs, Tensor]:
    if isinstance(loader.sampler, RandomSampler):
        raise ValueError(
            f"the {name} DataLoader shuffles (shuffle=True): example indices must be the dataset "
            "order, so pass a loader with shuffle=False (or the dataset itself)"
        )
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


def _validate(x: batch.Inputs, y: Tensor, name: str) -> None:
    n = batch.n_rows(x)
    if n == 0:
        raise ValueError(f"{name} set is empty")
    if y.ndim == 0 or y.shape[0] != n:
        raise ValueError(f"{name}: x has {n} examples but y has {y.shape[0] if y.ndim else 0}")
    for t in batch.leaves(x):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = (~torch.isfinite(t.reshape(n, -1))).any(1).nonzero()[:10, 0].tolist()
            raise NonFiniteError(f"{name} inputs contain NaN/inf at example index {bad}")
    if y.is_floating_point() and not bool(torch.isfinite(y).all()):
        bad = (~torch.isfinite(y.reshape(n, -1))).any(1).nonzero()[:10, 0].tolist()
        raise NonFiniteError(f"{name} targets contain NaN/inf at example index {bad}")
    if y.dtype == torch.bool:
        raise ValueError(f"{name} targets must be integers or floats, got {y.dtype}")
