"""Evaluation: the linear datamodeling score (LDS) with cached retraining ground truth."""

from etda.evaluate.lds import (
    GroundTruth,
    LDSConfig,
    LDSResult,
    ground_truth,
    lds,
    load_ground_truth,
    spearman_rows,
)

__all__ = [
    "GroundTruth",
    "LDSConfig",
    "LDSResult",
    "ground_truth",
    "lds",
    "load_ground_truth",
    "spearman_rows",
]
