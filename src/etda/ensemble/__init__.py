"""Ensembles: how members are made (independent, checkpoints, projection seeds, dropout, LoRA,
snapshots and forks of one run);
each class registers its presets in ``ENSEMBLES`` when its module is imported."""

# isort: off  (import order is registration order: how the CLI and reports list them)
from etda.ensemble.base import (
    ENSEMBLES,
    BuildContext,
    Checkpoints,
    Ensemble,
    Independent,
    Member,
    Preset,
    ProjectionSeeds,
    make_ensemble,
)
from etda.ensemble.dropout import Dropout, MaskedDropout
from etda.ensemble.lora import LoRA
from etda.ensemble.trajectory import Forks, Snapshots

# isort: on

__all__ = [
    "ENSEMBLES",
    "BuildContext",
    "Checkpoints",
    "Dropout",
    "Ensemble",
    "Forks",
    "Independent",
    "LoRA",
    "MaskedDropout",
    "Member",
    "Preset",
    "ProjectionSeeds",
    "Snapshots",
    "make_ensemble",
]
