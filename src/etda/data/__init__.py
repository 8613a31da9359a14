"""Datasets (Fashion-MNIST IDX reader, sklearn digits fallback, King James Bible text) and
seeded subsets."""

from etda.data.bundle import DataBundle, digits, fmnist, fmnist2
from etda.data.digits import load_digits_data
from etda.data.fashion_mnist import (
    FASHION_MNIST_ENV,
    FMNIST_CLASSES,
    fashion_mnist_dir,
    load_fashion_mnist,
)
from etda.data.idx import read_idx, write_idx
from etda.data.subsets import random_subset_masks, seeded_subset
from etda.data.text import TextBundle, Vocabulary, kjv, load_kjv

__all__ = [
    "FASHION_MNIST_ENV",
    "FMNIST_CLASSES",
    "DataBundle",
    "TextBundle",
    "Vocabulary",
    "digits",
    "fashion_mnist_dir",
    "fmnist",
    "fmnist2",
    "kjv",
    "load_digits_data",
    "load_fashion_mnist",
    "load_kjv",
    "random_subset_masks",
    "read_idx",
    "seeded_subset",
    "write_idx",
]
