"""Counter-based, platform-independent random numbers.

Every random choice in etda (projection matrices, count-sketch hashes, dropout masks)
is a pure function of integer keys such as (seed, layer, example index, unit), so it
does not depend on batch size, chunking, thread count or call order.
"""

from __future__ import annotations

import numpy as np
import torch

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def mix(*keys: int | np.ndarray) -> np.ndarray:
    """Hash integer keys (scalars or broadcastable arrays) into uint64 values."""
    h = np.uint64(0x12345678)
    for k in keys:
        with np.errstate(over="ignore"):
            h = _splitmix64(np.asarray(h, dtype=np.uint64) ^ np.asarray(k).astype(np.uint64))
    return np.asarray(h)


def derive_seed(*keys: int) -> int:
    """A 63-bit seed derived from integer keys (for torch.Generator.manual_seed)."""
    return int(mix(*keys) >> np.uint64(1))


def uniform(*keys: int | np.ndarray) -> np.ndarray:
    """Uniform [0, 1) float64 values, one per broadcast element of the keys."""
    return (mix(*keys) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def generator(*keys: int) -> torch.Generator:
    """A CPU torch.Generator seeded from integer keys."""
    g = torch.Generator()
    g.manual_seed(derive_seed(*keys))
    return g
