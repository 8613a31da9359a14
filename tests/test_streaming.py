"""Streamed data: Datasets, DataLoaders and lists of batches are read a chunk at a time (one
first pass counts, validates and hashes them; the inputs are never held whole), and give the
scores of the same data as tensors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import etda
from etda import batch
from etda.features.featurize import NonFiniteError
from etda.sources import StreamedInputs, as_source

D64 = torch.float64


class Generated(Dataset):
    """Examples made on demand from their index (deterministic), counting reads."""

    def __init__(self, n: int, shape: tuple[int, ...] = (6,), seed: int = 0, nan_at: int = -1):
        self.n, self.shape, self.seed, self.nan_at = n, shape, seed, nan_at
        self.reads = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        self.reads += 1
        g = torch.Generator().manual_seed(self.seed * 100_003 + i)
        x = torch.randn(self.shape, generator=g, dtype=D64)
        if i == self.nan_at:
            x[0] = float("nan")
        return x, torch.randint(0, 3, (), generator=g)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*(self[i] for i in range(self.n)), strict=True)
        return torch.stack(xs), torch.stack(ys)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.0), nn.Linear(8, 3)).to(D64)


def test_a_dataset_is_streamed_not_materialized() -> None:
    ds = Generated(50)
    want = Generated(50).tensors()[0][10:17]
    x, y = as_source(ds, "train")
    assert isinstance(x, StreamedInputs) and x.n == 50 and y.shape == (50,)
    assert ds.reads == 50  # the first pass
    part = batch.take(x, 10, 17)
    np.testing.assert_array_equal(part, want)
    assert ds.reads == 57  # only the rows asked for
    batch.take(x, 10, 17)
    assert ds.reads == 57  # the last chunk is kept


@pytest.mark.parametrize("method", ["trak", "if", "graddot"])
@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_streamed_scores_equal_tensor_scores(method, chunk_size) -> None:
    train, test = Generated(40), Generated(9, seed=1)
    ref = etda.attribute(
        mlp(), train.tensors(), test.tensors(), method=method, dtype="float64", chunk_size=7
    )
    got = etda.attribute(mlp(), train, test, method=method, dtype="float64", chunk_size=chunk_size)
    if chunk_size == 7:
        np.testing.assert_array_equal(got.values, ref.values)
    else:
        np.testing.assert_allclose(got.values, ref.values, rtol=1e-10, atol=1e-13)


def test_loaders_with_batches_across_chunk_boundaries() -> None:
    train, test = Generated(40), Generated(9, seed=1)
    (x, y), (xt, yt) = train.tensors(), test.tensors()
    ref = etda.attribute(mlp(), (x, y), (xt, yt), method="trak", dtype="float64", chunk_size=8)
    loader = DataLoader(train, batch_size=5, shuffle=False)  # 5 does not divide 8
    dicts = [{"x": xt[i : i + 4], "labels": yt[i : i + 4]} for i in range(0, 9, 4)]

    class KeywordModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = mlp()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    got = etda.attribute(mlp(), loader, (xt, yt), method="trak", dtype="float64", chunk_size=8)
    np.testing.assert_array_equal(got.values, ref.values)
    train_dicts = [{"x": x[i : i + 3], "labels": y[i : i + 3]} for i in range(0, 40, 3)]
    got = etda.attribute(
        KeywordModel(), train_dicts, dicts, method="trak", dtype="float64", chunk_size=8
    )
    np.testing.assert_array_equal(got.values, ref.values)


def test_self_influence_and_ensembles_stream() -> None:
    train = Generated(30)
    x, y = train.tensors()
    ref = etda.self_influence(mlp(), (x, y), method="if", dtype="float64")
    got = etda.self_influence(mlp(), train, method="if", dtype="float64")
    np.testing.assert_allclose(got.values, ref.values, rtol=1e-10)
    test = Generated(5, seed=2)
    ens = etda.Dropout(members=3, p=0.3, mode="per-example")
    ref = etda.attribute(
        mlp(), (x, y), test.tensors(), method="trak", ensemble=ens, dtype="float64"
    )
    got = etda.attribute(mlp(), train, test, method="trak", ensemble=ens, dtype="float64")
    np.testing.assert_allclose(got.values, ref.values, rtol=1e-10, atol=1e-13)


def test_exact_hessian_influence_reads_streamed_data_whole() -> None:
    train, test = Generated(25), Generated(4, seed=3)
    opts = dict(method="if", solver="cg", damping=1.0, dtype="float64")
    ref = etda.attribute(mlp(), train.tensors(), test.tensors(), **opts)
    got = etda.attribute(mlp(), train, test, **opts)
    np.testing.assert_allclose(got.values, ref.values, rtol=1e-9, atol=1e-12)


def test_worker_processes_read_their_own_rows(tmp_path) -> None:
    train, test = Generated(40), Generated(6, seed=4)
    ref = etda.attribute(mlp(), train, test, method="trak", dtype="float64", chunk_size=8)
    got = etda.attribute(
        mlp(),
        train,
        test,
        method="trak",
        dtype="float64",
        chunk_size=8,
        executor="process",
        workers=2,
        store=tmp_path / "store",
    )
    np.testing.assert_array_equal(got.values, ref.values)


def test_streamed_data_key_the_feature_store(tmp_path) -> None:
    train, test = Generated(30), Generated(5, seed=1)
    opts = dict(method="trak", dtype="float64", store=tmp_path / "s")
    first = etda.attribute(mlp(), train, test, **opts)
    reads = train.reads
    again = etda.attribute(mlp(), train, test, **opts)
    np.testing.assert_array_equal(again.values, first.values)
    # the second run reads the data once (the first pass; the probes read 3 more examples)
    # and the features from the store
    assert train.reads - reads == 30 + 3
    from etda.features.store import StaleStoreError

    with pytest.raises(StaleStoreError, match="different data"):  # other data, same size
        etda.attribute(mlp(), Generated(30, seed=9), test, **opts)


def test_bad_streams_are_clear() -> None:
    with pytest.raises(NonFiniteError, match=r"example index \[37\]"):
        as_source(Generated(50, nan_at=37), "train")
    x, y = Generated(20).tensors()
    gen = ((x[i : i + 5], y[i : i + 5]) for i in range(0, 20, 5))
    with pytest.raises(TypeError, match="iterator"):
        etda.attribute(mlp(), gen, (x[:2], y[:2]), method="graddot")

    class Shrinking(list):  # yields fewer batches once it has been read through once
        passes = 0  # (the first call is the check that it is not an iterator)

        def __iter__(self):
            Shrinking.passes += 1
            return iter(self[: 4 if Shrinking.passes <= 2 else 2])

    batches = Shrinking([(x[i : i + 5], y[i : i + 5]) for i in range(0, 20, 5)])
    with pytest.raises(ValueError, match="same examples"):
        etda.attribute(mlp(), batches, (x[:2], y[:2]), method="graddot", dtype="float64")


# ------------------------------------------------------------------------------ memory

PEAK = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from torch import nn
    from torch.utils.data import Dataset
    import etda

    N, SHAPE = 6000, (3, 64, 64)  # 295 MB of float32 inputs if held whole

    class Images(Dataset):
        def __len__(self):
            return N

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return torch.rand(SHAPE, generator=g), i % 10

    torch.manual_seed(0)
    model = nn.Sequential(nn.AvgPool2d(8), nn.Flatten(), nn.Linear(192, 10))
    data = Images()
    if sys.argv[1] == "tensors":
        xs = torch.stack([data[i][0] for i in range(N)])
        data = (xs, torch.arange(N) % 10)
    test = [(torch.rand(4, *SHAPE), torch.arange(4))]
    s = etda.attribute(model, data, test, method="graddot", proj_dim=64, chunk_size=256,
                       memory_budget="200MB", progress=False)
    # VmHWM: this process's own peak (ru_maxrss keeps the forking parent's across exec)
    with open("/proc/self/status") as f:
        hwm = [line for line in f if line.startswith("VmHWM:")]
    rss = int(hwm[0].split()[1]) / 1024 if hwm else (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({"peak_mb": rss, "shape": list(s.values.shape)}))
    """
)


def _peak(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PEAK, mode], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_large_streamed_dataset_stays_small_in_memory() -> None:
    """6000 images of 3 x 64 x 64 (295 MB as one tensor): streamed, the peak RSS stays about
    one chunk above the interpreter's (measured: 1206-1277 MB held whole, 443-467 MB streamed;
    VmHWM, since ru_maxrss carries the forking parent's peak across exec)."""
    streamed, held = _peak("stream"), _peak("tensors")
    assert streamed["shape"] == held["shape"] == [4, 6000]
    assert held["peak_mb"] - streamed["peak_mb"] > 200, (streamed, held)
