"""Trained models of a setting, cached on disk and reused.

Layout (one folder per setting and fingerprint, so a changed recipe or dataset never
reuses another's models)::

    <cache_dir>/<setting>-<fingerprint[:12]>/seed-<s>.safetensors          final weights
    <cache_dir>/<setting>-<fingerprint[:12]>/seed-<s>-epoch-<e>.safetensors checkpoints
    <cache_dir>/<setting>-<fingerprint[:12]>/seed-<s>.json                 metadata

The JSON is written last and records the original training seconds, the learning rate of
each checkpoint and a sha256 of every weights file. A cached model is used only if its
metadata matches the setting and seed, every file hashes to its recorded digest and loads
into the setting's architecture; anything else is reported (a ``RuntimeWarning``) and the
model is retrained. The recorded seconds are those of the original training run, so costs
stay honest when a model is reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn
from tqdm.auto import tqdm

from etda import __version__
from etda.io import bar_off
from etda.parallel import torch_threads
from etda.paths import cache_path
from etda.settings import Setting
from etda.train import load_weights, save_weights

FORMAT = 2  # bump when the layout or the meaning of a cached model changes


@dataclass
class TrainedModel:
    """A trained model of a setting, with what it took to train it.

    ``seconds``: wall time of the original training run (also when loaded from the cache);
    ``checkpoints``: state dicts at ``checkpoint_epochs`` (TracIn / checkpoint ensembles),
    ``checkpoint_lrs`` their learning-rate weights; ``cached``: loaded rather than trained.
    """

    model: nn.Module
    seconds: float
    seed: int
    path: Path
    checkpoints: list[dict[str, Tensor]] = field(default_factory=list)
    checkpoint_lrs: list[float] = field(default_factory=list)
    checkpoint_epochs: list[int] = field(default_factory=list)
    cached: bool = False


class CacheMismatch(ValueError):
    """A cached model that cannot be trusted (corrupt, stale or incomplete)."""


class _MissingCheckpoints(CacheMismatch):
    """A valid cached model without some requested checkpoints (retrained, not reported)."""


def model_folder(setting: Setting, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding ``setting``'s cached models."""
    cache_dir = cache_path("models", cache_dir)
    return Path(cache_dir) / f"{setting.name}-{setting.fingerprint()[:12]}"


def trained_models(
    setting: Setting,
    count: int,
    cache_dir: str | os.PathLike | None = None,
    first_seed: int = 0,
    checkpoint_epochs: Sequence[int] = (),
    progress: bool = True,
) -> list[TrainedModel]:
    """``count`` models of ``setting`` trained from seeds ``first_seed, first_seed + 1, ...``.

    Each is loaded from ``cache_dir`` when a valid copy is there, else trained and saved.
    ``checkpoint_epochs``: epochs (0 = initial weights, ``e`` = after epoch ``e``) whose
    weights are also returned; a cached model lacking some of them is retrained.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    if isinstance(first_seed, bool) or not isinstance(first_seed, int) or first_seed < 0:
        raise ValueError(f"first_seed must be an integer >= 0, got {first_seed!r}")
    epochs = _check_epochs(checkpoint_epochs, setting.recipe.epochs)
    folder = model_folder(setting, cache_dir)
    out: list[TrainedModel] = []
    bar = tqdm(total=count, desc=f"models {setting.name}", unit="model", disable=bar_off(progress))
    try:
        for seed in range(first_seed, first_seed + count):
            out.append(_get(setting, seed, folder, epochs))
            n_cached = sum(m.cached for m in out)
            bar.set_postfix(cached=n_cached, trained=len(out) - n_cached)
            bar.update(1)
    finally:
        bar.close()
    return out


def _check_epochs(checkpoint_epochs: Sequence[int], total: int) -> list[int]:
    epochs = sorted({int(e) for e in checkpoint_epochs})
    if epochs and (epochs[0] < 0 or epochs[-1] > total):
        raise ValueError(
            f"checkpoint_epochs={list(checkpoint_epochs)} must lie in [0, {total}] "
            "(0 = initial weights, e = after epoch e)"
        )
    return epochs


def _weights_path(folder: Path, seed: int) -> Path:
    return folder / f"seed-{seed}.safetensors"


def _checkpoint_path(folder: Path, seed: int, epoch: int) -> Path:
    return folder / f"seed-{seed}-epoch-{epoch}.safetensors"


def _meta_path(folder: Path, seed: int) -> Path:
    return folder / f"seed-{seed}.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _get(setting: Setting, seed: int, folder: Path, epochs: list[int]) -> TrainedModel:
    meta_path = _meta_path(folder, seed)
    known: list[int] = []
    if meta_path.exists() or _weights_path(folder, seed).exists():
        try:
            return _load(setting, seed, folder, epochs)
        except CacheMismatch as exc:
            if not isinstance(exc, _MissingCheckpoints):
                warnings.warn(
                    f"cached model {setting.name} seed {seed} in {folder} is not usable "
                    f"({exc}); retraining it",
                    RuntimeWarning,
                    stacklevel=3,
                )
            known = _recorded_epochs(meta_path)
    # Retrain with every checkpoint recorded before as well, so the files stay consistent.
    return _train_and_save(setting, seed, folder, sorted(set(epochs) | set(known)), epochs)


def _recorded_epochs(meta_path: Path) -> list[int]:
    try:
        meta = json.loads(meta_path.read_text())
        return [int(c["epoch"]) for c in meta.get("checkpoints", [])]
    except (OSError, ValueError, TypeError, KeyError):
        return []


def _load(setting: Setting, seed: int, folder: Path, epochs: list[int]) -> TrainedModel:
    meta_path, weights = _meta_path(folder, seed), _weights_path(folder, seed)
    if not meta_path.exists():
        raise CacheMismatch(f"{weights.name} has no metadata file {meta_path.name}")
    try:
        meta = json.loads(meta_path.read_text())
        ckpts = {int(c["epoch"]): c for c in meta["checkpoints"]}
        seconds = float(meta["seconds"])
        digest = meta["weights_sha256"]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CacheMismatch(f"unreadable metadata {meta_path.name}: {exc}") from exc
    expected = {
        "format": FORMAT,
        "setting": setting.name,
        "fingerprint": setting.fingerprint(),
        "seed": seed,
    }
    stale = {k: meta.get(k) for k, v in expected.items() if meta.get(k) != v}
    if stale:
        raise CacheMismatch(f"metadata records {stale}, expected {expected}")
    missing = [e for e in epochs if e not in ckpts]
    if missing:
        raise _MissingCheckpoints(f"missing checkpoint epochs {missing}")
    model = _load_file(setting, seed, weights, digest)
    states, lrs = [], []
    for e in epochs:
        c = ckpts[e]
        path = folder / c["file"]
        states.append(_load_file(setting, seed, path, c["sha256"]).state_dict())
        lrs.append(float(c["lr"]))
    return TrainedModel(model, seconds, seed, weights, states, lrs, list(epochs), cached=True)


def _load_file(setting: Setting, seed: int, path: Path, digest: str) -> nn.Module:
    if not path.is_file():
        raise CacheMismatch(f"{path.name} is missing")
    actual = _sha256(path)
    if actual != digest:
        raise CacheMismatch(
            f"{path.name} is corrupt (sha256 {actual[:12]}, recorded {str(digest)[:12]})"
        )
    try:
        model = load_weights(setting.make_model(seed), path)
    except Exception as exc:  # safetensors header errors, key/shape mismatches alike
        raise CacheMismatch(f"{path.name} does not load: {exc}") from exc
    return model.eval()


def _train_and_save(
    setting: Setting, seed: int, folder: Path, train_epochs: list[int], epochs: list[int]
) -> TrainedModel:
    # One thread, like the LDS retraining jobs: a seed then gives bitwise identical weights
    # whatever thread count the caller uses (matmul summation order depends on threads).
    with torch_threads(1):
        result = setting.train(seed, checkpoint_epochs=train_epochs)
    folder.mkdir(parents=True, exist_ok=True)
    weights = _weights_path(folder, seed)
    save_weights(result.model, weights)
    ckpt_meta = []
    for e, state, lr in zip(train_epochs, result.checkpoints, result.checkpoint_lrs, strict=True):
        path = _checkpoint_path(folder, seed, e)
        save_weights(state, path)
        ckpt_meta.append({"epoch": e, "lr": lr, "file": path.name, "sha256": _sha256(path)})
    meta = {
        "format": FORMAT,
        "setting": setting.name,
        "fingerprint": setting.fingerprint(),
        "seed": seed,
        "seconds": result.seconds,
        "recipe": setting.recipe.to_dict(),
        "weights_sha256": _sha256(weights),
        "checkpoints": ckpt_meta,
        "etda_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _atomic_write_text(_meta_path(folder, seed), json.dumps(meta, indent=1))
    keep = [train_epochs.index(e) for e in epochs]
    return TrainedModel(
        result.model.eval(),
        float(result.seconds),
        seed,
        weights,
        [result.checkpoints[i] for i in keep],
        [result.checkpoint_lrs[i] for i in keep],
        list(epochs),
        cached=False,
    )


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
