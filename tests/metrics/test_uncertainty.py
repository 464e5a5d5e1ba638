import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medsegdiff_monai.metrics import (
    mean_uncertainty,
    spearman_correlation,
    tumour_neighbourhood,
    voxel_error_auroc,
    wrong_voxels,
)


def test_auroc_by_hand_with_ties():
    uncertainty = [0.0, 0.0, 0.2, 0.2, 0.5]
    wrong = [False, True, False, True, True]
    # pairs (wrong, right): (0.0 vs 0.0) tie 1/2, (0.0 vs 0.2) 0; (0.2 vs 0.0) 1, (0.2 vs 0.2) 1/2; (0.5, *) 1 + 1
    assert voxel_error_auroc(uncertainty, wrong) == pytest.approx((0.5 + 0 + 1 + 0.5 + 1 + 1) / 6)


def test_auroc_against_sklearn():
    rng = np.random.default_rng(0)
    wrong = rng.random(5000) < 0.1
    # many exact zeros (members agreeing), a shift for wrong voxels, values rounded to make ties
    uncertainty = np.round(np.where(rng.random(5000) < 0.5, 0.0, rng.random(5000)) + 0.3 * wrong, 2)
    assert voxel_error_auroc(uncertainty, wrong) == pytest.approx(roc_auc_score(wrong, uncertainty), abs=1e-12)
    assert voxel_error_auroc(uncertainty.reshape(50, 100), wrong.reshape(50, 100)) == pytest.approx(
        roc_auc_score(wrong, uncertainty), abs=1e-12
    )
    assert math.isnan(voxel_error_auroc([0.1, 0.2], [False, False]))
    with pytest.raises(ValueError, match="same size"):
        voxel_error_auroc([0.1, 0.2], [True])


def test_spearman_against_hand_computation():
    x = [0.1, 0.4, 0.4, 0.2, 0.9, float("nan")]
    y = [0.9, 0.5, 0.7, 0.8, 0.2, 0.3]
    # ranks of the first five pairs, ties as midranks: x 1, 3.5, 3.5, 2, 5; y 5, 2, 3, 4, 1; Pearson of the ranks
    rx, ry = np.array([1, 3.5, 3.5, 2, 5]), np.array([5, 2, 3, 4, 1])
    expected = ((rx - rx.mean()) * (ry - ry.mean())).sum() / math.sqrt(
        ((rx - rx.mean()) ** 2).sum() * ((ry - ry.mean()) ** 2).sum()
    )
    assert spearman_correlation(x, y) == pytest.approx(expected)
    assert spearman_correlation([1, 2, 3, 4], [10, 20, 25, 100]) == pytest.approx(1.0)
    assert math.isnan(spearman_correlation([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman_correlation([1, 2], [1, 2]))


def test_tumour_neighbourhood_and_wrong_voxels():
    prediction = np.zeros((9, 9, 9), dtype=np.uint8)
    target = np.zeros_like(prediction)
    prediction[2, 2, 2] = 2
    target[6, 6, 6] = 4
    region = tumour_neighbourhood([prediction, target], margin=1)
    # two 3 x 3 x 3 cubes around the two tumour voxels
    assert region.sum() == 2 * 27 and region[1:4, 1:4, 1:4].all() and region[5:8, 5:8, 5:8].all()
    assert region[4, 4, 4] == 0
    np.testing.assert_array_equal(tumour_neighbourhood(prediction, margin=0), prediction > 0)
    assert wrong_voxels(prediction, target).sum() == 2
    uncertainty = np.zeros(prediction.shape, dtype=np.float32)
    uncertainty[2, 2, 2] = 0.27
    assert mean_uncertainty(uncertainty, prediction, margin=1) == pytest.approx(0.27 / 27)
    assert math.isnan(mean_uncertainty(uncertainty, np.zeros_like(prediction)))
    with pytest.raises(ValueError, match="differs"):
        wrong_voxels(prediction, target[:-1])
