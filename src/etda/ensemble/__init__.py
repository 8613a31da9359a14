"""Ensembles: how members are made (independent, checkpoints, projection seeds, dropout, LoRA)."""

from etda.ensemble.base import (
    BuildContext,
    Checkpoints,
    Ensemble,
    Independent,
    Member,
    ProjectionSeeds,
)
from etda.ensemble.dropout import Dropout, MaskedDropout, set_example_index
from etda.ensemble.lora import LoRA

__all__ = [
    "BuildContext",
    "Checkpoints",
    "Dropout",
    "Ensemble",
    "Independent",
    "LoRA",
    "MaskedDropout",
    "Member",
    "ProjectionSeeds",
    "set_example_index",
]
