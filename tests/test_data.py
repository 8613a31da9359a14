"""Tests for etda.data: IDX reader, Fashion-MNIST loader, subsets, bundles."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from conftest import _have_fashion_mnist, needs_fashion_mnist

from etda.data import (
    FASHION_MNIST_ENV,
    FMNIST_CLASSES,
    DataBundle,
    digits,
    fmnist,
    fmnist2,
    load_digits_data,
    load_fashion_mnist,
    random_subset_masks,
    read_idx,
    seeded_subset,
    write_idx,
)

# --- IDX ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path, name, dtype):
    arr = (np.arange(2 * 3 * 4) - 5).reshape(2, 3, 4).astype(dtype)
    if dtype == np.uint8:
        arr = np.abs(arr).astype(dtype)
    write_idx(tmp_path / name, arr)
    out = read_idx(tmp_path / name)
    assert out.dtype == arr.dtype and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)
    out[0, 0, 0] = 1  # returned arrays are writable copies


def test_idx_gzip_detected_by_content(tmp_path):
    path = tmp_path / "labels"  # gzipped content without a .gz suffix
    with gzip.open(path, "wb") as fh:
        fh.write(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + bytes([1, 2, 3]))
    np.testing.assert_array_equal(read_idx(path), [1, 2, 3])


def test_idx_bad_magic(tmp_path):
    path = tmp_path / "bad.idx"
    path.write_bytes(b"\x01\x02\x08\x01" + (3).to_bytes(4, "big") + bytes(3))
    with pytest.raises(ValueError, match="magic"):
        read_idx(path)
    path.write_bytes(b"\x00\x00\x42\x01" + (3).to_bytes(4, "big") + bytes(3))
    with pytest.raises(ValueError, match="magic"):
        read_idx(path)


def test_idx_truncated(tmp_path):
    path = tmp_path / "short.idx"
    path.write_bytes(b"\x00\x00\x08\x02" + (3).to_bytes(4, "big") + (4).to_bytes(4, "big") + b"x")
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)
    path.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(path)
    path.write_bytes(b"\x00\x00\x08\x03" + bytes(4))  # header promises 3 dims, has 1
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


# --- Fashion-MNIST loader on tiny fake files -----------------------------------------------


def _fake_fmnist(root, n_train=30, n_test=20, gz=True):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(
            root / f"{prefix}-images-idx3-ubyte{suffix}",
            rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8),
        )
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n, dtype=np.uint8) % 10)


@pytest.mark.parametrize("gz", [True, False])
def test_load_fashion_mnist_fake(tmp_path, gz):
    _fake_fmnist(tmp_path, gz=gz)
    x, y = load_fashion_mnist("train", root=tmp_path)
    assert x.shape == (30, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (30,) and y.dtype == torch.int64
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    x[:] = 0  # fresh tensors: modifying them must not corrupt the cache
    x2, _ = load_fashion_mnist("train", root=tmp_path)
    assert float(x2.max()) > 0
    xt, _ = load_fashion_mnist("test", root=tmp_path)
    assert xt.shape == (20, 1, 28, 28)


def test_load_fashion_mnist_env_var(tmp_path, monkeypatch):
    _fake_fmnist(tmp_path)
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))
    assert load_fashion_mnist("test")[0].shape[0] == 20


def test_fashion_mnist_gate_follows_the_env_var(tmp_path, monkeypatch):
    """The real-data test's gate looks where the loader looks: $ETDA_FASHION_MNIST_DIR."""
    _fake_fmnist(tmp_path)
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))
    assert _have_fashion_mnist()
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "elsewhere"))
    assert not _have_fashion_mnist()


def test_load_fashion_mnist_missing(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist("train", root=missing)
    msg = str(info.value)
    assert str(missing) in msg
    assert FASHION_MNIST_ENV in msg
    assert "apt-get install -y dataset-fashion-mnist" in msg


def test_load_fashion_mnist_bad_split(tmp_path):
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("val", root=tmp_path)


def test_fmnist_bundles_on_fake_files(tmp_path):
    _fake_fmnist(tmp_path, n_train=40, n_test=30)
    b = fmnist(n_train=10, n_test=5, seed=3, root=tmp_path)
    assert b.x_train.shape == (10, 1, 28, 28) and b.y_test.shape == (5,)
    assert b.num_classes == 10 and b.class_names == tuple(FMNIST_CLASSES)
    b2 = fmnist2(n_train=6, n_test=4, seed=0, root=tmp_path)  # 8 train / 6 test of classes 0, 6
    assert set(b2.y_train.tolist()) <= {0, 1} and b2.num_classes == 2
    assert b2.class_names == ("T-shirt/top", "Shirt")
    with pytest.raises(ValueError, match="n_train=100"):
        fmnist(n_train=100, n_test=5, root=tmp_path)
    with pytest.raises(ValueError, match="n_test=7"):
        fmnist2(n_train=2, n_test=7, root=tmp_path)
    with pytest.raises(ValueError, match="classes"):
        fmnist2(classes=(0, 0), root=tmp_path)


@needs_fashion_mnist
def test_real_fashion_mnist():
    """The real files, found where the loader looks: ``$ETDA_FASHION_MNIST_DIR`` first."""
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    assert torch.bincount(y).tolist() == [1000] * 10
    b = fmnist2(n_train=200, n_test=50)
    assert set(b.y_train.unique().tolist()) == {0, 1}
    assert set(b.y_test.unique().tolist()) == {0, 1}


# --- digits ---------------------------------------------------------------------------------


def test_load_digits_data():
    x, y = load_digits_data()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0


def test_digits_bundle_disjoint_and_deterministic():
    a, b, c = digits(300, 100, seed=1), digits(300, 100, seed=1), digits(300, 100, seed=2)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert a.x_train.shape == (300, 1, 8, 8) and a.x_test.shape == (100, 1, 8, 8)
    # disjoint: no test image equals a training image at the same full-dataset row
    x, _ = load_digits_data()
    flat = x.flatten(1)
    train_rows = {tuple(r) for r in a.x_train.flatten(1).tolist()}
    n_dup = sum(tuple(r) in train_rows for r in a.x_test.flatten(1).tolist())
    n_dup_pool = len(flat) - len({tuple(r) for r in flat.tolist()})
    assert n_dup <= n_dup_pool  # only exact duplicates already present in the dataset
    with pytest.raises(ValueError, match="n_test=600"):
        digits(1500, 600)
    with pytest.raises(ValueError, match="n_train"):
        digits(0, 10)


def test_bundle_validation():
    x, y = torch.zeros(4, 1, 2, 2), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="y_train"):
        DataBundle(x, y, x, torch.zeros(4, dtype=torch.long), 2, "t", 0)


# --- subsets ------------------------------------------------------------------------------


def test_seeded_subset():
    a = seeded_subset(100, 30, seed=5)
    assert a.dtype == np.int64 and a.shape == (30,)
    assert np.all(np.diff(a) > 0) and a.min() >= 0 and a.max() < 100
    np.testing.assert_array_equal(a, seeded_subset(100, 30, seed=5))
    assert not np.array_equal(a, seeded_subset(100, 30, seed=6))
    np.testing.assert_array_equal(seeded_subset(10, 10, 0), np.arange(10))
    with pytest.raises(ValueError, match="larger"):
        seeded_subset(10, 11, 0)
    with pytest.raises(ValueError, match="positive"):
        seeded_subset(10, 0, 0)


def test_random_subset_masks():
    m = random_subset_masks(101, count=7, fraction=0.3, seed=2)
    assert m.dtype == bool and m.shape == (7, 101)
    assert np.all(m.sum(1) == round(0.3 * 101))
    np.testing.assert_array_equal(m, random_subset_masks(101, 7, 0.3, seed=2))
    assert not np.array_equal(m, random_subset_masks(101, 7, 0.3, seed=3))
    assert len({r.tobytes() for r in m}) == 7  # rows differ
    with pytest.raises(ValueError, match="fraction"):
        random_subset_masks(10, fraction=1.5)
    with pytest.raises(ValueError, match="count"):
        random_subset_masks(10, count=0)
