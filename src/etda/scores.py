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

    def __post_init__(self) -> None:
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
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        k = min(k, self.values.shape[1])
        order = np.argsort(-self.values, axis=1, kind="stable")
        out = []
        for t in range(self.values.shape[0]):
            pro, opp = order[t, :k], order[t, ::-1][:k]
            out.append(
                {
                    "test": t,
                    "proponents": [(int(i), float(self.values[t, i])) for i in pro],
                    "opponents": [(int(i), float(self.values[t, i])) for i in opp],
                }
            )
        return out

    def save(self, path: str | Path) -> None:
        """Write ``values`` (safetensors) and config/costs (JSON); no pickle."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(
            {"values": torch.from_numpy(np.ascontiguousarray(self.values))},
            path / "scores.safetensors",
        )
        meta = {"method": self.method, "config": self.config, "costs": self.costs.to_dict()}
        (path / "scores.json").write_text(json.dumps(meta, indent=1, default=str))

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        path = Path(path)
        values = load_file(path / "scores.safetensors")["values"].numpy()
        meta = json.loads((path / "scores.json").read_text())
        return cls(values, meta["method"], meta["config"], Costs.from_dict(meta["costs"]))

    def __repr__(self) -> str:
        return f"Scores(method={self.method!r}, shape={self.shape}, costs=<{self.costs.summary()}>)"
