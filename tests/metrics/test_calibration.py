"""Brier score and reliability bins against scikit-learn; bootstrap intervals against SciPy and hand cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, roc_auc_score

from medsegdiff_monai.metrics import (
    bootstrap_interval,
    brier_score,
    expected_calibration_error,
    grade_metrics,
    reliability_bins,
)


def _grades(seed: int = 0, size: int = 200) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.001, 0.999, size)
    return p, (rng.random(size) < p**2).astype(int)  # over-confident for HGG


def test_brier_against_sklearn():
    p, y = _grades()
    assert brier_score(p, y) == pytest.approx(brier_score_loss(y, p))
    assert grade_metrics(p, y)["brier"] == pytest.approx(brier_score_loss(y, p))
    assert brier_score([0.5, 0.5], [0, 1]) == 0.25 and math.isnan(brier_score([], []))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        brier_score([1.2], [1])


@pytest.mark.parametrize("num_bins", [5, 10])
def test_reliability_bins_against_sklearn(num_bins):
    p, y = _grades(1)
    bins = reliability_bins(p, y, num_bins)
    observed, predicted = calibration_curve(y, p, n_bins=num_bins, strategy="uniform")
    filled = [i for i, n in enumerate(bins["count"]) if n]
    np.testing.assert_allclose([bins["observed"][i] for i in filled], observed)
    np.testing.assert_allclose([bins["mean_predicted"][i] for i in filled], predicted)
    assert sum(bins["count"]) == p.size and len(bins["edges"]) == num_bins + 1
    weights = np.asarray([bins["count"][i] for i in filled]) / p.size
    assert expected_calibration_error(p, y, num_bins) == pytest.approx(
        float(np.sum(weights * abs(observed - predicted)))
    )


def test_reliability_bins_by_hand():
    bins = reliability_bins([0.05, 0.15, 0.12, 1.0], [0, 1, 0, 1], num_bins=10)
    assert bins["count"] == [1, 2, 0, 0, 0, 0, 0, 0, 0, 1]
    assert bins["observed"][1] == 0.5 and bins["mean_predicted"][1] == pytest.approx(0.135)
    assert math.isnan(bins["observed"][2]) and bins["observed"][9] == 1.0


def test_bootstrap_mean_matches_scipy():
    rng = np.random.default_rng(2)
    dice = rng.beta(8, 2, 60)
    low, high = bootstrap_interval(np.mean, dice, num_resamples=4000, seed=1)
    reference = stats.bootstrap((dice,), np.mean, n_resamples=4000, method="percentile", random_state=1)
    assert low == pytest.approx(reference.confidence_interval.low, abs=0.006)
    assert high == pytest.approx(reference.confidence_interval.high, abs=0.006)
    assert low < dice.mean() < high
    assert bootstrap_interval(np.mean, np.full(10, 0.8)) == pytest.approx((0.8, 0.8))
    assert bootstrap_interval(np.mean, dice, seed=5) == bootstrap_interval(np.mean, dice, seed=5)


def test_bootstrap_auc_is_paired_and_skips_undefined_resamples():
    p, y = _grades(3, size=40)

    def auc(p_hgg, grade):
        return roc_auc_score(grade, p_hgg) if np.unique(grade).size == 2 else math.nan

    low, high = bootstrap_interval(auc, p, y, num_resamples=200)
    assert low < roc_auc_score(y, p) < high <= 1.0
    # one grade only: every resample is undefined, so there is no interval
    assert all(math.isnan(v) for v in bootstrap_interval(auc, p, np.ones_like(y), num_resamples=50))
    with pytest.raises(ValueError, match="same length"):
        bootstrap_interval(auc, p, y[:-1])
