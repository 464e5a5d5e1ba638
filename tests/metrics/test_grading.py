from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from medsegdiff_monai.metrics import (
    brier_score,
    calibrated_ece_floor,
    expected_calibration_error,
    grade_metrics,
    reliability_bins,
)


def test_against_hand_computation():
    p_hgg = [0.1, 0.8, 0.6, 0.3, 0.55]
    grade = [0, 1, 1, 1, 0]
    result = grade_metrics(p_hgg, grade)
    # predictions (threshold 0.5): 0 1 1 0 1 -> TN=1, FP=1, FN=1, TP=2
    assert result["confusion_matrix"] == [[1, 1], [1, 2]]
    assert result["accuracy"] == pytest.approx(3 / 5)
    assert result["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    # AUC: pairs (positive, negative) ranked right: 0.8>0.1, 0.8>0.55, 0.6>0.1, 0.6>0.55, 0.3>0.1 -> 5 of 6
    assert result["auc"] == pytest.approx(5 / 6)
    # ECE, 10 bins: bins 1, 8, 6, 3, 5 each hold one subject
    assert result["ece"] == pytest.approx((0.1 + 0.2 + 0.4 + 0.7 + 0.55) / 5)
    assert result["num_subjects"] == 5


def test_ece_pools_subjects_of_a_bin():
    # bin 7 holds 0.7 and 0.75 with targets 1, 0: |0.5 - 0.725| weighted 2/3; bin 9 holds 0.95 with target 1
    assert expected_calibration_error([0.7, 0.75, 0.95], [1, 0, 1]) == pytest.approx(2 / 3 * 0.225 + 1 / 3 * 0.05)
    assert expected_calibration_error([1.0, 0.0], [1, 0]) == 0.0  # p = 1 falls in the last bin
    assert math.isnan(expected_calibration_error([], []))


def test_one_grade_only_gives_nan_auc_with_warning():
    with pytest.warns(UserWarning, match="AUC is NaN"):
        result = grade_metrics([0.9, 0.2], [1, 1])
    assert math.isnan(result["auc"])
    assert result["accuracy"] == 0.5
    with pytest.warns(UserWarning, match="F1 is NaN"):
        result = grade_metrics([0.1, 0.2], [0, 0])
    assert math.isnan(result["f1"]) and result["accuracy"] == 1.0


def test_empty_input_warns_and_returns_nan():
    with pytest.warns(UserWarning, match="no subject"):
        result = grade_metrics([], [])
    assert all(math.isnan(result[key]) for key in ("auc", "f1", "accuracy", "ece"))


def test_defined_figures_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grade_metrics(np.array([0.2, 0.7]), np.array([0, 1]))


def test_bad_inputs():
    with pytest.raises(ValueError, match="same length"):
        grade_metrics([0.5], [0, 1])
    with pytest.raises(ValueError, match="0 \\(LGG\\) or 1"):
        grade_metrics([0.5], [2])
    with pytest.raises(ValueError, match="NaN"):
        grade_metrics([math.nan], [1])
    # a fractional grade is not truncated to LGG, a class name is named
    with pytest.raises(ValueError, match=r"grade must hold 0 \(LGG\) or 1 \(HGG\), got values \[0.5, 1.0\]"):
        grade_metrics([0.2, 0.3], [0.5, 1])
    with pytest.raises(ValueError, match=r"grade must hold 0 \(LGG\) or 1 \(HGG\), got \['LGG'\]"):
        grade_metrics([0.2], ["LGG"])
    # every calibration figure checks its inputs alike
    for figure, arguments in (
        (expected_calibration_error, ([math.nan, 0.3], [0, 1])),
        (reliability_bins, ([0.1, math.nan], [0, 1])),
        (brier_score, ([math.nan], [1])),
        (calibrated_ece_floor, ([math.nan],)),
    ):
        with pytest.raises(ValueError, match="holds NaN for 1 of"):
            figure(*arguments)
    with pytest.raises(ValueError, match=r"target must hold 0 \(LGG\) or 1 \(HGG\), got values \[2.0\]"):
        brier_score([0.3], [2])


def test_calibrated_ece_floor_by_hand():
    # four subjects at p = 0.5 share one bin; k of them HGG with probability C(4, k) / 16, ECE = |k / 4 - 0.5|
    assert calibrated_ece_floor([0.5] * 4) == pytest.approx((0.5 + 4 * 0.25 + 0 + 4 * 0.25 + 0.5) / 16)
    # certain predictions are always right: no sampling noise
    assert calibrated_ece_floor([0.0, 1.0, 1.0]) == pytest.approx(0.0)
    assert np.isnan(calibrated_ece_floor([]))


def test_calibrated_ece_floor_matches_binomial_and_simulation():
    from scipy.stats import binom

    # one bin of n equal probabilities: the count of class 1 is binomial
    n, q = 9, 0.93
    k = np.arange(n + 1)
    exact = float(np.sum(binom.pmf(k, n, q) * np.abs(k / n - q)))
    assert calibrated_ece_floor([q] * n) == pytest.approx(exact, rel=1e-9)
    # unequal probabilities over several bins (Poisson-binomial): against the mean ECE of simulated targets
    rng = np.random.default_rng(0)
    p = rng.beta(0.5, 0.5, size=40)
    draws = (rng.random((20000, p.size)) < p).astype(int)
    simulated = np.mean([expected_calibration_error(p, y) for y in draws])
    assert calibrated_ece_floor(p) == pytest.approx(simulated, abs=0.002)
    assert calibrated_ece_floor(p) > 0.02  # 40 subjects: the noise is far from zero
