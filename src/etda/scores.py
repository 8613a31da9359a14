"""Scores: one container, one orientation ``(n_test, n_train)``, positive = helps."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
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
        path = Path(path)
        meta = json.loads((path / "scores.json").read_text())
        file = path / "scores.safetensors"
        tensors = load_file(file) if file.exists() else {}
        if "values_npy" in meta:
            values = np.load(meta["values_npy"], mmap_mode="r", allow_pickle=False)
        else:
            values = tensors.pop("values").numpy()
        topk = {k.removeprefix("topk."): v.numpy() for k, v in tensors.items()} or None
        costs = Costs.from_dict(meta["costs"])
        return cls(values, meta["method"], meta["config"], costs, topk)

    def __repr__(self) -> str:
        return f"Scores(method={self.method!r}, shape={self.shape}, costs=<{self.costs.summary()}>)"
