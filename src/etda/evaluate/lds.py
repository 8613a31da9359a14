"""The linear datamodeling score (LDS) and its cached, resumable retraining ground truth.

Ground truth: draw ``n_subsets`` random subsets of the training set (each a ``fraction`` of
it), retrain ``seeds_per_subset`` models on each, and record every model's output (margin) on
every test example. LDS of attribution scores tau (n_test, n_train): for each test example,
the Spearman correlation across subsets between the predicted output ``sum_{i in S} tau_i``
and the retrained output; reported as mean ± standard error over test examples.

Group level (data owners): ``ground_truth(..., groups=labels)`` draws the subsets over the
groups (a ``fraction`` of the groups kept whole, the rest left out) and :func:`group_lds`
correlates the summed scores of the kept groups with the retrained output.

Retraining is the expensive part, so each (subset, seed) job is a file on disk:

    <cache_dir>/<setting>-<key>/meta.json             setting fingerprint + config
    <cache_dir>/<setting>-<key>/job-s0003-r00.npz     outputs (n_test,) float64 + seconds

``key`` hashes the setting fingerprint and the config, so a changed setting or config never
reuses another's jobs. Files are written atomically, so a killed run loses at most the jobs
in flight; the next run computes only missing (or corrupt) jobs. Runs that compute jobs hold
the folder's lock (``<cache_dir>/<setting>-<key>/.lock``), so two runs on one cache never
train the same jobs twice: the second waits and then finds them done.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from etda.data.subsets import random_subset_masks
from etda.features.store import acquire_lock, release_lock
from etda.parallel import Executor, get_executor, torch_threads
from etda.paths import cache_path
from etda.scores import Scores
from etda.seeding import derive_seed
from etda.settings import SETTINGS, Setting, get_setting

# Bump when the job file layout or the meaning of a job changes: old caches are then ignored.
CACHE_VERSION = 1
_SEED_TAG = 0x1D5  # separates retrain seeds from other seeds derived from config.seed


@dataclass(frozen=True)
class LDSConfig:
    """How the LDS ground truth is drawn (the defaults follow TRAK / dattri)."""

    n_subsets: int = field(
        default=50, metadata={"help": "Number of random training subsets S (at least 2)."}
    )
    fraction: float = field(
        default=0.5, metadata={"help": "Fraction of the training set in each subset, in (0, 1]."}
    )
    seeds_per_subset: int = field(
        default=1,
        metadata={"help": "Models retrained per subset; their outputs are averaged."},
    )
    seed: int = field(
        default=0, metadata={"help": "Seeds the subset masks and every retraining seed."}
    )

    def __post_init__(self) -> None:
        for name, low in (("n_subsets", 2), ("seeds_per_subset", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
                raise ValueError(f"LDSConfig.{name} must be an int >= {low}, got {value!r}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"LDSConfig.fraction must be in (0, 1], got {self.fraction!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def retrain_seed(self, subset: int, repeat: int) -> int:
        """Training seed of repeat ``repeat`` on subset ``subset`` (31-bit, deterministic)."""
        return derive_seed(_SEED_TAG, self.seed, subset, repeat) % (2**31 - 1)


@dataclass
class GroundTruth:
    """Retrained models' outputs on the test set, one row per random training subset."""

    masks: np.ndarray  # bool (S, n_train): which training examples each subset keeps
    outputs: np.ndarray  # float64 (S, n_test): outputs averaged over seeds_per_subset
    config: LDSConfig
    setting: str  # setting name
    fingerprint: str  # setting.fingerprint() the models were trained under
    train_seconds: float  # training wall time summed over all S * seeds_per_subset jobs
    job_seconds: np.ndarray | None = None  # float64 (S, R): training seconds of each job
    path: Path | None = None  # the cache folder it was read from / written to
    group_masks: np.ndarray | None = None  # bool (S, G): groups kept (a group ground truth)
    group_names: list | None = None  # (G,): the groups in order of first appearance
    repeat_outputs: np.ndarray | None = None  # float64 (S, R, n_test): each retraining's

    @property
    def n_subsets(self) -> int:
        return int(self.masks.shape[0])


@dataclass
class NoiseCeiling:
    """How reproducible the ground truth is: retraining the same subsets twice.

    ``between_repeats``: per test example, the Spearman correlation across subsets between
    the outputs of two retrainings (seeds) of the same subsets, averaged over pairs of
    repeats (mean ± standard error over test examples). ``max_lds``: the LDS a perfect
    predictor of the noise-free effect would reach against this ground truth's outputs
    (averages of R repeats): ``sqrt(R rho / (1 + (R - 1) rho))`` of the mean rho
    (Spearman-Brown), the scale to read LDS values against.
    """

    between_repeats: LDSResult
    repeats: int
    max_lds: float

    def to_dict(self) -> dict:
        return {
            "between_repeats": self.between_repeats.mean,
            "between_repeats_sem": self.between_repeats.sem,
            "repeats": self.repeats,
            "max_lds": self.max_lds,
        }


def noise_ceiling(gt: GroundTruth) -> NoiseCeiling:
    """The retrain-noise ceiling of ``gt`` (drawn with ``seeds_per_subset >= 2``)."""
    reps = gt.repeat_outputs
    if reps is None or reps.shape[1] < 2:
        raise ValueError(
            "the noise ceiling needs two or more retrainings per subset: draw the ground truth "
            "with LDSConfig(seeds_per_subset=2)"
        )
    R = reps.shape[1]
    pairs = [spearman_rows(reps[:, a].T, reps[:, b].T) for a in range(R) for b in range(a + 1, R)]
    rho_t = np.nanmean(np.stack(pairs), axis=0)  # (n_test,)
    ok = rho_t[np.isfinite(rho_t)]
    sem = float(ok.std(ddof=1) / np.sqrt(ok.size)) if ok.size > 1 else float("nan")
    rho = float(ok.mean()) if ok.size else float("nan")
    max_lds = float(np.sqrt(max(R * rho / (1 + (R - 1) * rho), 0.0))) if ok.size else rho
    return NoiseCeiling(LDSResult(rho, sem, rho_t), R, max_lds)


@dataclass
class LDSResult:
    """LDS mean ± standard error over test examples, and the per-test values."""

    mean: float
    sem: float
    per_test: np.ndarray  # float64 (n_test,), NaN where undefined (constant predictions)

    def __str__(self) -> str:
        return f"LDS {self.mean:.4f} ± {self.sem:.4f}"


# ----------------------------------------------------------------------------- metric


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Spearman correlation: a, b (T, S) -> (T,) float64.

    Ties get average ranks (as ``scipy.stats.spearmanr``). A row that is constant in ``a`` or
    ``b``, or holds a NaN, gives NaN.
    """
    from scipy.stats import rankdata  # local: scipy.stats costs ~1 s to import in each worker

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"spearman_rows needs two 2-D arrays of the same shape (T, S), got {a.shape} and "
            f"{b.shape}"
        )
    ra = rankdata(a, axis=1, method="average")
    rb = rankdata(b, axis=1, method="average")
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    num = np.einsum("ts,ts->t", ra, rb)
    den = np.sqrt(np.einsum("ts,ts->t", ra, ra) * np.einsum("ts,ts->t", rb, rb))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = num / den
    rho[den == 0] = np.nan
    return np.clip(rho, -1.0, 1.0)


def lds(values: np.ndarray | Scores, gt: GroundTruth) -> LDSResult:
    """LDS of scores ``values`` (n_test, n_train) (an array or a ``Scores``) against ``gt``.

    Predicted output of subset s for test t: ``values[t] @ gt.masks[s]``. Test examples whose
    LDS is undefined (constant predictions or outputs) are dropped from the mean, with a
    warning.
    """
    values = np.asarray(values.values if isinstance(values, Scores) else values, np.float64)
    n_subsets, n_train = gt.masks.shape
    n_test = gt.outputs.shape[1]
    if values.shape != (n_test, n_train):
        raise ValueError(
            f"scores have shape {values.shape} but the ground truth of setting {gt.setting!r} "
            f"needs (n_test, n_train) = ({n_test}, {n_train}); pass scores for that setting's "
            "test and training sets, in that orientation"
        )
    preds = values @ gt.masks.T.astype(np.float64)  # (n_test, S)
    return _correlate(preds, gt.outputs)


def group_lds(group_values: np.ndarray, gt: GroundTruth) -> LDSResult:
    """LDS of scores per group ``(n_test, G)`` (e.g. ``etda.generative.by_owner`` sums, in
    ``gt.group_names`` order) against a ground truth drawn over groups (``groups=``): for
    each test example, the Spearman correlation across subsets between the summed scores of
    the kept groups and the retrained output. Equals ``lds(values, gt)`` of the example
    scores when the group scores are their sums."""
    if gt.group_masks is None:
        raise ValueError("group_lds needs a ground truth drawn over groups (ground_truth(groups=))")
    group_values = np.asarray(group_values, dtype=np.float64)
    shape = (gt.outputs.shape[1], gt.group_masks.shape[1])
    if group_values.shape != shape:
        raise ValueError(f"group scores have shape {group_values.shape}, expected {shape}")
    return _correlate(group_values @ gt.group_masks.T.astype(np.float64), gt.outputs)


def _correlate(preds: np.ndarray, outputs: np.ndarray) -> LDSResult:
    """LDS from predictions ``(n_test, S)`` and retrained outputs ``(S, n_test)``."""
    n_test = outputs.shape[1]
    per_test = spearman_rows(preds, outputs.T)
    ok = np.isfinite(per_test)
    if not ok.all():
        warnings.warn(
            f"LDS undefined for {int((~ok).sum())} of {n_test} test examples (constant or NaN "
            "predictions or outputs); they are left out of the mean",
            RuntimeWarning,
            stacklevel=3,
        )
    kept = per_test[ok]
    if kept.size == 0:
        return LDSResult(float("nan"), float("nan"), per_test)
    sem = float(kept.std(ddof=1) / np.sqrt(kept.size)) if kept.size > 1 else float("nan")
    return LDSResult(float(kept.mean()), sem, per_test)


# ------------------------------------------------------------------------- retraining


# Settings already loaded by this (worker) process, keyed as the jobs name them.
_LOADED: dict[str, Setting] = {}


def _resolve(key: str, setting: Setting | None, fingerprint: str) -> Setting:
    if key not in _LOADED:
        resolved = SETTINGS.get(key) if setting is None else setting
        if resolved is None:
            raise ValueError(f"setting {key!r} is not registered in this process")
        actual = resolved.fingerprint()  # also loads its data, once per process
        if actual != fingerprint:
            # E.g. a Ray worker with different data files or a different etda version.
            raise RuntimeError(
                f"setting {key!r} has fingerprint {actual[:12]} in this worker but "
                f"{fingerprint[:12]} in the caller; make the data and code the same everywhere"
            )
        _LOADED.clear()  # keep at most one setting (and its data) alive per worker
        _LOADED[key] = resolved
    return _LOADED[key]


def retrain_outputs(setting: Setting, mask: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
    """Train a model of ``setting`` from ``seed`` on ``mask`` (bool (n_train,)); test outputs.

    Returns (outputs float64 (n_test,), training seconds). Runs torch on one thread, so the
    numbers do not depend on which executor (or how many threads) ran the job.
    """
    data = setting.data()
    with torch_threads(1):
        result = setting.train(seed, subset=mask)
        out = setting.output(result.model, data.x_test, data.y_test)
    return out.numpy().astype(np.float64), float(result.seconds)


def _retrain_job(job: tuple[str, Setting | None, str, np.ndarray, int]) -> tuple[np.ndarray, float]:
    """Executor job: (setting key, Setting or None if registered, fingerprint, mask, seed)."""
    key, setting, fingerprint, mask, seed = job
    return retrain_outputs(_resolve(key, setting, fingerprint), mask, seed)


# ------------------------------------------------------------------------------ cache


# What a ground truth retrains: a named Setting, or any object with these (the Retrainer
# protocol: ``name``, ``fingerprint()``, ``data()`` with x/y_train/test and n_test,
# ``train(seed, subset=mask) -> .model, .seconds``, ``output(model, x, y) -> (n,)``).
RETRAINER = ("name", "fingerprint", "data", "train", "output")


def cache_folder(
    setting: Setting,
    config: LDSConfig,
    cache_dir: str | os.PathLike | None = None,
    groups: Sequence[Any] | None = None,
) -> Path:
    """The folder holding ``setting``'s ground-truth jobs for ``config`` (default cache:
    ``etda.paths.cache_root() / "lds-cache"``); ``groups``: of a ground truth over groups."""
    key = _cache_key(setting.fingerprint(), config, _groups_key(groups))
    return cache_path("lds-cache", cache_dir) / f"{setting.name}-{key}"


def _cache_key(fingerprint: str, config: LDSConfig, groups_key: str | None = None) -> str:
    payload: dict[str, Any] = {
        "version": CACHE_VERSION,
        "fingerprint": fingerprint,
        "config": config.to_dict(),
    }
    if groups_key is not None:  # only then, so example-level keys stay as they were
        payload["groups"] = groups_key
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _groups_key(groups: Sequence[Any] | None) -> str | None:
    """A hash of the group labels of the training examples (None: example level)."""
    if groups is None:
        return None
    text = json.dumps([str(g) for g in groups])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def subset_masks(
    n_train: int, config: LDSConfig, groups: Sequence[Any] | None = None
) -> tuple[np.ndarray, np.ndarray | None, list | None]:
    """The kept-example masks ``(S, n_train)`` of a ground truth; with ``groups`` (one label
    per training example) whole groups are kept or left out: ``config.n_subsets`` random
    subsets of ``round(fraction * G)`` groups ``(S, G)``, expanded to their examples. Returns
    (example masks, group masks or None, group names or None)."""
    if groups is None:
        masks = random_subset_masks(n_train, config.n_subsets, config.fraction, config.seed)
        return masks, None, None
    from etda.generative import owner_index

    if len(groups) != n_train:
        raise ValueError(f"{len(groups)} group labels for {n_train} training examples")
    index, names = owner_index(groups)
    if len(names) < 2:
        raise ValueError(f"a ground truth over groups needs at least 2 groups, got {len(names)}")
    group_masks = random_subset_masks(len(names), config.n_subsets, config.fraction, config.seed)
    return group_masks[:, index], group_masks, names


def _job_path(folder: Path, s: int, r: int) -> Path:
    return folder / f"job-s{s:04d}-r{r:02d}.npz"


def _atomic_write(path: Path, write: Any) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _meta(setting: Setting, config: LDSConfig, groups: Sequence[Any] | None = None) -> dict:
    data = setting.data()
    meta = {
        "version": CACHE_VERSION,
        "setting": setting.name,
        "fingerprint": setting.fingerprint(),
        "config": config.to_dict(),
        "n_train": data.n_train,
        "n_test": data.n_test,
    }
    if groups is not None:
        meta["groups"] = {"key": _groups_key(groups), "n_groups": len(set(groups))}
    return meta


def _prepare_folder(folder: Path, meta: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    # Temporary files of writers killed mid-write: harmless, but tidy them once they are old
    # (young ones may belong to a concurrent run on the same cache).
    for tmp in folder.glob(".tmp-*"):
        try:
            if time.time() - tmp.stat().st_mtime > 3600:
                tmp.unlink()
        except OSError:
            pass
    meta_path = folder / "meta.json"
    if meta_path.exists():
        try:
            stored = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            stored = None
            warnings.warn(f"{meta_path} is unreadable; rewriting it", RuntimeWarning, stacklevel=4)
        if stored == meta:
            return
        if stored is not None:
            raise RuntimeError(
                f"{meta_path} records a different setting or config than requested "
                f"(stored {stored}, requested {meta}); delete {folder} to recompute it"
            )
    text = json.dumps(meta, indent=1, sort_keys=True).encode()
    _atomic_write(meta_path, lambda f: f.write(text))


def _read_job(path: Path, n_test: int, seed: int) -> tuple[np.ndarray, float] | None:
    """A cached job's (outputs, seconds); None if absent; raises ValueError if corrupt."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            outputs, seconds, stored_seed = f["outputs"], f["seconds"], f["seed"]
    except Exception as exc:  # zip, npy-header, key and OS errors alike
        raise ValueError(f"unreadable ({type(exc).__name__}: {exc})") from exc
    if outputs.shape != (n_test,) or outputs.dtype != np.float64:
        raise ValueError(
            f"outputs have shape {outputs.shape} and dtype {outputs.dtype}, "
            f"expected ({n_test},) float64"
        )
    if int(stored_seed) != seed:
        raise ValueError(f"trained from seed {int(stored_seed)}, expected {seed}")
    return outputs, float(seconds)


def _write_job(path: Path, outputs: np.ndarray, seconds: float, seed: int) -> None:
    arrays = {"outputs": outputs, "seconds": np.float64(seconds), "seed": np.int64(seed)}
    _atomic_write(path, lambda f: np.savez(f, **arrays))


# ------------------------------------------------------------------------ ground truth


def ground_truth(
    setting: Setting | str,
    config: LDSConfig = LDSConfig(),  # noqa: B008  (frozen, so a shared default is safe)
    cache_dir: str | os.PathLike | None = None,
    executor: str | Executor = "process",
    workers: int | None = None,
    address: str | None = None,
    progress: bool = True,
    lock_timeout: float | None = None,
    groups: Sequence[Any] | None = None,
) -> GroundTruth:
    """Retrain on ``config.n_subsets`` random subsets (cached, resumable) and collect outputs.

    ``setting``: a Setting or the name of a registered one. ``groups``: one label per
    training example (e.g. its data owner); the subsets then keep or leave out whole groups
    (:func:`subset_masks`), for a group-level LDS (:func:`lds` of example scores, or
    :func:`group_lds` of group scores). Cached in a folder of its own.

    ``executor``: an Executor, or a name for ``get_executor`` (``"inprocess"``, ``"process"``,
    ``"ray"``; ``workers`` and ``address`` go to it, and it is closed afterwards). Jobs already
    in the cache are read, not retrained; corrupt job files are reported and recomputed.
    The numbers do not depend on the executor or on interruptions.

    One run writes a cache folder at a time (a ``filelock`` lock, ``<folder>/.lock``): a
    second run on the same folder waits for it (``lock_timeout`` seconds, None: as long as
    it takes), then retrains only what is still missing; after ``lock_timeout`` it raises
    :class:`etda.features.store.StoreLockedError`.
    """
    return _collect(
        setting, config, cache_dir, executor, workers, address, progress, True, lock_timeout, groups
    )


def load_ground_truth(
    setting: Setting | str,
    config: LDSConfig = LDSConfig(),  # noqa: B008
    cache_dir: str | os.PathLike | None = None,
    groups: Sequence[Any] | None = None,
) -> GroundTruth:
    """The cached ground truth; raises FileNotFoundError if any job is missing or corrupt."""
    return _collect(setting, config, cache_dir, None, None, None, False, False, groups=groups)


def _collect(
    setting: Setting | str,
    config: LDSConfig,
    cache_dir: str | os.PathLike,
    executor: str | Executor | None,
    workers: int | None,
    address: str | None,
    progress: bool,
    compute: bool,
    lock_timeout: float | None = None,
    groups: Sequence[Any] | None = None,
) -> GroundTruth:
    if isinstance(setting, str):
        setting = get_setting(setting)
    missing = [a for a in RETRAINER if not hasattr(setting, a)]
    if missing:
        raise TypeError(
            f"setting must be a Setting, a registered setting name (e.g. 'fmnist-mlp') or an "
            f"object with {', '.join(RETRAINER)} (e.g. etda.usercode.UserSetting); "
            f"{type(setting).__name__} lacks {', '.join(missing)}"
        )
    if not isinstance(config, LDSConfig):
        raise TypeError(f"config must be an LDSConfig, got {type(config).__name__}")
    data = setting.data()
    groups = None if groups is None else list(groups)
    masks, group_masks, group_names = subset_masks(data.n_train, config, groups)
    meta = _meta(setting, config, groups)
    folder = cache_folder(setting, config, cache_dir, groups)
    S, R = config.n_subsets, config.seeds_per_subset
    if compute:
        _prepare_folder(folder, meta)
    elif not (folder / "meta.json").exists():
        raise FileNotFoundError(
            f"no LDS ground truth for setting {setting.name!r} and {config} under {folder}; "
            "compute it with ground_truth()"
        )
    outputs, seconds, todo = _scan(folder, config, data.n_test, warn=True)
    if todo and not compute:
        raise FileNotFoundError(
            f"{len(todo)} of {S * R} LDS jobs are missing or corrupt in {folder}; "
            "run ground_truth() to compute them"
        )
    if todo:
        # One writer per cache folder: a second run waits, then reads what the first wrote.
        lock = acquire_lock(folder / ".lock", lock_timeout, f"LDS cache {folder}")
        try:
            outputs, seconds, todo = _scan(folder, config, data.n_test, warn=False)
            job = _Jobs(setting, meta["fingerprint"], masks, config, folder, outputs, seconds)
            job.run(todo, executor, workers, address, progress)
        finally:
            release_lock(lock)
    return GroundTruth(
        masks=masks,
        outputs=outputs.mean(axis=1),
        config=config,
        setting=setting.name,
        fingerprint=meta["fingerprint"],
        train_seconds=float(seconds.sum()),
        job_seconds=seconds,
        path=folder,
        group_masks=group_masks,
        group_names=group_names,
        repeat_outputs=outputs,
    )


def _scan(
    folder: Path, config: LDSConfig, n_test: int, warn: bool
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Cached outputs (S, R, n_test) and seconds (S, R) (NaN where missing) and the jobs
    ``(subset, repeat)`` still to compute (missing or corrupt files)."""
    S, R = config.n_subsets, config.seeds_per_subset
    outputs = np.full((S, R, n_test), np.nan)
    seconds = np.full((S, R), np.nan)
    todo: list[tuple[int, int]] = []
    corrupt: list[str] = []
    for s in range(S):
        for r in range(R):
            path = _job_path(folder, s, r)
            try:
                cached = _read_job(path, n_test, config.retrain_seed(s, r))
            except ValueError as exc:
                corrupt.append(f"{path.name}: {exc}")
                cached = None
            if cached is None:
                todo.append((s, r))
            else:
                outputs[s, r], seconds[s, r] = cached
    if corrupt and warn:
        warnings.warn(
            f"{len(corrupt)} corrupt LDS job file(s) in {folder} will be recomputed: "
            + "; ".join(corrupt[:5]),
            RuntimeWarning,
            stacklevel=4,
        )
    return outputs, seconds, todo


@dataclass
class _Jobs:
    """Retraining jobs of one ground truth, written into its cache folder as they finish."""

    setting: Setting
    fingerprint: str
    masks: np.ndarray
    config: LDSConfig
    folder: Path
    outputs: np.ndarray  # (S, R, n_test), filled in place
    seconds: np.ndarray  # (S, R)

    def run(
        self,
        todo: list[tuple[int, int]],
        executor: str | Executor | None,
        workers: int | None,
        address: str | None,
        progress: bool,
    ) -> None:
        if not todo:
            return
        setting, config, n_test = self.setting, self.config, self.outputs.shape[2]
        # Registered settings travel by name (workers load their own data); others pickled.
        key = setting.name
        shipped = None if SETTINGS.get(key) is setting else setting
        if shipped is not None:
            key = f"{setting.name}@{self.fingerprint}"
        jobs = [
            (key, shipped, self.fingerprint, self.masks[s], config.retrain_seed(s, r))
            for s, r in todo
        ]
        owned = not isinstance(executor, Executor)
        ex = get_executor(executor, workers, address) if owned else executor  # type: ignore[arg-type]
        total = self.seconds.size
        bar = _progress(progress, total, total - len(todo), setting.name)
        try:
            for i, (out, secs) in ex.map(_retrain_job, jobs):
                s, r = todo[i]
                out = np.asarray(out, dtype=np.float64)
                if out.shape != (n_test,):
                    raise RuntimeError(
                        f"retraining job (subset {s}, repeat {r}) returned shape {out.shape}; "
                        f"expected ({n_test},)"
                    )
                _write_job(_job_path(self.folder, s, r), out, secs, config.retrain_seed(s, r))
                self.outputs[s, r], self.seconds[s, r] = out, secs
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            if owned:
                ex.close()


def _progress(enabled: bool, total: int, initial: int, name: str) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"LDS retraining {name}", unit="job")
