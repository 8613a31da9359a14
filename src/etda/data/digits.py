"""scikit-learn's 8x8 handwritten digits: a small offline dataset for tests."""

from __future__ import annotations

import functools

import numpy as np
import torch


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from etda.io import require

    load_digits = require("sklearn.datasets", "the digits data").load_digits  # slow import

    data = load_digits()
    x = (np.asarray(data.images, dtype=np.float32) / np.float32(16.0))[:, None]
    y = np.asarray(data.target, dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def load_digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits: x float32 (1797, 1, 8, 8) in [0, 1], y int64 (1797,) in 0..9."""
    x, y = _digits_arrays()
    return torch.from_numpy(x.copy()), torch.from_numpy(y.copy())
