"""DataBundle: a named, seeded train/test split, and the standard bundles."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from etda.data.digits import _digits_arrays
from etda.data.fashion_mnist import FMNIST_CLASSES, load_fashion_mnist_raw, to_tensors
from etda.data.subsets import seeded_subset


@dataclass(frozen=True, eq=False)
class DataBundle:
    """Train and test tensors of one experiment.

    x_train (n_train, C, H, W) float32, y_train (n_train,) int64 in [0, num_classes);
    likewise x_test / y_test. ``eq=False``: bundles compare and hash by identity (tensors
    have no boolean equality); compare ``fingerprint()`` instead.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    name: str
    seed: int
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.shape[0] != y.shape[0] or y.ndim != 1:
                raise ValueError(
                    f"DataBundle {self.name!r}: x_{split} has {x.shape[0]} rows but y_{split} "
                    f"has shape {tuple(y.shape)}; expected y_{split} of shape ({x.shape[0]},)"
                )
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"DataBundle {self.name!r}: {len(self.class_names)} class_names for "
                f"num_classes={self.num_classes}"
            )

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])

    def fingerprint(self) -> str:
        """sha256 hex over name, num_classes and the tensors' dtypes, shapes and bytes."""
        h = hashlib.sha256()
        h.update(f"{self.name}|{self.num_classes}".encode())
        for t in (self.x_train, self.y_train, self.x_test, self.y_test):
            t = t.detach().cpu().contiguous()
            h.update(f"|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()


def _check_size(what: str, requested: int, available: int, hint: str) -> None:
    if isinstance(requested, bool) or not isinstance(requested, int | np.integer):
        raise TypeError(f"{what} must be an int, got {type(requested).__name__}")
    if requested <= 0:
        raise ValueError(f"{what} must be positive, got {requested}")
    if requested > available:
        raise ValueError(
            f"{what}={requested} but only {available} examples are available ({hint}); "
            f"ask for at most {available}"
        )


def fmnist(
    n_train: int = 5000, n_test: int = 500, seed: int = 0, root: str | os.PathLike | None = None
) -> DataBundle:
    """Seeded subsets of the official Fashion-MNIST train (60000) and test (10000) splits."""
    xtr, ytr = load_fashion_mnist_raw("train", root)
    xte, yte = load_fashion_mnist_raw("test", root)
    _check_size("n_train", n_train, len(ytr), "Fashion-MNIST train split")
    _check_size("n_test", n_test, len(yte), "Fashion-MNIST test split")
    itr = seeded_subset(len(ytr), n_train, seed)
    ite = seeded_subset(len(yte), n_test, seed)
    x_train, y_train = to_tensors(xtr[itr], ytr[itr])
    x_test, y_test = to_tensors(xte[ite], yte[ite])
    return DataBundle(x_train, y_train, x_test, y_test, 10, "fmnist", seed, tuple(FMNIST_CLASSES))


def fmnist2(
    n_train: int = 2000,
    n_test: int = 200,
    classes: Sequence[int] = (0, 6),
    seed: int = 0,
    root: str | os.PathLike | None = None,
) -> DataBundle:
    """Fashion-MNIST restricted to ``classes`` (default T-shirt/top vs Shirt, a hard pair).

    Labels are remapped to positions in ``classes``: classes[0] -> 0, classes[1] -> 1, ...
    """
    classes = tuple(int(c) for c in classes)
    if (
        len(classes) < 2
        or len(set(classes)) != len(classes)
        or not all(0 <= c < 10 for c in classes)
    ):
        raise ValueError(f"classes must be >= 2 distinct ints in 0..9, got {classes}")
    remap = np.full(10, -1, dtype=np.int64)
    remap[list(classes)] = np.arange(len(classes))
    parts = []
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = load_fashion_mnist_raw(split, root)
        keep = np.flatnonzero(remap[labels] >= 0)
        _check_size(f"n_{split}", n, len(keep), f"Fashion-MNIST {split} split, classes {classes}")
        idx = keep[seeded_subset(len(keep), n, seed)]
        parts.append(to_tensors(images[idx], remap[labels[idx]]))
    (x_train, y_train), (x_test, y_test) = parts
    names = tuple(FMNIST_CLASSES[c] for c in classes)
    return DataBundle(x_train, y_train, x_test, y_test, len(classes), "fmnist2", seed, names)


def digits(n_train: int = 1000, n_test: int = 200, seed: int = 0) -> DataBundle:
    """scikit-learn digits (1797, 8x8): disjoint seeded train/test sets, each sorted."""
    x, y = _digits_arrays()
    _check_size("n_train", n_train, len(y), "sklearn digits")
    _check_size("n_test", n_test, len(y) - n_train, f"sklearn digits minus n_train={n_train}")
    perm = np.random.Generator(np.random.PCG64(seed)).permutation(len(y))
    itr, ite = np.sort(perm[:n_train]), np.sort(perm[n_train : n_train + n_test])
    return DataBundle(
        torch.from_numpy(x[itr]),
        torch.from_numpy(y[itr]),
        torch.from_numpy(x[ite]),
        torch.from_numpy(y[ite]),
        10,
        "digits",
        seed,
        tuple(str(d) for d in range(10)),
    )
