"""etda: efficient training data attribution.

>>> scores = etda.attribute(model, train=(x, y), test=(xt, yt), method="trak",
...                         ensemble=etda.Dropout(members=10))
>>> scores.values.shape   # (n_test, n_train), positive = the training example helps
"""

from etda._version import __version__
from etda.config import AttributeConfig
from etda.cost import Costs
from etda.engine import attribute, self_influence
from etda.ensemble import (
    ENSEMBLES,
    Checkpoints,
    Dropout,
    Ensemble,
    Independent,
    LoRA,
    ProjectionSeeds,
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
from etda.task import ClassificationTask, SequenceTask

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
    "Independent",
    "KernelTimesMeanQ",
    "LoRA",
    "Mean",
    "MemberContext",
    "MemberFactors",
    "Method",
    "NonFiniteError",
    "ProjectionSeeds",
    "Scores",
    "SequenceTask",
    "StaleStoreError",
    "__version__",
    "attribute",
    "get_method",
    "self_influence",
]
