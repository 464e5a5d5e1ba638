"""Lesion-wise Dice and HD95 (BraTS 2023+ rules) on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from medsegdiff_monai.metrics import hd95, lesion_wise_metrics, lesion_wise_scores

SHAPE = (40, 40, 20)


def _cube(corner, size) -> np.ndarray:
    mask = np.zeros(SHAPE, bool)
    mask[tuple(slice(c, c + s) for c, s in zip(corner, size))] = True
    return mask


def test_exact_lesion_plus_a_false_positive():
    label = _cube((5, 5, 5), (4, 4, 4))  # 64 mm^3 > 50: scored
    pred = label | _cube((30, 30, 12), (2, 2, 2))  # far away: a false positive
    scores = lesion_wise_scores(pred, label)
    # hand-computed: (Dice 1 + FP 0) / 2 lesions; (HD95 0 + 374) / 2
    assert scores == {"dice": 0.5, "hd95": 187.0, "tp": 1, "fn": 0, "fp": 1}


def test_nearby_reference_lesions_merge_and_small_ones_are_not_scored():
    a, b = _cube((5, 5, 5), (4, 4, 4)), _cube((5, 12, 5), (4, 4, 4))  # 3 voxels apart: dilations by 3 touch
    small = _cube((30, 30, 10), (3, 3, 3))  # 27 mm^3 <= 50, missed
    scores = lesion_wise_scores(a, a | b | small)
    # one merged lesion of 128 voxels, of which the prediction covers 64: Dice 2*64/(64+128)
    assert scores["dice"] == pytest.approx(2 * 64 / 192) and (scores["tp"], scores["fn"], scores["fp"]) == (1, 0, 0)
    assert scores["hd95"] == pytest.approx(hd95(a, a | b))
    # with 2 mm slices the small lesion has 54 mm^3: it is scored, and missed (Dice 0, HD95 374)
    spaced = lesion_wise_scores(a, a | b | small, spacing=(1, 1, 2))
    assert (spaced["tp"], spaced["fn"]) == (1, 1)
    assert spaced["dice"] == pytest.approx(2 * 64 / 192 / 2)
    assert spaced["hd95"] == pytest.approx((hd95(a, a | b, (1, 1, 2)) + 374) / 2)


def test_prediction_within_the_dilation_matches_without_overlap():
    label = _cube((5, 5, 5), (4, 4, 4))
    pred = _cube((11, 5, 5), (4, 4, 4))  # 2 voxels of background between them: inside the 3-fold dilation
    scores = lesion_wise_scores(pred, label)
    assert (scores["tp"], scores["fp"], scores["dice"]) == (1, 0, 0.0)
    assert scores["hd95"] == pytest.approx(hd95(pred, label))
    far = lesion_wise_scores(_cube((14, 5, 5), (4, 4, 4)), label)  # 5 voxels apart: a miss and a false positive
    assert (far["tp"], far["fn"], far["fp"], far["dice"], far["hd95"]) == (0, 1, 1, 0.0, 374.0)


def test_empty_cases():
    empty = np.zeros(SHAPE, bool)
    assert lesion_wise_scores(empty, empty) == {"dice": 1.0, "hd95": 0.0, "tp": 0, "fn": 0, "fp": 0}
    small = _cube((5, 5, 5), (2, 2, 2))
    assert lesion_wise_scores(empty, small)["dice"] == 1.0  # only an unscored lesion
    assert lesion_wise_scores(small, empty) == {"dice": 0.0, "hd95": 374.0, "tp": 0, "fn": 0, "fp": 1}


def test_regions_and_challenge_parameters():
    label = np.stack([_cube((5, 5, 5), (4, 4, 4))] * 3)
    pred = label.copy()
    pred[2] = _cube((5, 5, 5), (1, 1, 1))  # ET: one voxel inside the lesion
    result = lesion_wise_metrics(pred, label)
    assert result["lesion_dice_TC"] == 1.0 and result["lesion_fp_WT"] == 0
    assert result["lesion_dice_ET"] == pytest.approx(2 / 65)
    assert result["lesion_dice_mean"] == pytest.approx((2 + 2 / 65) / 3)
    # BraTS-MET scores lesions over 2 mm^3 and dilates once
    met = lesion_wise_metrics(pred, np.stack([_cube((5, 5, 5), (1, 1, 3))] * 3), challenge="BraTS-MET")
    assert met["lesion_dice_ET"] == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match="challenge"):
        lesion_wise_metrics(pred, label, challenge="BraTS-X")


def test_scores_do_not_depend_on_the_empty_margin():
    rng = np.random.default_rng(0)
    label = _cube((0, 0, 0), (5, 6, 4)) | _cube((20, 30, 15), (5, 5, 5))  # lesions at the volume's edges
    pred = np.roll(label, 1, axis=0) | (rng.random(SHAPE) > 0.9995)
    padded = [np.pad(m, 7) for m in (pred, label)]
    assert lesion_wise_scores(pred, label) == pytest.approx(lesion_wise_scores(*padded))
