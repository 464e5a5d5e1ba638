"""Does the uncertainty map point at the errors? Voxel error-detection AUROC, subject-level rank correlation and
the QU-BraTS uncertainty score.

The uncertainty map is the per-voxel standard deviation of the diffusion ensemble's probabilities (see
:class:`~medsegdiff_monai.workflows.BratsVolumeInferer`); these functions measure whether it is high where the label
map is wrong (:func:`voxel_error_auroc`), whether subjects with a high mean uncertainty are the badly segmented
ones (:func:`spearman_correlation` of :func:`mean_uncertainty` with Dice), and how the per-region maps score in the
BraTS uncertainty challenge (:func:`qu_brats_scores`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import auc, roc_auc_score

__all__ = [
    "QU_BRATS_MAP_KINDS",
    "QU_BRATS_MAX",
    "QU_BRATS_REGION_NAMES",
    "mean_uncertainty",
    "qu_brats_map",
    "qu_brats_near_miss_map",
    "qu_brats_region_map",
    "qu_brats_scores",
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


QU_BRATS_MAX = 100
"""The most uncertain value of a QU-BraTS uncertainty map (0: certain)."""

QU_BRATS_REGION_NAMES = {"TC": "core", "WT": "whole", "ET": "enhance"}
"""The QU-BraTS name of each BraTS region, as in its files (``<subject_id>_unc_whole.nii.gz`` ...)."""


QU_BRATS_MAP_KINDS = ("near_miss", "ensemble_std")
"""How a region's QU-BraTS uncertainty map is made (:func:`qu_brats_region_map`), the default first."""


def _on_qu_brats_scale(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (1: most uncertain) as a QU-BraTS map: ``round(100 * value)`` as uint8, clipped to 0-100."""
    return np.clip(np.rint(values * QU_BRATS_MAX), 0, QU_BRATS_MAX).astype(np.uint8)


def qu_brats_map(std: np.ndarray) -> np.ndarray:
    """
    A region's ensemble standard deviation as a QU-BraTS uncertainty map: ``round(200 * std)`` as uint8, 0 where
    every member agrees and :data:`QU_BRATS_MAX` at the largest spread of probabilities in [0, 1] (std 0.5: half
    the members at 0, half at 1).

    Args:
        std: (X, Y, Z) population std of the members' probabilities of one region.
    """
    return _on_qu_brats_scale(np.asarray(std, dtype=np.float64) * 2)


def qu_brats_near_miss_map(probability: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """
    A region's QU-BraTS uncertainty map that flags the voxels left out of the predicted region by a narrow margin:
    ``round(100 * (1 - |2p - 1|))`` as uint8 outside the predicted region, ``p`` being the ensemble's mean
    probability of the region (:data:`QU_BRATS_MAX` at ``p`` 0.5, 0 at ``p`` 0 or 1), and 0 inside it.

    The challenge's score charges each filtered true positive against the few voxels of the predicted region and
    each filtered true negative against the whole brain, so flagging the voxels a segmentation may have missed
    costs little, while flagging its own border costs much (see ``docs/quality.md`` for the measured choice).

    Args:
        probability: (X, Y, Z) the ensemble's mean probability of one region, in [0, 1].
        predicted: (X, Y, Z) bool, the predicted region.
    """
    margin = 1 - np.abs(2 * np.asarray(probability, dtype=np.float64) - 1)
    return _on_qu_brats_scale(np.where(np.asarray(predicted, dtype=bool), 0.0, margin))


def qu_brats_region_map(kind: str, probability: np.ndarray, std: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """
    A region's QU-BraTS uncertainty map of the given kind: ``"near_miss"`` (:func:`qu_brats_near_miss_map`) or
    ``"ensemble_std"`` (:func:`qu_brats_map`).

    Args:
        kind: one of :data:`QU_BRATS_MAP_KINDS`.
        probability: (X, Y, Z) the ensemble's mean probability of the region.
        std: (X, Y, Z) the population std of the members' probabilities of the region.
        predicted: (X, Y, Z) bool, the predicted region.
    """
    if kind == "near_miss":
        return qu_brats_near_miss_map(probability, predicted)
    if kind == "ensemble_std":
        return qu_brats_map(std)
    raise ValueError(f"QU-BraTS map kind must be one of {list(QU_BRATS_MAP_KINDS)}, got {kind!r}.")


def qu_brats_scores(
    prediction: np.ndarray,
    truth: np.ndarray,
    uncertainty: np.ndarray,
    brain: np.ndarray,
    num_points: int = 40,
) -> dict[str, float]:
    """
    The QU-BraTS uncertainty figures of one region of one subject (Mehta et al., "QU-BraTS: MICCAI BraTS 2020
    Challenge on Quantifying Uncertainty in Brain Tumor Segmentation", MELBA 2022).

    Voxels whose uncertainty exceeds a threshold are filtered out, for ``num_points + 1`` thresholds from 100 down
    to 0 in equal steps. At each threshold the Dice of the remaining voxels is computed (1 when both prediction and
    truth are empty there), and the ratios of the true positives and true negatives within the brain that were
    filtered out (FTP, FTN: a good map filters out errors, not correct voxels). Each curve's area over the thresholds,
    divided by 100, is an AUC; the score is ``(dice_auc + (1 - ftp_auc) + (1 - ftn_auc)) / 3``, higher is better.

    Args:
        prediction: (X, Y, Z) bool, the predicted region (e.g. the whole tumour).
        truth: (X, Y, Z) bool, the true region.
        uncertainty: (X, Y, Z) the region's uncertainty map, 0 (certain) to :data:`QU_BRATS_MAX`.
        brain: (X, Y, Z) bool brain mask (the challenge uses the T1 image's non-zero voxels).
        num_points: threshold steps between 100 and 0 (the challenge's default 40).

    Returns:
        ``{"dice_auc", "ftp_auc", "ftn_auc", "score"}``.
    """
    prediction, truth, brain = (np.asarray(x, dtype=bool) for x in (prediction, truth, brain))
    uncertainty = np.asarray(uncertainty, dtype=np.float64)
    if not prediction.shape == truth.shape == uncertainty.shape == brain.shape:
        raise ValueError(
            f"prediction, truth, uncertainty and brain must have one shape, got {prediction.shape}, {truth.shape}, "
            f"{uncertainty.shape} and {brain.shape}."
        )
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}.")
    if np.isnan(uncertainty).any() or uncertainty.min(initial=0) < 0 or uncertainty.max(initial=0) > QU_BRATS_MAX:
        raise ValueError(f"uncertainty values must lie in [0, {QU_BRATS_MAX}] (QU-BraTS maps), without NaN.")
    thresholds = np.linspace(0.0, QU_BRATS_MAX, num_points + 1)

    def kept(voxels: np.ndarray) -> np.ndarray:
        """(num_points + 1,) how many of ``voxels`` have an uncertainty <= each threshold (are kept)."""
        return np.searchsorted(np.sort(uncertainty[voxels]), thresholds, side="right").astype(np.float64)

    overlap, predicted, true = kept(prediction & truth), kept(prediction), kept(truth)
    sizes = predicted + true
    dice = np.where(sizes > 0, 2 * overlap / np.maximum(sizes, 1), 1.0)
    eps = float(np.finfo(np.float32).eps)
    filtered = {}
    for name, voxels in (("ftp", prediction & truth & brain), ("ftn", ~prediction & ~truth & brain)):
        total = float(voxels.sum())
        filtered[name] = (total - kept(voxels)) / (total + eps)
    figures = {"dice_auc": dice, "ftp_auc": filtered["ftp"], "ftn_auc": filtered["ftn"]}
    scores = {name: float(auc(thresholds, curve) / QU_BRATS_MAX) for name, curve in figures.items()}
    scores["score"] = (scores["dice_auc"] + (1 - scores["ftp_auc"]) + (1 - scores["ftn_auc"])) / 3
    return scores
