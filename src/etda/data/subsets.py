"""Seeded index subsets and the random subset masks used by LDS."""

from __future__ import annotations

import numpy as np


def _check_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def seeded_subset(n: int, size: int, seed: int) -> np.ndarray:
    """``size`` distinct indices from ``range(n)``: sorted int64 (size,), deterministic in seed."""
    n, size, seed = _check_int("n", n), _check_int("size", size), _check_int("seed", seed)
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    if size > n:
        raise ValueError(f"size={size} is larger than the population n={n}; ask for at most {n}")
    rng = np.random.Generator(np.random.PCG64(seed))
    return np.sort(rng.choice(n, size=size, replace=False)).astype(np.int64)


def random_subset_masks(
    n: int, count: int = 50, fraction: float = 0.5, seed: int = 0
) -> np.ndarray:
    """``count`` random subsets of ``range(n)`` as a bool mask (count, n).

    Each row has exactly ``round(fraction * n)`` True entries; deterministic in ``seed``.
    """
    n, count, seed = _check_int("n", n), _check_int("count", count), _check_int("seed", seed)
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if count <= 0:
        raise ValueError(f"count must be positive, got {count}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    k = int(round(fraction * n))
    if k == 0:
        raise ValueError(f"fraction={fraction} of n={n} rounds to an empty subset; raise it")
    rng = np.random.Generator(np.random.PCG64(seed))
    masks = np.zeros((count, n), dtype=bool)
    for row in masks:
        row[rng.permutation(n)[:k]] = True
    return masks
