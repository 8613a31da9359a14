"""LDS: the metric against scipy, and the cached, resumable retraining ground truth."""

from __future__ import annotations

import dataclasses
import importlib
import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import datagate
import numpy as np
import pytest
from scipy.stats import spearmanr

from etda.evaluate import (
    GroundTruth,
    LDSConfig,
    ground_truth,
    lds,
    load_ground_truth,
    noise_ceiling,
    spearman_rows,
)
from etda.parallel import InProcess, LocalProcesses
from etda.settings import get_setting

# The function etda.evaluate.lds shadows the module of the same name as a package attribute.
lds_mod = importlib.import_module("etda.evaluate.lds")

SMALL = LDSConfig(n_subsets=4, fraction=0.5, seeds_per_subset=1, seed=0)


def _count_jobs(monkeypatch: pytest.MonkeyPatch) -> list:
    """Patch the retraining job (in-process only) to record which jobs actually ran."""
    calls: list = []
    real = lds_mod._retrain_job

    def counting(job):
        calls.append(job[-1])  # the retrain seed
        return real(job)

    monkeypatch.setattr(lds_mod, "_retrain_job", counting)
    return calls


def _job_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("job-*.npz"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> GroundTruth:
    """digits-mlp ground truth, 4 subsets, computed in-process."""
    cache = tmp_path_factory.mktemp("lds-ref")
    return ground_truth(get_setting("digits-mlp"), SMALL, cache, "inprocess", progress=False)


# --------------------------------------------------------------------------- metric


def test_spearman_rows_matches_scipy_with_ties() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=(20, 30)).astype(float)  # many ties
    b = rng.normal(size=(20, 30))
    b[:, :10] = np.round(b[:, :10])  # ties in b too
    a[3] = 2.0  # constant row -> NaN, as scipy
    got = spearman_rows(a, b)
    for t in range(a.shape[0]):
        if t == 3:
            assert np.isnan(got[t])
        else:
            assert got[t] == pytest.approx(spearmanr(a[t], b[t]).statistic, abs=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        spearman_rows(a, b[:, :5])


def _synthetic_gt(values: np.ndarray, outputs_fn, n_subsets: int = 12) -> GroundTruth:
    n_test, n_train = values.shape
    masks = np.random.default_rng(1).random((n_subsets, n_train)) < 0.5
    outputs = outputs_fn(masks.astype(float) @ values.T)  # (S, n_test)
    return GroundTruth(masks, outputs, LDSConfig(n_subsets=n_subsets), "synthetic", "-", 0.0)


def test_lds_of_perfect_linear_datamodel_is_one() -> None:
    values = np.random.default_rng(2).normal(size=(7, 40))
    # Any strictly increasing function of the linear prediction is ranked identically.
    gt = _synthetic_gt(values, lambda p: np.exp(p) + 3.0 * p)
    result = lds(values, gt)
    assert result.mean == pytest.approx(1.0, abs=1e-12)
    assert result.sem == pytest.approx(0.0, abs=1e-12)
    assert lds(-values, gt).mean == pytest.approx(-1.0, abs=1e-12)
    with pytest.raises(ValueError, match=r"needs \(n_test, n_train\) = \(7, 40\)"):
        lds(values.T, gt)


def test_noise_ceiling_of_repeated_retrainings() -> None:
    """Two retrainings = true effect + independent noise of equal variance: they correlate
    at about 1/2, and the true effect reaches the predicted maximum LDS on their average."""
    rng = np.random.default_rng(5)
    S, n_test, n_train = 400, 60, 30
    values = rng.normal(size=(n_test, n_train))
    masks = rng.random((S, n_train)) < 0.5
    signal = masks.astype(float) @ values.T  # (S, n_test)
    scale = signal.std(axis=0)
    reps = np.stack([signal + scale * rng.normal(size=signal.shape) for _ in range(2)], axis=1)
    gt = GroundTruth(
        masks,
        reps.mean(1),
        LDSConfig(n_subsets=S, seeds_per_subset=2),
        "synthetic",
        "-",
        0.0,
        repeat_outputs=reps,
    )
    nc = noise_ceiling(gt)
    assert nc.repeats == 2 and nc.between_repeats.per_test.shape == (n_test,)
    assert nc.between_repeats.mean == pytest.approx(0.5, abs=0.05)
    assert nc.max_lds == pytest.approx(np.sqrt(2 * 0.5 / 1.5), abs=0.04)
    assert lds(values, gt).mean == pytest.approx(nc.max_lds, abs=0.04)  # the truth hits it
    # identical repeats: a noise-free ground truth
    same = dataclasses.replace(gt, repeat_outputs=np.stack([signal, signal], axis=1))
    assert noise_ceiling(same).max_lds == pytest.approx(1.0)
    with pytest.raises(ValueError, match="seeds_per_subset=2"):
        noise_ceiling(dataclasses.replace(gt, repeat_outputs=reps[:, :1]))


def test_lds_drops_undefined_rows_with_warning() -> None:
    values = np.random.default_rng(3).normal(size=(5, 30))
    gt = _synthetic_gt(values, lambda p: p)
    values[2] = 0.0  # constant predictions for test example 2
    with pytest.warns(RuntimeWarning, match="undefined for 1 of 5"):
        result = lds(values, gt)
    assert np.isnan(result.per_test[2]) and result.mean == pytest.approx(1.0)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="n_subsets must be an int >= 2"):
        LDSConfig(n_subsets=1)
    with pytest.raises(ValueError, match="fraction must be in"):
        LDSConfig(fraction=0.0)
    assert {f.name for f in dataclasses.fields(LDSConfig)} == {
        "n_subsets",
        "fraction",
        "seeds_per_subset",
        "seed",
    }
    assert all("help" in f.metadata for f in dataclasses.fields(LDSConfig))


# --------------------------------------------------------------------- ground truth


def test_ground_truth_shapes_and_meta(reference: GroundTruth) -> None:
    n_train = get_setting("digits-mlp").data().n_train
    assert reference.masks.shape == (4, n_train) and reference.masks.dtype == bool
    assert reference.outputs.shape == (4, 200) and reference.outputs.dtype == np.float64
    assert np.isfinite(reference.outputs).all()
    assert reference.train_seconds == pytest.approx(reference.job_seconds.sum())
    assert reference.path.name.startswith("digits-mlp-")
    meta = json.loads((reference.path / "meta.json").read_text())
    assert meta["fingerprint"] == get_setting("digits-mlp").fingerprint()
    assert meta["config"] == dataclasses.asdict(SMALL)
    assert len(_job_files(reference.path)) == 4
    # Different subsets give different models.
    assert not np.allclose(reference.outputs[0], reference.outputs[1])


def test_cache_is_reused_and_changed_config_is_not(
    reference: GroundTruth, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _count_jobs(monkeypatch)
    cache = reference.path.parent
    again = ground_truth(get_setting("digits-mlp"), SMALL, cache, "inprocess", progress=False)
    assert calls == [] and np.array_equal(again.outputs, reference.outputs)
    assert np.array_equal(
        load_ground_truth(get_setting("digits-mlp"), SMALL, cache).outputs, reference.outputs
    )

    changed = dataclasses.replace(SMALL, seed=1)
    with pytest.raises(FileNotFoundError, match="compute it with ground_truth"):
        load_ground_truth(get_setting("digits-mlp"), changed, cache)
    other = ground_truth(get_setting("digits-mlp"), changed, cache, InProcess(), progress=False)
    assert len(calls) == 4 and other.path != reference.path
    assert not np.array_equal(other.masks, reference.masks)
    assert len(_job_files(reference.path)) == 4  # the old folder is untouched


def test_corrupt_job_files_are_recomputed(
    reference: GroundTruth, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / reference.path.name
    shutil.copytree(reference.path, folder)
    files = _job_files(folder)
    files[1].write_bytes(b"not a zip file")
    np.savez(files[2].open("wb"), outputs=np.zeros(3), seconds=1.0, seed=0)  # wrong shape
    calls = _count_jobs(monkeypatch)
    with pytest.warns(RuntimeWarning, match="2 corrupt LDS job file"):
        gt = ground_truth(get_setting("digits-mlp"), SMALL, tmp_path, "inprocess", progress=False)
    assert len(calls) == 2
    assert np.array_equal(gt.outputs, reference.outputs)


_INTERRUPTED_RUN = """
import sys
from etda.evaluate import LDSConfig, ground_truth
from etda.settings import get_setting
ground_truth(get_setting("digits-logreg"), LDSConfig(n_subsets=12), sys.argv[1], "inprocess",
             progress=False)
"""


def test_killed_run_resumes_without_retraining(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    setting, config = get_setting("digits-logreg"), LDSConfig(n_subsets=12)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_INTERRUPTED_RUN), killed])
    folder = lds_mod.cache_folder(setting, config, killed)
    try:
        deadline = time.monotonic() + 120
        while len(_job_files(folder)) < 2 and proc.poll() is None:
            assert time.monotonic() < deadline, "the background run wrote no jobs in 120 s"
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in _job_files(folder)}
    assert 2 <= len(before) < 12, "the run finished before it could be killed"

    calls = _count_jobs(monkeypatch)
    resumed = ground_truth(setting, config, killed, "inprocess", progress=False)
    assert len(calls) == 12 - len(before)
    assert {p.name: p.stat().st_mtime_ns for p in _job_files(folder) if p.name in before} == before
    assert len(_job_files(folder)) == 12

    fresh = ground_truth(setting, config, tmp_path / "fresh", "inprocess", progress=False)
    assert np.array_equal(resumed.outputs, fresh.outputs)
    assert np.array_equal(resumed.masks, fresh.masks)


# ------------------------------------------------------------------------ executors


def test_local_processes_match_inprocess(reference: GroundTruth, tmp_path: Path) -> None:
    # An unregistered setting travels pickled; a registered one by name.
    custom = dataclasses.replace(get_setting("digits-logreg"), name="digits-logreg-copy")
    with LocalProcesses(workers=2) as ex:
        gt = ground_truth(get_setting("digits-mlp"), SMALL, tmp_path, ex, progress=False)
        gt_custom = ground_truth(custom, SMALL, tmp_path, ex, progress=False)
    assert np.array_equal(gt.outputs, reference.outputs)
    inproc = ground_truth(custom, SMALL, tmp_path / "in", "inprocess", progress=False)
    assert np.array_equal(gt_custom.outputs, inproc.outputs)


def test_ray_matches_inprocess(reference: GroundTruth, tmp_path: Path) -> None:
    ray = datagate.require_module("ray", "needs ray (pip install -e '.[all]')")

    from etda.parallel import RayExecutor

    assert not ray.is_initialized()
    with RayExecutor(workers=2) as ex:
        gt = ground_truth(get_setting("digits-mlp"), SMALL, tmp_path, ex, progress=False)
        assert ray.is_initialized()
        # A private local instance on loopback only, with the CPUs asked for.
        assert [n["NodeManagerAddress"] for n in ray.nodes()] == ["127.0.0.1"]
        assert ray.cluster_resources()["CPU"] == 2
    assert not ray.is_initialized()  # it shut down the Ray it started
    assert np.array_equal(gt.outputs, reference.outputs)


def test_progress_bar_counts_cached_jobs(
    reference: GroundTruth, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / reference.path.name
    shutil.copytree(reference.path, folder)
    _job_files(folder)[0].unlink()
    ground_truth(get_setting("digits-mlp"), SMALL, tmp_path, "inprocess")
    err = capsys.readouterr().err
    assert "3/4" in err and "4/4" in err  # starts at the 3 cached jobs


def test_bad_inputs_are_named() -> None:
    with pytest.raises(TypeError, match="setting must be a Setting"):
        ground_truth(3, SMALL)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown setting 'nope'"):
        ground_truth("nope", SMALL)
    with pytest.raises(TypeError, match="config must be an LDSConfig"):
        ground_truth(get_setting("digits-mlp"), {"n_subsets": 4})  # type: ignore[arg-type]
