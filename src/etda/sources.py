"""Training and test data as etda reads them: ``(x, y)`` tensors, arrays or a Dataset."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from etda.features.featurize import NonFiniteError


def as_tensors(data: object, name: str) -> tuple[Tensor, Tensor]:
    """``(x, y)`` tensors from a pair of tensors/arrays or a Dataset yielding ``(x, y)``."""
    if isinstance(data, Dataset) and not isinstance(data, tuple | list):
        items = [data[i] for i in range(len(data))]  # type: ignore[arg-type]
        if not items:
            raise ValueError(f"{name} set is empty")
        x = torch.stack([torch.as_tensor(i[0]) for i in items])
        y = torch.stack([torch.as_tensor(i[1]) for i in items])
    elif isinstance(data, tuple | list) and len(data) == 2:
        x, y = (torch.as_tensor(np.asarray(d) if not isinstance(d, Tensor) else d) for d in data)
    else:
        raise TypeError(f"{name} must be (x, y) tensors or a torch Dataset of (x, y) pairs")
    if x.shape[0] == 0:
        raise ValueError(f"{name} set is empty")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"{name}: x has {x.shape[0]} examples but y has {y.shape[0]}")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x.reshape(x.shape[0], -1))).any(1).nonzero()[:10, 0].tolist()
        raise NonFiniteError(f"{name} inputs contain NaN/inf at example index {bad}")
    if y.is_floating_point():
        raise ValueError(f"{name} labels must be integers, got {y.dtype}")
    return x, y.long()
