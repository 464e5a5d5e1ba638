"""Lesion-wise Dice and HD95 of one region, the metrics the BraTS 2023+ challenges rank by."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from monai.utils import convert_to_numpy
from scipy import ndimage

from medsegdiff_monai.metrics.segmentation import BRATS_REGIONS, _spacing_list, hd95

__all__ = ["LESION_MISS_HD95", "LESION_WISE_PARAMETERS", "lesion_wise_metrics", "lesion_wise_scores"]

LESION_MISS_HD95 = 374.0
"""HD95 (mm) of a false-positive predicted lesion and of a reference lesion that no prediction touches."""

LESION_WISE_PARAMETERS: dict[str, tuple[int, float]] = {
    "BraTS-GLI": (3, 50.0),
    "BraTS-SSA": (3, 50.0),
    "BraTS-PED": (3, 50.0),
    "BraTS-MEN": (1, 50.0),
    "BraTS-MET": (1, 2.0),
}
"""Per BraTS 2023 challenge: (dilation iterations, smallest reference lesion volume in mm^3 that is scored)."""

# connected components: 26-connectivity; dilation: the 18-connected 3D structuring element
_COMPONENT_STRUCTURE = ndimage.generate_binary_structure(3, 3)
_DILATION_STRUCTURE = ndimage.generate_binary_structure(3, 2)


def _crop_to_union(pred: np.ndarray, label: np.ndarray, margin: int) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cropped to the bounding box of their union, ``margin`` voxels wider on each side (clipped)."""
    union = pred | label
    if not union.any():
        return pred, label
    box = []
    for axis in range(union.ndim):
        present = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(max(present[0] - margin, 0), min(present[-1] + 1 + margin, union.shape[axis])))
    return pred[tuple(box)], label[tuple(box)]


def lesion_wise_scores(
    pred: np.ndarray,
    label: np.ndarray,
    spacing: Sequence[float] | float | None = None,
    dilation_iterations: int = 3,
    min_lesion_volume: float = 50.0,
) -> dict[str, float | int]:
    """
    Lesion-wise Dice and HD95 of one binary region (BraTS 2023+ rules).

    1. Lesions are the 26-connected components of the reference and of the prediction.
    2. Reference lesions whose ``dilation_iterations``-fold dilations (18-connected element) touch are merged
       into one lesion.
    3. A predicted lesion matches a reference lesion when it overlaps that lesion dilated the same way; every
       predicted lesion that matches no reference lesion is a false positive.
    4. Each reference lesion scores the Dice and HD95 (:func:`~medsegdiff_monai.metrics.hd95`, BraTS convention)
       between it and the union of its matched predicted lesions; a lesion with no match scores Dice 0 and
       HD95 :data:`LESION_MISS_HD95` (374).
    5. Reference lesions of ``min_lesion_volume`` mm^3 or less are left out.
    6. Lesion-wise Dice = sum of the lesion Dice / (scored lesions + false positives); lesion-wise HD95 =
       (sum of the lesion HD95 + 374 x false positives) / (scored lesions + false positives). With nothing to
       score (no scored lesion and no false positive) Dice = 1 and HD95 = 0.

    Args:
        pred: (X, Y, Z) binary prediction of one region.
        label: (X, Y, Z) binary reference, same shape.
        spacing: voxel size in mm per axis (or one number); ``None`` means 1 mm.
        dilation_iterations: dilation used to merge and to match lesions (3 for glioma, see
            :data:`LESION_WISE_PARAMETERS`).
        min_lesion_volume: reference lesions of at most this volume (mm^3) are not scored.

    Returns:
        ``{"dice", "hd95", "tp" (scored reference lesions with a match), "fn" (scored ones without), "fp"}``.
    """
    pred_np = convert_to_numpy(pred).astype(bool)
    label_np = convert_to_numpy(label).astype(bool)
    if pred_np.shape != label_np.shape or pred_np.ndim != 3:
        raise ValueError(f"pred and label must be 3D of the same shape, got {pred_np.shape} and {label_np.shape}.")
    spacing_list = _spacing_list(spacing, 3)
    voxel_volume = float(np.prod(spacing_list))
    # everything happens within the bounding box of both masks, widened by the dilation (identical results)
    pred_np, label_np = _crop_to_union(pred_np, label_np, margin=dilation_iterations + 1)
    pred_components, _ = ndimage.label(pred_np, structure=_COMPONENT_STRUCTURE)
    pred_sizes = np.bincount(pred_components.ravel())
    dilated = ndimage.binary_dilation(label_np, structure=_DILATION_STRUCTURE, iterations=dilation_iterations)
    merged, num_lesions = ndimage.label(dilated, structure=_COMPONENT_STRUCTURE)
    lesions = np.where(label_np, merged, 0)

    matched: set[int] = set()
    dice_sum = hd95_sum = 0.0
    tp = fn = 0
    for index, box in enumerate(ndimage.find_objects(lesions), start=1):
        if box is None:
            continue
        box = tuple(
            slice(max(b.start - dilation_iterations, 0), min(b.stop + dilation_iterations, n))
            for b, n in zip(box, lesions.shape)
        )
        lesion_box = lesions[box] == index
        region = ndimage.binary_dilation(lesion_box, structure=_DILATION_STRUCTURE, iterations=dilation_iterations)
        hits = np.unique(pred_components[box][region])
        hits = hits[hits != 0]
        matched.update(hits.tolist())
        lesion_size = np.count_nonzero(lesion_box)
        if lesion_size * voxel_volume <= min_lesion_volume:
            continue
        if hits.size == 0:
            fn += 1
            hd95_sum += LESION_MISS_HD95
            continue
        tp += 1
        lesion = lesions == index
        lesion_pred = np.isin(pred_components, hits)
        overlap = np.count_nonzero(lesion_pred & lesion)
        dice_sum += 2.0 * overlap / (int(pred_sizes[hits].sum()) + lesion_size)
        hd95_sum += hd95(lesion_pred, lesion, spacing_list)
    fp = int(pred_sizes.size - 1 - len(matched))
    count = tp + fn + fp
    if count == 0:
        return {"dice": 1.0, "hd95": 0.0, "tp": 0, "fn": 0, "fp": 0}
    return {
        "dice": dice_sum / count,
        "hd95": (hd95_sum + LESION_MISS_HD95 * fp) / count,
        "tp": tp,
        "fn": fn,
        "fp": fp,
    }


def lesion_wise_metrics(
    pred: np.ndarray,
    label: np.ndarray,
    region_names: Sequence[str] = BRATS_REGIONS,
    spacing: Sequence[float] | float | None = None,
    challenge: str = "BraTS-GLI",
) -> dict[str, float]:
    """
    :func:`lesion_wise_scores` of every region of one subject, with the parameters of a BraTS 2023 challenge.

    Args:
        pred: (C, X, Y, Z) binary prediction, one channel per region.
        label: (C, X, Y, Z) binary reference.
        region_names: name of each channel.
        spacing: voxel size in mm per axis.
        challenge: a key of :data:`LESION_WISE_PARAMETERS` (``"BraTS-GLI"``: dilation 3, lesions over 50 mm^3).

    Returns:
        ``{"lesion_dice_<region>", "lesion_hd95_<region>", "lesion_fp_<region>", ...,
        "lesion_dice_mean", "lesion_hd95_mean"}``.
    """
    if challenge not in LESION_WISE_PARAMETERS:
        raise ValueError(f"lesion-wise challenge {challenge!r}: expected one of {list(LESION_WISE_PARAMETERS)}.")
    dilation_iterations, min_lesion_volume = LESION_WISE_PARAMETERS[challenge]
    results: dict[str, float] = {}
    for channel, region in enumerate(region_names):
        scores = lesion_wise_scores(pred[channel], label[channel], spacing, dilation_iterations, min_lesion_volume)
        results[f"lesion_dice_{region}"] = float(scores["dice"])
        results[f"lesion_hd95_{region}"] = float(scores["hd95"])
        results[f"lesion_fp_{region}"] = scores["fp"]
    for name in ("dice", "hd95"):
        results[f"lesion_{name}_mean"] = math.fsum(results[f"lesion_{name}_{r}"] for r in region_names) / len(
            region_names
        )
    return results
