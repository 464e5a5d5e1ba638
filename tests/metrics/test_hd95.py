"""HD95 in the BraTS convention against medpy's ``hd95``, and MONAI's one-way-maximum variant."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance

from medsegdiff_monai.metrics import BRATS_EMPTY_HD95, hd95, segmentation_metrics

medpy_binary = pytest.importorskip("medpy.metric.binary")


def _blob(shape, centre, radii) -> np.ndarray:
    grid = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.9, 1.2, 2.5), (1.0, 1.0, 5.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_brats_hd95_matches_medpy_with_anisotropic_spacing(spacing, seed):
    rng = np.random.default_rng(seed)
    shape = (24, 22, 14)
    label = _blob(shape, rng.uniform(8, 14, 3), rng.uniform(3, 7, 3))
    pred = _blob(shape, rng.uniform(8, 14, 3), rng.uniform(3, 7, 3)) | (rng.random(shape) > 0.995)
    expected = medpy_binary.hd95(pred, label, voxelspacing=spacing)
    assert hd95(pred, label, spacing) == pytest.approx(expected, rel=1e-5)
    assert hd95(torch.as_tensor(label), torch.as_tensor(pred), spacing) == pytest.approx(expected, rel=1e-5)


def test_stray_component_barely_moves_the_pooled_percentile():
    shape = (64, 64, 32)
    label = _blob(shape, (20, 20, 16), (10, 10, 8))
    pred = label.copy()
    pred[55:59, 55:59, 2:6] = True  # a 64-voxel stray component far from the tumour
    pooled = hd95(pred, label)
    one_way_max = hd95(pred, label, convention="monai")
    assert pooled == pytest.approx(medpy_binary.hd95(pred, label), rel=1e-6)
    # the stray surface is under 5 % of the pooled surface, but over 5 % of the prediction's own surface
    assert pooled < 1.0 < one_way_max
    monai_value = compute_hausdorff_distance(
        torch.as_tensor(pred[None, None]).float(), torch.as_tensor(label[None, None]).float(), percentile=95
    )[0, 0]
    assert one_way_max == pytest.approx(float(monai_value))


def test_empty_masks():
    shape = (10, 12, 8)
    empty, full = np.zeros(shape, bool), _blob(shape, (5, 6, 4), (3, 3, 2))
    assert hd95(empty, empty) == 0.0
    assert hd95(full, empty, spacing=(1, 1, 2.5)) == BRATS_EMPTY_HD95 == 373.13
    assert hd95(empty, full) == 373.13
    diagonal = math.sqrt(10**2 + 12**2 + (8 * 2.5) ** 2)
    assert hd95(empty, full, spacing=(1, 1, 2.5), convention="monai") == pytest.approx(diagonal)
    with pytest.raises(ValueError, match="convention"):
        hd95(full, full, convention="mean")


def test_region_metrics_use_the_chosen_convention():
    shape = (20, 20, 10)
    label = np.stack([_blob(shape, (8, 8, 5), (4, 4, 3))] * 3).astype(np.uint8)
    pred = label.copy()
    pred[2] = 0  # ET missed
    pred[1, 17:19, 17:19, 1:3] = 1  # stray WT component
    brats = segmentation_metrics(pred, label, include_hd95=True, spacing=(1, 1, 2))
    monai = segmentation_metrics(pred, label, include_hd95=True, spacing=(1, 1, 2), hd95_convention="monai")
    assert brats["hd95_ET"] == 373.13 and brats["dice_ET"] == 0.0
    assert brats["hd95_WT"] == pytest.approx(medpy_binary.hd95(pred[1], label[1], voxelspacing=(1, 1, 2)))
    assert monai["hd95_ET"] == pytest.approx(math.sqrt(20**2 + 20**2 + 20**2))
    assert monai["hd95_WT"] >= brats["hd95_WT"]
