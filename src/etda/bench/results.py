"""``results.json`` of a benchmark folder: read by reports and the planner, written by the
runner (atomically: a reader never sees half a file)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from etda.io import atomic_write


def load_results(path: str | os.PathLike) -> dict:
    """``results.json`` from a results folder (or the file itself)."""
    path = Path(path)
    path = path / "results.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no results.json at {path}; run `etda bench` first")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(
            f"{path} is not valid JSON ({exc}); delete it or rerun with --force"
        ) from exc


def save_results(results: dict, out: Path) -> None:
    atomic_write(Path(out) / "results.json", json.dumps(results, indent=1, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
