"""Cached, resumable retraining on chosen training subsets, on the LDS machinery's executors.

The counterfactual-removal and data-cleaning evaluations retrain a setting (or any
Retrainer, e.g. :class:`etda.usercode.UserSetting`) on many kept-example masks and seeds.
Each (mask, seed) job is a file, keyed by a hash of the mask and the seed:

    <cache_dir>/<setting>-<key>/meta.json           setting fingerprint, sizes, version
    <cache_dir>/<setting>-<key>/job-<hash>.npz      test outputs, losses, predictions

``key`` hashes the setting's fingerprint, so changed data or code never reuse old jobs.
Files are written atomically and carry their mask and seed (checked on reading), so a killed
run loses only the jobs in flight, a corrupt file is recomputed, and a resumed run returns
exactly what an uninterrupted one would. A run that computes jobs holds the folder's lock.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from etda.evaluate.lds import RETRAINER, _atomic_write, _prepare_folder, _resolve
from etda.features.store import acquire_lock, release_lock
from etda.parallel import Executor, get_executor, torch_threads
from etda.paths import cache_path
from etda.settings import SETTINGS

CACHE_VERSION = 1
Job = tuple[np.ndarray, int]  # (kept-example mask bool (n_train,), training seed)


@dataclass(frozen=True)
class Retrained:
    """One retrained model's view of the test set (each array ``(n_test,)``)."""

    output: np.ndarray  # the attributed output (margin, log-likelihood, prediction), float64
    loss: np.ndarray  # the task's per-example loss, float64
    pred: np.ndarray  # predicted class, int64; -1 where the task has no classes
    seconds: float  # training time


def task_of(setting: Any) -> Any:
    """The etda.task object of a Setting (``make_task()``) or a UserSetting (``.task``)."""
    if hasattr(setting, "make_task"):
        return setting.make_task()
    return setting.task


@torch.no_grad()
def evaluate_model(setting: Any, model: torch.nn.Module) -> tuple[np.ndarray, ...]:
    """(output, loss, pred) of ``model`` on the setting's test set, each ``(n_test,)``."""
    from etda import batch
    from etda.task import ClassificationTask

    data, task = setting.data(), task_of(setting)
    output = setting.output(model, data.x_test, data.y_test).numpy().astype(np.float64)
    model.eval()
    p = next(model.parameters())
    losses, preds = [], []
    for lo in range(0, data.n_test, 1000):
        xb = batch.cast(batch.take(data.x_test, lo, lo + 1000), p.dtype, p.device)
        yb = data.y_test[lo : lo + 1000].to(p.device)
        out = batch.run_model(model, xb, task)
        losses.append(task.loss(out, yb).double().cpu())
        if isinstance(task, ClassificationTask):
            preds.append(out.argmax(-1).cpu())
        else:
            preds.append(torch.full((yb.shape[0],), -1))
    return output, torch.cat(losses).numpy(), torch.cat(preds).numpy().astype(np.int64)


def retrain_eval(setting: Any, keep: np.ndarray, seed: int) -> Retrained:
    """Train from ``seed`` on the examples where ``keep`` (bool (n_train,)) is true and
    evaluate on the test set; one torch thread, so no executor changes a number."""
    with torch_threads(1):
        result = setting.train(seed, subset=keep)
        output, loss, pred = evaluate_model(setting, result.model)
    return Retrained(output, loss, pred, float(result.seconds))


def _job(job: tuple[str, Any, str, np.ndarray, int]) -> Retrained:
    """Executor job: (setting key, Setting or None if registered, fingerprint, mask, seed)."""
    key, setting, fingerprint, mask, seed = job
    return retrain_eval(_resolve(key, setting, fingerprint), mask, seed)


def job_name(mask: np.ndarray, seed: int) -> str:
    """The file name of a job: a hash of its mask and seed."""
    h = hashlib.sha256(np.packbits(mask).tobytes())
    h.update(f"{mask.size}:{seed}".encode())
    return f"job-{h.hexdigest()[:24]}.npz"


def cache_folder(setting: Any, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of ``setting``'s retraining jobs (default: the cache's ``retrain-cache``)."""
    key = hashlib.sha256(f"{CACHE_VERSION}:{setting.fingerprint()}".encode()).hexdigest()[:16]
    return cache_path("retrain-cache", cache_dir) / f"{setting.name}-{key}"


def _read(path: Path, mask: np.ndarray, seed: int, n_test: int) -> Retrained | None:
    """A cached job; None if absent; raises ValueError if it is corrupt or not this job's."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in ("output", "loss", "pred", "seconds", "seed", "mask")}
    except Exception as exc:  # zip, npy-header, key and OS errors alike
        raise ValueError(f"unreadable ({type(exc).__name__}: {exc})") from exc
    if int(arrays["seed"]) != seed or not np.array_equal(arrays["mask"], np.packbits(mask)):
        raise ValueError("holds another job (mask or seed differ)")
    for k in ("output", "loss", "pred"):
        if arrays[k].shape != (n_test,):
            raise ValueError(f"{k} has shape {arrays[k].shape}, expected ({n_test},)")
    return Retrained(arrays["output"], arrays["loss"], arrays["pred"], float(arrays["seconds"]))


def _write(path: Path, r: Retrained, mask: np.ndarray, seed: int) -> None:
    arrays = {
        "output": np.asarray(r.output, np.float64),
        "loss": np.asarray(r.loss, np.float64),
        "pred": np.asarray(r.pred, np.int64),
        "seconds": np.float64(r.seconds),
        "seed": np.int64(seed),
        "mask": np.packbits(mask),
    }
    _atomic_write(path, lambda f: np.savez(f, **arrays))


@dataclass
class RetrainRun:
    """What :func:`retrain_many` did: one result per job, and its costs."""

    results: list[Retrained]
    cached: int  # distinct jobs read from the cache
    trained: int  # distinct jobs trained now
    train_seconds: float  # training seconds of the distinct jobs, cached ones included
    folder: Path


def retrain_many(
    setting: Any,
    jobs: Sequence[Job],
    cache_dir: str | os.PathLike | None = None,
    executor: str | Executor = "process",
    workers: int | None = None,
    address: str | None = None,
    progress: bool = True,
    desc: str = "retraining",
    lock_timeout: float | None = None,
) -> RetrainRun:
    """Retrain ``setting`` for every ``(keep mask, seed)`` job (duplicates trained once),
    reading what the cache already holds and writing each new job as it finishes."""
    missing = [a for a in RETRAINER if not hasattr(setting, a)]
    if missing:
        raise TypeError(
            f"setting must be a Setting or an object with {', '.join(RETRAINER)} "
            f"(e.g. etda.usercode.UserSetting); {type(setting).__name__} lacks "
            f"{', '.join(missing)}"
        )
    data = setting.data()
    n, n_test = data.n_train, data.n_test
    masks = [_check_mask(m, n) for m, _ in jobs]
    names = [job_name(m, int(s)) for m, (_, s) in zip(masks, jobs, strict=True)]
    unique = {name: (m, int(s)) for name, m, (_, s) in zip(names, masks, jobs, strict=True)}
    folder = cache_folder(setting, cache_dir)
    meta = {
        "version": CACHE_VERSION,
        "setting": setting.name,
        "fingerprint": setting.fingerprint(),
        "n_train": n,
        "n_test": n_test,
    }
    _prepare_folder(folder, meta)
    done = _scan(folder, unique, n_test, warn=True)
    cached = len(done)
    if len(done) < len(unique):
        lock = acquire_lock(folder / ".lock", lock_timeout, f"retraining cache {folder}")
        try:
            done = _scan(folder, unique, n_test, warn=False)
            cached = len(done)
            _train(
                setting,
                meta["fingerprint"],
                unique,
                done,
                folder,
                executor,
                workers,
                address,
                progress,
                desc,
            )
        finally:
            release_lock(lock)
    seconds = float(sum(done[name].seconds for name in unique))
    results = [done[name] for name in names]
    return RetrainRun(results, cached, len(unique) - cached, seconds, folder)


def _check_mask(mask: Any, n: int) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype != np.bool_ or mask.shape != (n,):
        raise ValueError(
            f"a retraining job needs a bool mask of shape ({n},), got {mask.dtype} {mask.shape}"
        )
    if not mask.any():
        raise ValueError("a retraining job keeps no training example")
    return mask


def _scan(folder: Path, unique: dict[str, Job], n_test: int, warn: bool) -> dict[str, Retrained]:
    done, corrupt = {}, []
    for name, (mask, seed) in unique.items():
        try:
            r = _read(folder / name, mask, seed, n_test)
        except ValueError as exc:
            corrupt.append(f"{name}: {exc}")
            r = None
        if r is not None:
            done[name] = r
    if corrupt and warn:
        warnings.warn(
            f"{len(corrupt)} corrupt retraining job file(s) in {folder} will be recomputed: "
            + "; ".join(corrupt[:5]),
            RuntimeWarning,
            stacklevel=3,
        )
    return done


def _train(
    setting: Any,
    fingerprint: str,
    unique: dict[str, Job],
    done: dict[str, Retrained],
    folder: Path,
    executor: str | Executor,
    workers: int | None,
    address: str | None,
    progress: bool,
    desc: str,
) -> None:
    todo = [name for name in unique if name not in done]
    if not todo:
        return
    # Registered settings travel by name (workers load their own data); others pickled.
    key = setting.name
    shipped = None if SETTINGS.get(key) is setting else setting
    if shipped is not None:
        key = f"{setting.name}@{fingerprint}"
    payload = [(key, shipped, fingerprint, *unique[name]) for name in todo]
    owned = not isinstance(executor, Executor)
    ex = get_executor(executor, workers, address) if owned else executor  # type: ignore[arg-type]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(unique), initial=len(done), desc=f"{desc} {setting.name}", unit="model"
        )
    try:
        for i, r in ex.map(_job, payload):
            name = todo[i]
            _write(folder / name, r, *unique[name])
            done[name] = r
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if owned:
            ex.close()


def describe_run(run: RetrainRun) -> dict:
    """The costs of a retraining run, JSON-ready."""
    return {
        "models": run.cached + run.trained,
        "cached": run.cached,
        "trained": run.trained,
        "train_seconds": run.train_seconds,
        "cache": str(run.folder),
    }
