"""Fashion-MNIST from the IDX files of the Debian package ``dataset-fashion-mnist``."""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

from etda.data.idx import read_idx

FASHION_MNIST_ENV = "ETDA_FASHION_MNIST_DIR"
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = "apt-get install -y dataset-fashion-mnist"

FMNIST_CLASSES: list[str] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

_PREFIX = {"train": "train", "test": "t10k"}


def fashion_mnist_dir(root: str | os.PathLike[str] | None = None) -> str:
    """The directory searched: ``root``, else ``$ETDA_FASHION_MNIST_DIR``, else the default."""
    if root is None:
        root = os.environ.get(FASHION_MNIST_ENV) or DEFAULT_FASHION_MNIST_DIR
    return os.path.abspath(os.fspath(root))


def _find(directory: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found in {directory!r}. Install the data with "
        f"`{INSTALL_HINT}`, or point the environment variable {FASHION_MNIST_ENV} (or the "
        "`root` argument) at a directory holding the four IDX files."
    )


@functools.lru_cache(maxsize=4)
def _load_raw(split: str, directory: str) -> tuple[np.ndarray, np.ndarray]:
    """Decoded uint8 images (N, 28, 28) and labels (N,), read-only, cached per process."""
    prefix = _PREFIX[split]
    images = read_idx(_find(directory, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ValueError(
            f"Fashion-MNIST {split} images in {directory!r} have shape {images.shape} and dtype "
            f"{images.dtype}; expected uint8 (N, 28, 28). Reinstall with `{INSTALL_HINT}`."
        )
    if labels.shape != (images.shape[0],) or labels.size and labels.max() > 9:
        raise ValueError(
            f"Fashion-MNIST {split} labels in {directory!r} have shape {labels.shape} (expected "
            f"({images.shape[0]},) with values 0..9). Reinstall with `{INSTALL_HINT}`."
        )
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _check_split(split: str) -> None:
    if split not in _PREFIX:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; use one of {list(_PREFIX)}")


def load_fashion_mnist_raw(
    split: str = "train", root: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Cached read-only uint8 arrays: images (N, 28, 28), labels (N,). Do not modify."""
    _check_split(split)
    return _load_raw(split, fashion_mnist_dir(root))


def to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 28, 28) -> float32 (N, 1, 28, 28) in [0, 1]; labels -> int64 (N,)."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32) / np.float32(255.0))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64).copy())
    return x.unsqueeze(1), y


def load_fashion_mnist(
    split: str = "train", root: str | os.PathLike[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``split`` ("train": 60000, "test": 10000).

    Returns x float32 (N, 1, 28, 28) scaled to [0, 1] and y int64 (N,). The decoded files are
    cached in-process; each call returns fresh tensors, so callers may modify them.
    """
    images, labels = load_fashion_mnist_raw(split, root)
    return to_tensors(images, labels)
