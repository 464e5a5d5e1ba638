"""Subject-level metrics of the LGG (0) / HGG (1) grade from p(HGG)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score

from medsegdiff_monai.metrics.calibration import _as_pair, brier_score, reliability_bins

__all__ = ["expected_calibration_error", "grade_metrics"]


def expected_calibration_error(
    p_positive: Sequence[float] | np.ndarray, target: Sequence[int] | np.ndarray, num_bins: int = 10
) -> float:
    """
    Expected calibration error of a binary probability (reliability-diagram form).

    ``[0, 1]`` is split into ``num_bins`` equal bins (the last one closed, see
    :func:`~medsegdiff_monai.metrics.reliability_bins`); for each non-empty bin ``b`` with ``n_b`` subjects,
    ``|mean(target in b) - mean(p in b)|`` is weighted by ``n_b / N``.

    Args:
        p_positive: (N,) predicted probability of class 1.
        target: (N,) true class, 0 or 1.
        num_bins: number of equal-width bins.

    Returns:
        ECE in [0, 1]; NaN for an empty input.
    """
    bins = reliability_bins(p_positive, target, num_bins)
    total = sum(bins["count"])
    if total == 0:
        return math.nan
    return float(
        sum(
            n / total * abs(observed - predicted)
            for n, observed, predicted in zip(bins["count"], bins["observed"], bins["mean_predicted"])
            if n
        )
    )


def grade_metrics(
    p_hgg: Sequence[float] | np.ndarray, grade: Sequence[int] | np.ndarray, threshold: float = 0.5, num_bins: int = 10
) -> dict[str, float | list[list[int]] | int]:
    """
    AUC, F1 (HGG positive), accuracy, ECE, Brier score and confusion matrix of subject-level grades.

    An undefined figure never raises: AUC is NaN when only one grade is present, F1 is NaN when neither labels nor
    predictions contain HGG, and every figure is NaN for an empty input; each NaN comes with a ``warnings.warn``.

    Args:
        p_hgg: (N,) subject-level probability of HGG.
        grade: (N,) true grade, 0 = LGG, 1 = HGG.
        threshold: p(HGG) at or above which a subject is predicted HGG.
        num_bins: bins of the expected calibration error.

    Returns:
        ``{"auc", "f1", "accuracy", "ece", "brier", "confusion_matrix" ([[TN, FP], [FN, TP]], rows = true LGG,
        HGG), "num_subjects"}``.
    """
    p, y = _as_pair(p_hgg, grade, ("p_hgg", "grade"))  # raises on NaN, p outside [0, 1], a grade other than 0 / 1
    if p.size == 0:
        warnings.warn("grade_metrics: no subject, every figure is NaN.", stacklevel=2)
        nan = math.nan
        return {
            "auc": nan,
            "f1": nan,
            "accuracy": nan,
            "ece": nan,
            "brier": nan,
            "confusion_matrix": [[0, 0], [0, 0]],
            "num_subjects": 0,
        }
    predicted = (p >= threshold).astype(int)
    if np.unique(y).size < 2:
        warnings.warn(f"grade_metrics: only grade {int(y[0])} present in {y.size} subjects, AUC is NaN.", stacklevel=2)
        auc = math.nan
    else:
        auc = float(roc_auc_score(y, p))
    if not (y.any() or predicted.any()):
        warnings.warn("grade_metrics: no HGG in labels or predictions, F1 is NaN.", stacklevel=2)
        f1 = math.nan
    else:
        f1 = float(f1_score(y, predicted, pos_label=1, zero_division=0.0))
    return {
        "auc": auc,
        "f1": f1,
        "accuracy": float(accuracy_score(y, predicted)),
        "ece": expected_calibration_error(p, y, num_bins),
        "brier": brier_score(p, y),
        "confusion_matrix": confusion_matrix(y, predicted, labels=[0, 1]).tolist(),
        "num_subjects": int(y.size),
    }
