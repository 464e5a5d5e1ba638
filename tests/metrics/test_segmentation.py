from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medsegdiff_monai.metrics import segmentation_metrics


def _masks() -> tuple[np.ndarray, np.ndarray]:
    label = np.zeros((3, 10, 10, 6), dtype=np.uint8)
    label[1, 2:8, 2:8, 1:5] = 1  # WT: 6 x 6 x 4 = 144 voxels
    label[0, 3:7, 3:7, 2:4] = 1  # TC: 4 x 4 x 2 = 32
    pred = np.zeros_like(label)
    pred[1, 2:8, 2:8, 1:4] = 1  # 108 voxels, all inside WT
    pred[0, 3:7, 3:7, 2:4] = 1  # TC exact
    pred[2, 0, 0, 0] = 1  # ET predicted, label empty
    return pred, label


def test_perfect_prediction_gives_dice_one_and_hd95_zero():
    _, label = _masks()
    label[2, 4:6, 4:6, 2] = 1
    result = segmentation_metrics(label, torch.as_tensor(label), include_hd95=True)
    for key in ("dice", "iou"):
        assert [result[f"{key}_{r}"] for r in ("TC", "WT", "ET", "mean")] == [1.0, 1.0, 1.0, 1.0]
    assert [result[f"hd95_{r}"] for r in ("TC", "WT", "ET", "mean")] == [0.0, 0.0, 0.0, 0.0]


def test_values_against_hand_computation():
    pred, label = _masks()
    result = segmentation_metrics(pred, label, include_hd95=True, spacing=(1.0, 1.0, 2.0))
    assert result["dice_TC"] == pytest.approx(1.0)
    assert result["dice_WT"] == pytest.approx(2 * 108 / (108 + 144))
    assert result["iou_WT"] == pytest.approx(108 / 144)
    assert result["dice_ET"] == 0.0 and result["iou_ET"] == 0.0  # label empty, prediction not
    assert result["dice_mean"] == pytest.approx((1 + 2 * 108 / 252 + 0) / 3)
    assert 0.0 < result["hd95_WT"] <= 2.0  # the label's top layer is one slice (2 mm) above the prediction's
    assert result["hd95_ET"] == 373.13  # one empty: the BraTS constant
    assert result["hd95_TC"] == 0.0


def test_hd95_of_single_voxels_is_their_distance_in_mm():
    pred, label = np.zeros((3, 8, 8, 4)), np.zeros((3, 8, 8, 4))
    for channel in range(3):
        label[channel, 1, 1, 1] = 1
        pred[channel, 4, 5, 1 + channel] = 1  # 3 and 4 voxels in-plane, 0 / 1 / 2 slices of 2 mm
    result = segmentation_metrics(pred, label, include_hd95=True, spacing=(1.0, 1.0, 2.0))
    assert result["hd95_TC"] == pytest.approx(5.0)
    assert result["hd95_WT"] == pytest.approx(math.sqrt(25 + 4))
    assert result["hd95_ET"] == pytest.approx(math.sqrt(25 + 16))


def test_both_empty_is_perfect():
    empty = np.zeros((3, 5, 5, 5))
    result = segmentation_metrics(empty, empty, include_hd95=True)
    assert result["dice_mean"] == 1.0 and result["iou_mean"] == 1.0 and result["hd95_mean"] == 0.0
    assert "hd95_TC" not in segmentation_metrics(empty, empty)


def test_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        segmentation_metrics(np.zeros((3, 4, 4, 4)), np.zeros((3, 4, 4, 5)))
    with pytest.raises(ValueError, match="3 channels"):
        segmentation_metrics(np.zeros((1, 4, 4, 4)), np.zeros((1, 4, 4, 4)))
    with pytest.raises(ValueError, match="binary"):
        segmentation_metrics(np.full((3, 4, 4, 4), 0.5), np.zeros((3, 4, 4, 4)))
