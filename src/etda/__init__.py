"""etda: efficient training data attribution.

>>> scores = etda.attribute(model, train=(x, y), test=(xt, yt), method="trak",
...                         ensemble=etda.Dropout(members=10))
>>> scores.values.shape   # (n_test, n_train), positive = the training example helps
"""

__version__ = "0.1.0"

from etda.attribute import attribute  # noqa: E402
from etda.cost import Costs  # noqa: E402
from etda.ensemble import (  # noqa: E402
    Checkpoints,
    Dropout,
    Ensemble,
    Independent,
    LoRA,
    ProjectionSeeds,
)
from etda.features.featurize import FeatureSpec, NonFiniteError  # noqa: E402
from etda.features.store import CorruptStoreError, FeatureStore, StaleStoreError  # noqa: E402
from etda.methods import METHODS, get_method  # noqa: E402
from etda.scores import Scores  # noqa: E402
from etda.task import ClassificationTask, SequenceTask  # noqa: E402

__all__ = [
    "METHODS",
    "Checkpoints",
    "ClassificationTask",
    "CorruptStoreError",
    "Costs",
    "Dropout",
    "Ensemble",
    "FeatureSpec",
    "FeatureStore",
    "Independent",
    "LoRA",
    "NonFiniteError",
    "ProjectionSeeds",
    "Scores",
    "SequenceTask",
    "StaleStoreError",
    "attribute",
    "get_method",
]
