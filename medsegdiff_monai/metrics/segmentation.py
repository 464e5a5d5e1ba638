"""Per-subject overlap and surface metrics of the BraTS regions (TC, WT, ET), in the BraTS conventions."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou
from monai.metrics.utils import get_mask_edges, get_surface_distance
from monai.utils import convert_to_numpy, convert_to_tensor
from torch import Tensor

__all__ = ["BRATS_EMPTY_HD95", "BRATS_REGIONS", "HD95_CONVENTIONS", "hd95", "segmentation_metrics"]

BRATS_REGIONS = ("TC", "WT", "ET")

BRATS_EMPTY_HD95 = 373.13
"""HD95 (mm) of the BraTS 2018-2022 evaluation when exactly one of prediction and reference is empty (the diagonal
of the 240 x 240 x 155 BraTS grid at 1 mm, used whatever the grid)."""

HD95_CONVENTIONS = ("brats", "monai")
"""``"brats"``: 95th percentile of both directed surface-distance sets pooled, 373.13 mm when one mask is empty
(the BraTS 2018-2022 evaluation, medpy's ``hd95``). ``"monai"``: the larger of the two directed 95th percentiles
(MONAI's ``compute_hausdorff_distance``), the volume's diagonal when one mask is empty (MONAI itself: NaN)."""


def _spacing_list(spacing: Sequence[float] | float | None, ndim: int) -> list[float]:
    if spacing is None:
        return [1.0] * ndim
    if isinstance(spacing, (int, float)):
        return [float(spacing)] * ndim
    values = [float(s) for s in spacing]
    if len(values) != ndim:
        raise ValueError(f"spacing {values} must give one voxel size per spatial axis ({ndim}).")
    return values


def hd95(
    pred: Tensor | np.ndarray,
    label: Tensor | np.ndarray,
    spacing: Sequence[float] | float | None = None,
    convention: str = "brats",
) -> float:
    """
    95th-percentile Hausdorff distance between two binary masks of one region, in ``spacing`` units.

    Surfaces are the mask voxels with a background neighbour (6-connectivity, MONAI ``get_mask_edges``); the
    directed distances go from every surface voxel of one mask to the nearest surface voxel of the other
    (MONAI ``get_surface_distance``, Euclidean with anisotropic ``spacing``).

    - ``convention="brats"``: the 95th percentile (linear interpolation, ``numpy.percentile``) of both directed
      sets pooled; both masks empty -> 0; exactly one empty -> :data:`BRATS_EMPTY_HD95` (373.13).
    - ``convention="monai"``: the larger of the two directed 95th percentiles; both empty -> 0; exactly one
      empty -> the diagonal of the volume in ``spacing`` units.

    Args:
        pred: (*spatial) binary prediction.
        label: (*spatial) binary reference, same shape.
        spacing: voxel size per spatial axis (or one number); ``None`` means 1 (distances in voxels).
        convention: one of :data:`HD95_CONVENTIONS`.

    Returns:
        the distance, a float >= 0.
    """
    if convention not in HD95_CONVENTIONS:
        raise ValueError(f"hd95 convention {convention!r}: expected one of {list(HD95_CONVENTIONS)}.")
    pred_np = convert_to_numpy(pred).astype(bool)
    label_np = convert_to_numpy(label).astype(bool)
    if pred_np.shape != label_np.shape:
        raise ValueError(f"pred and label must have the same shape, got {pred_np.shape} and {label_np.shape}.")
    spacing_list = _spacing_list(spacing, pred_np.ndim)
    pred_empty, label_empty = not pred_np.any(), not label_np.any()
    if pred_empty and label_empty:
        return 0.0
    if pred_empty or label_empty:
        if convention == "brats":
            return BRATS_EMPTY_HD95
        return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(pred_np.shape, spacing_list))))
    if convention == "monai":
        return float(
            compute_hausdorff_distance(
                torch.as_tensor(pred_np[None, None], dtype=torch.float32),
                torch.as_tensor(label_np[None, None], dtype=torch.float32),
                include_background=True,
                percentile=95,
                spacing=spacing_list,
            )[0, 0]
        )
    edges_pred, edges_label = get_mask_edges(pred_np, label_np, crop=True)
    pred_to_label = get_surface_distance(edges_pred, edges_label, spacing=spacing_list)
    label_to_pred = get_surface_distance(edges_label, edges_pred, spacing=spacing_list)
    return float(np.percentile(np.concatenate([pred_to_label, label_to_pred]), 95))


def segmentation_metrics(
    pred: Tensor | np.ndarray,
    label: Tensor | np.ndarray,
    region_names: Sequence[str] = BRATS_REGIONS,
    include_hd95: bool = False,
    spacing: Sequence[float] | float | None = None,
    hd95_convention: str = "brats",
) -> dict[str, float]:
    """
    Dice and IoU (and optionally HD95) per region of one subject, and their means over regions.

    Dice and IoU are MONAI ``compute_dice`` / ``compute_iou`` with ``ignore_empty=False``, which is the BraTS
    convention, also used by the per-epoch validation Dice of training:

    - reference and prediction both empty: Dice = IoU = 1;
    - exactly one of them empty: Dice = IoU = 0.

    HD95 is :func:`hd95` with ``hd95_convention`` (default ``"brats"``: pooled percentile, 0 when both are empty,
    373.13 when one is).

    Args:
        pred: (C, *spatial) binary prediction, one channel per region.
        label: (C, *spatial) binary label, same shape.
        region_names: name of each channel, e.g. ``("TC", "WT", "ET")``.
        include_hd95: also compute the 95th-percentile Hausdorff distance (slower).
        spacing: voxel size per spatial axis (or one number); ``None`` means 1 (distances in voxels).
        hd95_convention: ``"brats"`` or ``"monai"`` (see :data:`HD95_CONVENTIONS`).

    Returns:
        ``{"dice_TC": .., "dice_WT": .., "dice_ET": .., "dice_mean": .., "iou_TC": .., ..., "iou_mean": ..}`` and,
        with ``include_hd95``, ``"hd95_<region>"`` and ``"hd95_mean"``.
    """

    pred_t = convert_to_tensor(pred, dtype=torch.float32, device="cpu", track_meta=False)
    label_t = convert_to_tensor(label, dtype=torch.float32, device="cpu", track_meta=False)
    if pred_t.shape != label_t.shape:
        raise ValueError(
            f"pred and label must have the same shape, got {tuple(pred_t.shape)} and {tuple(label_t.shape)}."
        )
    if pred_t.shape[0] != len(region_names):
        raise ValueError(f"expected {len(region_names)} channels ({', '.join(region_names)}), got {pred_t.shape[0]}.")
    if not (torch.isin(pred_t, torch.tensor([0.0, 1.0])).all() and torch.isin(label_t, torch.tensor([0.0, 1.0])).all()):
        raise ValueError("pred and label must be binary (values 0 and 1).")
    batch_pred, batch_label = pred_t[None], label_t[None]
    results: dict[str, float] = {}
    dice = compute_dice(batch_pred, batch_label, include_background=True, ignore_empty=False)[0]
    iou = compute_iou(batch_pred, batch_label, include_background=True, ignore_empty=False)[0]
    for per_region, prefix in ((dice, "dice"), (iou, "iou")):
        for region, value in zip(region_names, per_region.tolist()):
            results[f"{prefix}_{region}"] = float(value)
        results[f"{prefix}_mean"] = float(per_region.mean())
    if include_hd95:
        hd95_values = [
            hd95(pred_t[channel], label_t[channel], spacing, hd95_convention) for channel in range(len(region_names))
        ]
        for region, value in zip(region_names, hd95_values):
            results[f"hd95_{region}"] = value
        results["hd95_mean"] = float(np.mean(hd95_values))
    return results
