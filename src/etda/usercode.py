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


class UserSetting:
    """The user's model and data as an LDS setting: ``train_fn(x, y, seed) -> model`` trains
    a fresh model on the given examples (a subset of the training set), and the attributed
    output is the task's on the test set. What ``etda.evaluate.lds.ground_truth`` retrains
    (in process: the functions need not be importable by workers)."""

    def __init__(self, name: str, train_fn: Any, train: Any, test: Any, task: Any = None):
        from etda.sources import as_tensors
        from etda.task import default_task

        self.name, self.train_fn = name, train_fn
        self.x_train, self.y_train = as_tensors(train, "train")
        self.x_test, self.y_test = as_tensors(test, "test")
        self.task = task or default_task(self.y_train)

    def data(self) -> Any:
        from types import SimpleNamespace

        from etda.batch import n_rows

        return SimpleNamespace(
            x_train=self.x_train,
            y_train=self.y_train,
            x_test=self.x_test,
            y_test=self.y_test,
            n_train=n_rows(self.x_train),
            n_test=n_rows(self.x_test),
        )

    def fingerprint(self) -> str:
        from etda.features.service import fingerprint

        fn = getattr(self.train_fn, "__qualname__", repr(self.train_fn))
        return fingerprint(self.x_train, self.y_train, self.x_test, self.y_test) + f"-{fn}"

    def train(self, seed: int, subset: Any = None) -> Any:
        import time
        from types import SimpleNamespace

        import torch

        from etda import batch

        keep = torch.as_tensor(np.flatnonzero(subset)) if subset is not None else None
        x = self.x_train if keep is None else batch.select(self.x_train, keep)
        y = self.y_train if keep is None else self.y_train[keep]
        t0 = time.perf_counter()
        model = self.train_fn(x, y, seed)
        return SimpleNamespace(model=model, seconds=time.perf_counter() - t0)

    def output(self, model: nn.Module, x: Any, y: Any, batch_size: int = 1000) -> Any:
        import torch

        from etda import batch

        model.eval()
        outs = []
        p = next(model.parameters())
        with torch.no_grad():
            for lo in range(0, batch.n_rows(x), batch_size):
                xb = batch.cast(batch.take(x, lo, lo + batch_size), p.dtype, p.device)
                out = batch.run_model(model, xb, self.task)
                outs.append(self.task.output(out, y[lo : lo + batch_size].to(p.device)).cpu())
        return torch.cat(outs).double()
