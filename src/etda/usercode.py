"""The user's own code behind ``etda attribute --model pkg.module:build ...``.

A reference is ``"pkg.module:name"`` (an importable module) or ``"path/to/file.py:name"``.
Its object is used as it is (an ``nn.Module``, a task object, data), or called with no
arguments when it is a function or class (a factory): ``--model mypkg.models:build`` calls
``build()``; ``--train mypkg.data:train_data`` calls ``train_data()`` and expects ``(x, y)``,
a Dataset, a DataLoader or an iterable of batches. A factory may return a list of models
(an ensemble of trained models or checkpoints).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn


def load_object(ref: str) -> Any:
    """The object named by ``ref`` (``module:name`` or ``file.py:name``)."""
    if ":" not in ref:
        raise ValueError(f"{ref!r} is not a reference: write pkg.module:name or file.py:name")
    where, name = ref.rsplit(":", 1)
    if where.endswith(".py"):
        path = Path(where).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"no file {where} (from {ref!r})")
        spec = importlib.util.spec_from_file_location(f"etda_user_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[spec.name] = module  # type: ignore[union-attr]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    else:
        if "" not in sys.path and "." not in sys.path:
            sys.path.insert(0, "")  # the working directory, as `python -m` has it
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise ValueError(f"cannot import {where!r} (from {ref!r}): {e}") from None
    try:
        return getattr(module, name)
    except AttributeError:
        raise ValueError(f"{where} has no {name!r} (from {ref!r})") from None


def build(ref: str) -> Any:
    """The object ``ref`` names, called when it is a factory (function or class)."""
    obj = load_object(ref)
    if isinstance(obj, nn.Module) or not callable(obj):
        return obj
    return obj()


def summary(scores: Any, out: Path | None, top: int, top_k: int) -> dict:
    """A JSON-ready summary of an attribution: shapes, method, ensemble, costs, where the
    scores went, and the top proponents/opponents of the first ``top`` test examples."""
    rows = scores.top(top_k)[:top]
    return {
        "method": scores.method,
        "ensemble": scores.config["ensemble"].get("preset"),
        "n_test": int(scores.shape[0]),
        "n_train": int(scores.shape[1]),
        "members": len(scores.config["members"]),
        "task": scores.config["task"],
        "projection": scores.config["projection"],
        "costs": scores.costs.to_dict(),
        "out": str(out) if out is not None else None,
        "top": [
            {
                "test": i,
                "proponents": [[int(j), float(v)] for j, v in r["proponents"]],
                "opponents": [[int(j), float(v)] for j, v in r["opponents"]],
            }
            for i, r in enumerate(rows)
        ],
        "finite": bool(np.isfinite(np.asarray(scores.values)).all()),
    }


def dumps(summary_: dict) -> str:
    return json.dumps(summary_, indent=1)
