"""Evaluation: label-free collapse monitors (and, later, the fine-tuning protocol)."""

from keras_ssrl.evaluation.collapse import (
    collapse_metrics,
    collapsed_dimensions,
    covariance_spectrum,
    effective_rank,
    embedding_std,
)

__all__ = [
    "collapse_metrics",
    "collapsed_dimensions",
    "covariance_spectrum",
    "effective_rank",
    "embedding_std",
]
