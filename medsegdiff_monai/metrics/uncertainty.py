"""Does the uncertainty map point at the errors? Voxel error-detection AUROC and subject-level rank correlation.

The uncertainty map is the per-voxel standard deviation of the diffusion ensemble's probabilities (see
:class:`~medsegdiff_monai.workflows.BratsVolumeInferer`); these functions measure whether it is high where the label
map is wrong (:func:`voxel_error_auroc`) and whether subjects with a high mean uncertainty are the badly segmented
ones (:func:`spearman_correlation` of :func:`mean_uncertainty` with Dice).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

__all__ = [
    "mean_uncertainty",
    "spearman_correlation",
    "tumour_neighbourhood",
    "voxel_error_auroc",
    "wrong_voxels",
]


def voxel_error_auroc(uncertainty: np.ndarray, wrong: np.ndarray) -> float:
    """
    AUROC of the uncertainty as a detector of wrong voxels (scikit-learn's ``roc_auc_score``; ties count one half).

    0.5 is chance; 1.0 means every wrong voxel is more uncertain than every right one.

    Args:
        uncertainty: (N,) or any shape, the voxels' uncertainty.
        wrong: same shape, bool: the voxel's predicted label differs from the truth.

    Returns:
        the AUROC, NaN when every voxel is right or every voxel is wrong.
    """
    scores = np.asarray(uncertainty, dtype=np.float64).reshape(-1)
    positive = np.asarray(wrong, dtype=bool).reshape(-1)
    if scores.shape != positive.shape:
        raise ValueError(f"uncertainty and wrong must have the same size, got {scores.size} and {positive.size}.")
    if positive.all() or not positive.any():
        return math.nan
    return float(roc_auc_score(positive, scores))


def wrong_voxels(prediction: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(X, Y, Z) bool: the predicted BraTS label (0/1/2/4) differs from the true one (so at least one of TC, WT,
    ET is wrong there: the labels and the nested regions determine each other)."""
    prediction, target = np.asarray(prediction), np.asarray(target)
    if prediction.shape != target.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from target shape {target.shape}.")
    return prediction != target


def tumour_neighbourhood(labels: Sequence[np.ndarray] | np.ndarray, margin: int = 3) -> np.ndarray:
    """
    The union of the tumours of one or more label maps, dilated by ``margin`` voxels (a cube of side
    ``2 * margin + 1``): the region where segmentation errors can happen, without the far healthy brain.

    Args:
        labels: one (X, Y, Z) label map or a sequence of them (e.g. prediction and truth); tumour is label > 0.
        margin: dilation in voxels, >= 0.

    Returns:
        (X, Y, Z) bool mask.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}.")
    maps = [np.asarray(labels)] if isinstance(labels, np.ndarray) else [np.asarray(m) for m in labels]
    union = np.logical_or.reduce([m > 0 for m in maps])
    if margin == 0:
        return union
    tumour = torch.from_numpy(union[None, None].astype(np.float32))
    dilated = F.max_pool3d(tumour, kernel_size=2 * margin + 1, stride=1, padding=margin)
    return dilated[0, 0].numpy() > 0


def mean_uncertainty(uncertainty: np.ndarray, prediction: np.ndarray, margin: int = 3) -> float:
    """
    A subject's mean uncertainty over its predicted tumour dilated by ``margin`` voxels (no ground truth needed,
    so it can flag subjects at inference time).

    Args:
        uncertainty: (X, Y, Z) uncertainty map.
        prediction: (X, Y, Z) predicted BraTS labels.
        margin: dilation of the predicted tumour in voxels.

    Returns:
        the mean, NaN when nothing is predicted.
    """
    region = tumour_neighbourhood(prediction, margin)
    if not region.any():
        return math.nan
    return float(np.asarray(uncertainty, dtype=np.float64)[region].mean())


def spearman_correlation(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation of two equally long sequences (pandas, midranks for ties; pairs with a NaN are
    left out); NaN with fewer than 3 pairs or a constant sequence."""
    x, y = np.asarray(x, dtype=np.float64).reshape(-1), np.asarray(y, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length, got {x.size} and {y.size}.")
    pairs = pd.DataFrame({"x": x, "y": y}).dropna()
    if len(pairs) < 3 or pairs["x"].nunique() < 2 or pairs["y"].nunique() < 2:
        return math.nan
    return float(pairs["x"].corr(pairs["y"], method="spearman"))
