"""Evaluation: LDS with cached retraining ground truth, mislabel detection, variance theory."""

from etda.evaluate.lds import (
    GroundTruth,
    LDSConfig,
    LDSResult,
    NoiseCeiling,
    ground_truth,
    group_lds,
    lds,
    load_ground_truth,
    noise_ceiling,
    spearman_rows,
)
from etda.evaluate.mislabel import (
    detection_report,
    flip_labels,
    roc_auc,
    run_mislabel,
    self_influence,
    training_loss,
)
from etda.evaluate.variance import (
    VarianceAccumulator,
    VarianceStats,
    ensemble_variance,
    fit_variance,
    measure,
    member_projections,
    predict,
)

__all__ = [
    "GroundTruth",
    "LDSConfig",
    "LDSResult",
    "NoiseCeiling",
    "VarianceAccumulator",
    "VarianceStats",
    "detection_report",
    "ensemble_variance",
    "fit_variance",
    "flip_labels",
    "ground_truth",
    "group_lds",
    "lds",
    "load_ground_truth",
    "measure",
    "noise_ceiling",
    "member_projections",
    "predict",
    "roc_auc",
    "run_mislabel",
    "self_influence",
    "spearman_rows",
    "training_loss",
]
