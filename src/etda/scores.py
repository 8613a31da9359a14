"""Scores: one container, one orientation ``(n_test, n_train)``, positive = helps."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from etda.cost import Costs


@dataclass
class Scores:
    """Attribution scores.

    ``values[t, i]`` is how much training example ``i`` helps test example ``t`` (positive:
    it lowers the test loss / raises the test margin). ``config`` records the method,
    ensemble, projection, seeds and chosen damping; ``costs`` what it took.
    """

    values: np.ndarray
    method: str
    config: dict = field(default_factory=dict)
    costs: Costs = field(default_factory=Costs)
    # Out-of-core runs: the top-k kept while scoring, arrays (n_test, k) named
    # proponents/proponent_scores/opponents/opponent_scores (indices into the training set).
    topk: dict[str, np.ndarray] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.values, np.ndarray):  # keeps disk-backed np.memmap values
            self.values = np.asarray(self.values)
        if self.values.ndim != 2:
            raise ValueError(f"scores must be (n_test, n_train), got shape {self.values.shape}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape  # type: ignore[return-value]

    def top(self, k: int = 5) -> list[dict]:
        """Per test example: the ``k`` strongest proponents and opponents.

        Returns ``[{"test": t, "proponents": [(i, score), ...], "opponents": [...]}, ...]``.
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
            raise ValueError(f"k must be an integer >= 0, got {k!r}")
        k = min(k, self.values.shape[1])
        if self.topk is not None and k <= self.topk["proponents"].shape[1]:
            tk = self.topk
            return [
                {
                    "test": t,
                    "proponents": [
                        (int(i), float(v))
                        for i, v in zip(
                            tk["proponents"][t, :k], tk["proponent_scores"][t, :k], strict=True
                        )
                    ],
                    "opponents": [
                        (int(i), float(v))
                        for i, v in zip(
                            tk["opponents"][t, :k], tk["opponent_scores"][t, :k], strict=True
                        )
                    ],
                }
                for t in range(self.values.shape[0])
            ]
        out = []
        for t in range(self.values.shape[0]):  # row by row: values may be a disk-backed map
            row = np.asarray(self.values[t])
            order = np.argsort(-row, kind="stable")
            pro, opp = order[:k], order[::-1][:k]
            out.append(
                {
                    "test": t,
                    "proponents": [(int(i), float(row[i])) for i in pro],
                    "opponents": [(int(i), float(row[i])) for i in opp],
                }
            )
        return out

    def save(self, path: str | Path) -> None:
        """Write ``values`` (safetensors) and config/costs (JSON); no pickle.

        Scores already on disk (out-of-core runs: ``values`` maps an ``.npy`` file) are not
        copied: the JSON records the file, and :meth:`load` maps it again."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {}
        values_file = getattr(self.values, "filename", None)
        if values_file is None:
            tensors["values"] = torch.from_numpy(np.ascontiguousarray(self.values))
        for name, a in (self.topk or {}).items():
            tensors[f"topk.{name}"] = torch.from_numpy(np.ascontiguousarray(a))
        if tensors:
            save_file(tensors, path / "scores.safetensors")
        meta = {"method": self.method, "config": self.config, "costs": self.costs.to_dict()}
        if values_file is not None:
            meta["values_npy"] = str(Path(values_file).resolve())
        (path / "scores.json").write_text(json.dumps(meta, indent=1, default=str))

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        """Read a folder written by :meth:`save`. Only JSON, safetensors and a pickle-free
        ``.npy`` are read, and what they hold is validated: a damaged or tampered folder
        raises :class:`ScoresFileError` (a ValueError) naming the file, and never executes
        anything."""
        path = Path(path)
        meta = _read_meta(path)
        tensors = _read_tensors(path / "scores.safetensors")
        if "values_npy" in meta:
            values = _read_npy(path, meta["values_npy"])
        elif "values" in tensors:
            values = tensors.pop("values").numpy()
        else:
            raise ScoresFileError(
                f"{path}: no scores (neither values in scores.safetensors "
                "nor values_npy in scores.json)"
            )
        if values.ndim != 2 or not np.issubdtype(values.dtype, np.floating):
            raise ScoresFileError(
                f"{path}: scores must be a 2-D float array (n_test, n_train), got shape "
                f"{values.shape} and dtype {values.dtype}"
            )
        topk = _valid_topk(path, tensors, values.shape) or None
        names = {f.name for f in fields(Costs)}
        bad = {k: v for k, v in meta["costs"].items() if k in names and not _is_number(v)}
        if bad:
            raise ScoresFileError(f"{path}: scores.json has invalid costs {bad} (numbers only)")
        costs = Costs.from_dict(meta["costs"])
        return cls(values, meta["method"], meta["config"], costs, topk)

    def __repr__(self) -> str:
        return f"Scores(method={self.method!r}, shape={self.shape}, costs=<{self.costs.summary()}>)"


class ScoresFileError(ValueError):
    """A saved Scores folder is missing a file, damaged or tampered with."""


TOPK_KEYS = ("proponents", "proponent_scores", "opponents", "opponent_scores")


def _read_meta(path: Path) -> dict:
    file = path / "scores.json"
    if not file.is_file():
        raise ScoresFileError(f"{path} is not a saved Scores folder: {file.name} is missing")
    try:
        meta = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ScoresFileError(f"{file} is unreadable ({e})") from None
    kinds = {"method": str, "config": dict, "costs": dict}
    bad = [
        k for k, t in kinds.items() if not isinstance(meta, dict) or not isinstance(meta.get(k), t)
    ]
    if bad:
        raise ScoresFileError(f"{file} lacks a valid {', '.join(bad)} (tampered or not etda's)")
    if "values_npy" in meta and not isinstance(meta["values_npy"], str):
        raise ScoresFileError(f"{file}: values_npy must be a path, got {meta['values_npy']!r}")
    return meta


def _read_tensors(file: Path) -> dict:
    if not file.exists():
        return {}
    try:
        return dict(load_file(file))
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise ScoresFileError(f"{file} is unreadable ({type(e).__name__}: {e})") from None


def _read_npy(path: Path, name: str) -> np.ndarray:
    """The out-of-core scores file a Scores folder points at: memory-mapped, never a pickle."""
    file = Path(name)
    if file.suffix != ".npy" or not file.is_file():
        raise ScoresFileError(f"{path}: the scores file {name!r} is not an existing .npy file")
    try:
        return np.load(file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ScoresFileError(f"{path}: the scores file {name} is unreadable ({e})") from None


def _valid_topk(path: Path, tensors: dict, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The top-k arrays (n_test, k) of a saved folder, checked against the scores' shape."""
    topk = {k.removeprefix("topk."): v.numpy() for k, v in tensors.items()}
    if not topk:
        return {}
    if sorted(topk) != sorted(TOPK_KEYS) or len(tensors) != len(TOPK_KEYS):
        raise ScoresFileError(
            f"{path}: scores.safetensors holds {sorted(tensors)}, expected values and "
            f"topk.{{{', '.join(TOPK_KEYS)}}}"
        )
    k = topk["proponents"].shape[-1] if topk["proponents"].ndim == 2 else -1
    for name, a in topk.items():
        if a.shape != (shape[0], k):
            raise ScoresFileError(
                f"{path}: topk.{name} has shape {a.shape}, expected "
                f"({shape[0]}, k) like topk.proponents"
            )
    for name in ("proponents", "opponents"):
        a = topk[name]
        if a.dtype.kind not in "iu" or (a.size and (a.min() < 0 or a.max() >= shape[1])):
            raise ScoresFileError(
                f"{path}: topk.{name} must hold training indices in [0, {shape[1]})"
            )
    return topk


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)
