"""Scale: out-of-core (blocked) scoring, low-precision feature storage, and featurization
distributed over processes and Ray, each against the in-memory single-process reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import etda
from etda.engine import memory
from etda.engine.memory import MemoryBudgetError, MemoryModel
from etda.features.blocks import StreamedFeatures
from etda.features.store import FeatureStore, from_storage, to_storage

D64 = torch.float64
N_TR, N_TE = 37, 7


pytestmark = pytest.mark.usefixtures("one_thread")


def make_mlp(seed: int = 0, dtype: torch.dtype = D64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 3)).to(dtype)


def make_data(n: int, seed: int, dtype: torch.dtype = D64) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 10, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


TRAIN, TEST = make_data(N_TR, 1), make_data(N_TE, 2)
MODELS = [make_mlp(0), make_mlp(1)]


def attribute(**kw) -> etda.Scores:
    kw = {
        "method": "trak",
        "proj_dim": 24,
        "projection": "factored",
        "dtype": "float64",
        "chunk_size": 5,
        **kw,
    }
    return etda.attribute(kw.pop("models", MODELS), TRAIN, TEST, **kw)


# ------------------------------------------------------------------- blocked scoring


@pytest.mark.parametrize(
    "method,ensemble",
    [(m, e) for m in ("trak", "if", "graddot", "gradcos") for e in (None, "dropout")]
    + [("trak", "forward-only")],
)
def test_blocked_scoring_equals_in_memory(method, ensemble, monkeypatch, tmp_path):
    ens = {
        None: None,
        "dropout": etda.Dropout(members=3, seed=4),
        "forward-only": etda.Dropout(members=3, seed=4, forward_only=True),
    }[ensemble]
    dense = attribute(method=method, ensemble=ens, out_of_core=False)
    assert not dense.config["out_of_core"]
    # several blocks of training columns, and several streamed row blocks for the Gram
    monkeypatch.setattr(MemoryModel, "score_block", lambda *a, **k: 5)
    monkeypatch.setattr(MemoryModel, "stream_rows", lambda *a, **k: 5)
    blocked = attribute(method=method, ensemble=ens, out_of_core=True, top_k=4)
    assert blocked.config["out_of_core"] and blocked.config["score_block"] == 5
    np.testing.assert_allclose(blocked.values, dense.values, rtol=1e-9, atol=1e-12)
    # damping chosen identically (same trace, same rule)
    if method in ("trak", "if"):
        lam = [m["damping"]["lam"] for m in dense.config["members"]]
        lam_b = [m["damping"]["lam"] for m in blocked.config["members"]]
        np.testing.assert_allclose(lam_b, lam, rtol=1e-10)
    # scores on disk, memory-mapped, with the top-k kept while streaming
    on_disk = attribute(
        method=method, ensemble=ens, scores_out=tmp_path / "s.npy", top_k=4, store=tmp_path / "f"
    )
    assert isinstance(on_disk.values, np.memmap) and on_disk.values.dtype == np.float32
    np.testing.assert_allclose(on_disk.values, dense.values, rtol=2e-6, atol=1e-6)
    order = np.argsort(-dense.values, axis=1, kind="stable")
    np.testing.assert_array_equal(blocked.topk["proponents"], order[:, :4])
    np.testing.assert_array_equal(blocked.topk["opponents"], order[:, ::-1][:, :4])
    for b, d in zip(blocked.top(3), dense.top(3), strict=True):
        for side in ("proponents", "opponents"):
            assert [i for i, _ in b[side]] == [i for i, _ in d[side]]
            np.testing.assert_allclose([v for _, v in b[side]], [v for _, v in d[side]])


def test_stream_block_size_does_not_change_gram(tmp_path):
    s = attribute(method="graddot", store=tmp_path, out_of_core=False)
    assert s.values.shape == (N_TE, N_TR)
    train = FeatureStore(tmp_path).root / "member-000" / "train"
    meta = json.loads((train / "meta.json").read_text())
    from etda.features.store import SplitStore

    st = SplitStore(train, N_TR, meta["widths"], D64)
    full = StreamedFeatures(st, N_TR)
    for block in (1, 4, 36):
        part = StreamedFeatures(st, block)
        np.testing.assert_allclose(part.gram(), full.gram(), rtol=1e-12)
        np.testing.assert_allclose(part.sq_norms(), full.sq_norms(), rtol=1e-12)
        np.testing.assert_array_equal(part.q, full.q)


def test_saved_out_of_core_scores_round_trip(tmp_path):
    s = attribute(scores_out=tmp_path / "scores.npy", top_k=3)
    s.save(tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / "scores.json").read_text())
    assert meta["values_npy"].endswith("scores.npy")  # not copied
    back = etda.Scores.load(tmp_path / "saved")
    np.testing.assert_array_equal(back.values, s.values)
    assert back.top(3) == s.top(3)


def test_budget_too_small_for_one_block_is_a_clear_error():
    with pytest.raises(MemoryBudgetError, match="cannot hold one block"):
        MemoryModel(budget=2 * 10**6).score_block(
            n_test=1000, widths=[2048], fixed=10**6, n_train=60000
        )
    with pytest.raises(MemoryError, match="raise --max-memory|scores_out"):
        attribute(out_of_core=True, memory_budget="1MB")


def test_exact_kernel_cannot_go_out_of_core():
    with pytest.raises(ValueError, match="projected features"):
        attribute(projection="none", proj_dim=None, out_of_core=True)


def test_out_of_core_refuses_what_it_cannot_stream():
    with pytest.raises(ValueError, match="gcv"):
        attribute(out_of_core=True, damping="gcv")
    with pytest.raises(ValueError, match="out-of-core"):
        attribute(
            method="if",
            solver="cg",
            projection="identity",
            proj_dim=None,
            out_of_core=True,
            damping=0.1,
        )


def test_auto_goes_out_of_core_when_dense_scores_do_not_fit(monkeypatch):
    # a process holding 100 MB with a 105 MB budget: the dense path (10 MB) does not fit
    monkeypatch.setattr(memory, "rss_bytes", lambda: 100 * 2**20)
    monkeypatch.setattr(MemoryModel, "dense_need", staticmethod(lambda *a: 10 * 2**20))
    s = attribute(memory_budget="105MB")
    assert s.config["out_of_core"]
    assert not attribute(memory_budget="2GB").config["out_of_core"]


# ------------------------------------------------------------------ storage precision


@pytest.mark.parametrize("storage,tol", [("float16", 1e-3), ("bfloat16", 8e-3)])
def test_low_precision_store_round_trips(storage, tol):
    t = torch.randn(50, 24, dtype=torch.float32) * 3
    back = from_storage(to_storage(t, storage), storage, torch.float32)
    assert back.dtype == torch.float32
    np.testing.assert_allclose(back, t, rtol=tol, atol=tol * 1e-2)
    assert not torch.equal(back, t)  # it really is lower precision


def test_float16_overflow_is_refused_not_stored_as_inf():
    with pytest.raises(OverflowError, match="bfloat16"):
        to_storage(torch.tensor([[1e6, 1.0]]), "float16")
    assert torch.isfinite(
        from_storage(to_storage(torch.tensor([[1e6]]), "bfloat16"), "bfloat16", torch.float32)
    ).all()


@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
def test_low_precision_scores_close_and_bytes_halved(storage, tmp_path):
    model = make_mlp(0, torch.float32)
    train, test = make_data(N_TR, 1, torch.float32), make_data(N_TE, 2, torch.float32)

    def run(**kw) -> etda.Scores:
        return etda.attribute(
            model, train, test, method="graddot", proj_dim=24, projection="factored", **kw
        )

    full = run()
    low = run(storage=storage, store=tmp_path)
    assert low.config["storage"] == storage
    assert low.costs.feature_bytes * 2 == full.costs.feature_bytes
    rel = np.abs(low.values - full.values).max() / np.abs(full.values).max()
    assert 0 < rel < 2e-2
    meta = json.loads((tmp_path / "member-000" / "train" / "meta.json").read_text())
    assert meta["storage"] == storage
    with pytest.raises(etda.StaleStoreError, match="storage"):
        run(store=tmp_path)  # float32 requested: the float16 store is not reused


def test_unknown_storage_is_refused():
    with pytest.raises(ValueError, match="storage must be one of"):
        attribute(storage="int8")


# ------------------------------------------------------------ distributed featurization


def _stored(root) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(root.rglob("*.npy")):
        out[str(f.relative_to(root))] = np.load(f)
    return out


@pytest.mark.parametrize("executor", ["process", "ray"])
def test_distributed_featurization_is_bit_identical(executor, tmp_path):
    ens = etda.Dropout(members=3, seed=7, mode="per-example")
    kw = {"method": "trak", "ensemble": ens, "dtype": "float32", "chunk_size": 4}
    models = [make_mlp(0, torch.float32)]
    data = make_data(N_TR, 1, torch.float32), make_data(N_TE, 2, torch.float32)
    ref = etda.attribute(
        models, *data, proj_dim=24, projection="factored", store=tmp_path / "one", **kw
    )
    dist = etda.attribute(
        models,
        *data,
        proj_dim=24,
        projection="factored",
        store=tmp_path / "many",
        executor=executor,
        workers=2,
        **kw,
    )
    a, b = _stored(tmp_path / "one"), _stored(tmp_path / "many")
    assert a.keys() == b.keys() and len(a) == 2 * 3 * 3  # 3 members x 2 splits x (phi, f, q)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    np.testing.assert_array_equal(dist.values, ref.values)
    assert dist.config["executor"] == executor
    # the driver recorded every row; a rerun featurizes nothing
    for done in (tmp_path / "many").rglob("done.json"):
        ranges = json.loads(done.read_text())["ranges"]
        assert sorted(r[:2] for r in ranges)[0][0] == 0
    again = etda.attribute(
        models,
        *data,
        proj_dim=24,
        projection="factored",
        store=tmp_path / "many",
        executor="process",
        workers=2,
        **kw,
    )
    np.testing.assert_array_equal(again.values, ref.values)


def test_distributed_featurization_needs_a_disk_store():
    with pytest.raises(ValueError, match="store directory"):
        attribute(executor="process", store=FeatureStore(None))
    with pytest.raises(ValueError, match="executor must be one of"):
        attribute(executor="slurm")


# ----------------------------------------------------------------------------- CLI


def test_cli_out_of_core_options(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from etda.cli import app

    monkeypatch.chdir(tmp_path)
    runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})
    args = [
        "attribute",
        "-s",
        "digits-mlp",
        "--proj-dim",
        "64",
        "--no-lds",
        "--no-progress",
        "--model-dir",
        str(tmp_path / "models"),
        "--top",
        "1",
        "--out",
        str(tmp_path / "o"),
    ]
    result = runner.invoke(
        app, [*args, "--scores-out", str(tmp_path / "s.npy"), "--storage", "bfloat16"]
    )
    assert result.exit_code == 0, result.output
    assert "out of core" in result.output and "bfloat16" in result.output
    saved = etda.Scores.load(tmp_path / "o")
    assert saved.values.shape == (200, 1000) and saved.config["storage"] == "bfloat16"
    np.testing.assert_array_equal(saved.values, np.load(tmp_path / "s.npy"))
    bad = runner.invoke(app, [*args, "--storage", "int4"])
    assert bad.exit_code == 2 and "int4" in bad.output
    bad = runner.invoke(app, [*args, "--max-memory", "lots"])
    assert bad.exit_code == 2 and "2GB" in bad.output


def test_resident_memory_is_measured_with_psutil():
    """/proc/self/statm reads 0 off Linux, which silently disabled the memory budget: the
    process's memory comes from psutil, and no module reads statm any more."""
    import psutil

    rss = memory.rss_bytes()
    assert rss > 50 * 2**20  # this process holds torch
    assert abs(rss - psutil.Process().memory_info().rss) < 64 * 2**20
    src = Path(etda.__file__).parent
    assert [p.name for p in src.rglob("*.py") if "/proc/self/statm" in p.read_text()] == []


def test_out_of_core_scoring_honours_solve_dtype(monkeypatch):
    """Streamed features solve in float32 when asked, as in-memory ones do."""
    import etda.methods.solve as solve

    dense = attribute(method="trak", out_of_core=False, solve_dtype="float32")
    calls = []
    real = solve._cholesky32
    monkeypatch.setattr(solve, "_cholesky32", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(MemoryModel, "score_block", lambda *a, **k: 5)
    monkeypatch.setattr(MemoryModel, "stream_rows", lambda *a, **k: 5)
    blocked = attribute(method="trak", out_of_core=True, solve_dtype="float32")
    assert blocked.config["out_of_core"] and calls
    scale = np.abs(dense.values).max()
    np.testing.assert_allclose(blocked.values, dense.values, rtol=0, atol=1e-5 * scale)
