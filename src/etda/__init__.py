"""etda: efficient training data attribution.

>>> scores = etda.attribute(model, train=(x, y), test=(xt, yt), method="trak",
...                         ensemble=etda.Dropout(members=10))
>>> scores.values.shape   # (n_test, n_train), positive = the training example helps
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from etda._version import __version__

# Public names and the modules that define them, imported on first use: `import etda` (and
# `etda --version`) stays cheap, and torch loads only when something needs it.
_EXPORTS = {
    "AttributeConfig": "etda.config",
    "Checkpoints": "etda.ensemble",
    "ClassificationTask": "etda.task",
    "CorruptStoreError": "etda.features.store",
    "Costs": "etda.cost",
    "Diagonal": "etda.methods",
    "Dropout": "etda.ensemble",
    "ENSEMBLES": "etda.ensemble",
    "Ensemble": "etda.ensemble",
    "FeatureSpec": "etda.features.featurize",
    "FeatureStore": "etda.features.store",
    "Forks": "etda.ensemble",
    "FunctionTask": "etda.task",
    "Independent": "etda.ensemble",
    "KernelTimesMeanQ": "etda.methods",
    "LoRA": "etda.ensemble",
    "METHODS": "etda.methods",
    "Mean": "etda.methods",
    "MemberContext": "etda.methods",
    "MemberFactors": "etda.methods",
    "Method": "etda.methods",
    "NonFiniteError": "etda.features.featurize",
    "ProjectionSeeds": "etda.ensemble",
    "RegressionTask": "etda.task",
    "Scores": "etda.scores",
    "SequenceTask": "etda.task",
    "Snapshots": "etda.ensemble",
    "StaleStoreError": "etda.features.store",
    "Task": "etda.task",
    "attribute": "etda.engine",
    "get_method": "etda.methods",
    "make_task": "etda.task",
    "self_influence": "etda.engine",
}

if TYPE_CHECKING:
    from etda.config import AttributeConfig
    from etda.cost import Costs
    from etda.engine import attribute, self_influence
    from etda.ensemble import (
        ENSEMBLES,
        Checkpoints,
        Dropout,
        Ensemble,
        Forks,
        Independent,
        LoRA,
        ProjectionSeeds,
        Snapshots,
    )
    from etda.features.featurize import FeatureSpec, NonFiniteError
    from etda.features.store import CorruptStoreError, FeatureStore, StaleStoreError
    from etda.methods import (
        METHODS,
        Diagonal,
        KernelTimesMeanQ,
        Mean,
        MemberContext,
        MemberFactors,
        Method,
        get_method,
    )
    from etda.scores import Scores
    from etda.task import (
        ClassificationTask,
        FunctionTask,
        RegressionTask,
        SequenceTask,
        Task,
        make_task,
    )


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        try:
            value = importlib.import_module(f"etda.{name}")  # a submodule, e.g. etda.ensemble
        except ModuleNotFoundError:
            raise AttributeError(f"module 'etda' has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "ENSEMBLES",
    "METHODS",
    "AttributeConfig",
    "Checkpoints",
    "ClassificationTask",
    "CorruptStoreError",
    "Costs",
    "Diagonal",
    "Dropout",
    "Ensemble",
    "FeatureSpec",
    "FeatureStore",
    "Forks",
    "FunctionTask",
    "Independent",
    "KernelTimesMeanQ",
    "LoRA",
    "Mean",
    "MemberContext",
    "MemberFactors",
    "Method",
    "NonFiniteError",
    "ProjectionSeeds",
    "RegressionTask",
    "Scores",
    "SequenceTask",
    "Snapshots",
    "StaleStoreError",
    "Task",
    "__version__",
    "attribute",
    "get_method",
    "make_task",
    "self_influence",
]
