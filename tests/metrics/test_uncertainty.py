import math

import numpy as np
import pytest
from sklearn.metrics import auc, roc_auc_score

from medsegdiff_monai.metrics import (
    mean_uncertainty,
    qu_brats_map,
    qu_brats_near_miss_map,
    qu_brats_region_map,
    qu_brats_scores,
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


def test_qu_brats_scores_by_hand():
    """Four voxels, thresholds 0 and 100: at 0 only the certain voxels 2 and 3 remain."""
    prediction = np.array([1, 1, 0, 0], dtype=bool)
    truth = np.array([1, 0, 1, 0], dtype=bool)
    uncertainty = np.array([100, 100, 0, 0])
    brain = np.ones(4, dtype=bool)
    scores = qu_brats_scores(prediction, truth, uncertainty, brain, num_points=1)
    # threshold 0: voxels 2 (missed tumour) and 3 (true negative) remain: Dice 0; the one TP (voxel 0) is filtered
    # out (FTP 1), the one TN (voxel 3) is not (FTN 0). Threshold 100: every voxel, Dice 2 * 1 / (2 + 2) = 0.5.
    assert scores["dice_auc"] == pytest.approx((0 + 0.5) / 2)
    assert scores["ftp_auc"] == pytest.approx((1 + 0) / 2)
    assert scores["ftn_auc"] == pytest.approx(0.0)
    assert scores["score"] == pytest.approx((0.25 + 0.5 + 1) / 3)
    # nothing left at a threshold (every voxel uncertain) counts as Dice 1, as in the challenge's code
    assert qu_brats_scores(prediction, truth, np.full(4, 100), brain, num_points=1)["dice_auc"] == pytest.approx(0.75)


def _qu_brats_reference(prediction, truth, uncertainty, brain, num_points):
    """The challenge's definition written out: a mask per threshold, the three curves, scikit-learn's AUC."""
    thresholds = np.arange(0.0, 100.0 + 1e-7, 100.0 / num_points)[::-1]
    eps = np.finfo(np.float32).eps
    curves = {"dice": [], "ftp": [], "ftn": []}
    tp, tn = prediction & truth & brain, ~prediction & ~truth & brain
    for threshold in thresholds:
        certain = uncertainty <= threshold
        p, t = prediction & certain, truth & certain
        union = p.sum() + t.sum()
        curves["dice"].append(1.0 if union == 0 else 2.0 * (p & t).sum() / union)
        curves["ftp"].append((tp.sum() - (tp & certain).sum()) / (tp.sum() + eps))
        curves["ftn"].append((tn.sum() - (tn & certain).sum()) / (tn.sum() + eps))
    aucs = {name: auc(thresholds, values) / 100.0 for name, values in curves.items()}
    return aucs, (aucs["dice"] + (1 - aucs["ftp"]) + (1 - aucs["ftn"])) / 3


@pytest.mark.parametrize("num_points", [40, 7])
def test_qu_brats_scores_against_the_challenge_definition(num_points):
    rng = np.random.default_rng(num_points)
    shape = (24, 20, 12)
    truth = rng.random(shape) < 0.2
    flipped = rng.random(shape) < 0.1
    prediction = truth ^ flipped
    brain = rng.random(shape) < 0.9
    # a map that is higher on wrong voxels, with ties (integers) and values off the thresholds (floats)
    uncertainty = np.clip(rng.normal(20, 15, shape) + 50 * flipped, 0, 100)
    uncertainty[rng.random(shape) < 0.3] = 0
    for values in (uncertainty, np.round(uncertainty)):
        aucs, score = _qu_brats_reference(prediction, truth, values, brain, num_points)
        scores = qu_brats_scores(prediction, truth, values, brain, num_points=num_points)
        assert scores["dice_auc"] == pytest.approx(aucs["dice"], abs=1e-12)
        assert scores["ftp_auc"] == pytest.approx(aucs["ftp"], abs=1e-12)
        assert scores["ftn_auc"] == pytest.approx(aucs["ftn"], abs=1e-12)
        assert scores["score"] == pytest.approx(score, abs=1e-12)
    # a map that points at the errors scores higher than one that does not
    assert (
        qu_brats_scores(prediction, truth, 100.0 * flipped, brain)["score"]
        > qu_brats_scores(prediction, truth, 100.0 * ~flipped, brain)["score"]
    )


def test_qu_brats_map_kinds_by_hand():
    """The near-miss map is 100 (1 - |2p - 1|) outside the predicted region and 0 inside it; the ensemble-std map is
    200 std on both sides; both round to uint8 0-100."""
    probability = np.array([0.0, 0.1, 0.25, 0.5, 0.6, 0.9, 1.0, 0.4])
    predicted = np.array([False, False, False, False, True, True, True, True])  # the last: labelled by the hierarchy
    std = np.array([0.0, 0.05, 0.2, 0.5, 0.3, 0.1, 0.0, 0.49])
    near_miss = qu_brats_near_miss_map(probability, predicted)
    assert near_miss.dtype == np.uint8 and near_miss.tolist() == [0, 20, 50, 100, 0, 0, 0, 0]
    assert qu_brats_map(std).tolist() == [0, 10, 40, 100, 60, 20, 0, 98]
    np.testing.assert_array_equal(qu_brats_region_map("near_miss", probability, std, predicted), near_miss)
    np.testing.assert_array_equal(qu_brats_region_map("ensemble_std", probability, std, predicted), qu_brats_map(std))
    with pytest.raises(ValueError, match=r"one of \['near_miss', 'ensemble_std'\], got 'std'"):
        qu_brats_region_map("std", probability, std, predicted)


def test_a_near_miss_map_that_flags_the_missed_voxels_beats_zeros():
    """Flagging the false negatives that the mean probability nearly included filters them out at some threshold:
    the Dice AUC rises, and only true negatives (few against the brain) are charged, so the score beats a map of 0."""
    truth = np.zeros(400, dtype=bool)
    truth[:40] = True
    predicted = truth.copy()
    predicted[30:40] = False  # ten missed voxels, their mean probability 0.4
    probability = np.where(predicted, 0.9, 0.02)
    probability[30:40] = 0.4
    brain = np.ones(400, dtype=bool)
    flagged = qu_brats_scores(predicted, truth, qu_brats_near_miss_map(probability, predicted), brain)
    zeros = qu_brats_scores(predicted, truth, np.zeros(400), brain)
    assert flagged["ftp_auc"] == 0 and flagged["dice_auc"] > zeros["dice_auc"] and flagged["score"] > zeros["score"]


def test_qu_brats_scores_refuses_maps_off_the_scale():
    voxels = np.ones((2, 2, 2), dtype=bool)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        qu_brats_scores(voxels, voxels, np.full((2, 2, 2), 0.5) * 255, voxels)
    with pytest.raises(ValueError, match="one shape"):
        qu_brats_scores(voxels, voxels, np.zeros((2, 2)), voxels)
