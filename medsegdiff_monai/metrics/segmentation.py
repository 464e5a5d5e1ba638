"""Per-subject overlap and surface metrics of the BraTS regions (TC, WT, ET)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou
from monai.utils import convert_to_tensor
from torch import Tensor

__all__ = ["BRATS_REGIONS", "segmentation_metrics"]

BRATS_REGIONS = ("TC", "WT", "ET")


def _empty_surface_distance(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Distance used when exactly one of prediction and label is empty: the volume's diagonal (BraTS convention)."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def segmentation_metrics(
    pred: Tensor | np.ndarray,
    label: Tensor | np.ndarray,
    region_names: Sequence[str] = BRATS_REGIONS,
    include_hd95: bool = False,
    spacing: Sequence[float] | float | None = None,
) -> dict[str, float]:
    """
    Dice and IoU (and optionally HD95) per region of one subject, and their means over regions.

    Computed with MONAI ``compute_dice`` / ``compute_iou`` (``ignore_empty=False``) and
    ``compute_hausdorff_distance(percentile=95)``. Conventions for empty masks (the BraTS challenge's):

    - label and prediction both empty: Dice = IoU = 1, HD95 = 0;
    - exactly one of them empty: Dice = IoU = 0, HD95 = the diagonal of the volume in ``spacing`` units
      (373.13 mm for 240 x 240 x 155 at 1 mm, the BraTS value).

    Args:
        pred: (C, *spatial) binary prediction, one channel per region.
        label: (C, *spatial) binary label, same shape.
        region_names: name of each channel, e.g. ``("TC", "WT", "ET")``.
        include_hd95: also compute the 95th-percentile Hausdorff distance (slower).
        spacing: voxel size per spatial axis (or one number); ``None`` means 1 (distances in voxels).

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
        spatial_shape = pred_t.shape[1:]
        spacing_list = [1.0] * len(spatial_shape) if spacing is None else spacing
        if isinstance(spacing_list, (int, float)):
            spacing_list = [float(spacing_list)] * len(spatial_shape)
        hd95_values = []
        for channel, region in enumerate(region_names):
            pred_empty = not bool(pred_t[channel].any())
            label_empty = not bool(label_t[channel].any())
            if pred_empty and label_empty:
                value = 0.0
            elif pred_empty or label_empty:
                value = _empty_surface_distance(spatial_shape, spacing_list)
            else:
                value = float(
                    compute_hausdorff_distance(
                        batch_pred[:, channel : channel + 1],
                        batch_label[:, channel : channel + 1],
                        include_background=True,
                        percentile=95,
                        spacing=list(spacing_list),
                    )[0, 0]
                )
            results[f"hd95_{region}"] = value
            hd95_values.append(value)
        results["hd95_mean"] = float(np.mean(hd95_values))
    return results
