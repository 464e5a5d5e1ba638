"""Percentile-bootstrap confidence intervals over subjects."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

__all__ = ["bootstrap_interval"]


def bootstrap_interval(
    statistic: Callable[..., float],
    *samples: np.ndarray,
    num_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """
    Percentile-bootstrap confidence interval of a statistic of per-subject values.

    Subjects are drawn with replacement ``num_resamples`` times (``numpy.random.default_rng(seed)``); when several
    ``samples`` are given they are resampled together (paired: the same subjects in each), e.g. ``(p_hgg, grade)``
    for an AUC. A resample whose statistic is NaN (e.g. an AUC of a resample holding one grade only) is left out.
    The interval is the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the remaining values.

    Args:
        statistic: function of the resampled arrays returning a float, e.g. ``np.mean`` or
            ``lambda p, y: roc_auc_score(y, p)``.
        samples: (N, ...) arrays with one row per subject, all of the same length N.
        num_resamples: number of bootstrap resamples.
        confidence: coverage of the interval, in (0, 1).
        seed: seed of the resampling.

    Returns:
        ``(low, high)``; ``(nan, nan)`` for no subject or when fewer than half of the resamples give a value.

    Example::

        >>> dice = np.array([0.91, 0.85, 0.88, 0.79, 0.93])
        >>> low, high = bootstrap_interval(np.mean, dice)
    """
    if not samples:
        raise ValueError("bootstrap_interval needs at least one sample array.")
    arrays = [np.asarray(s) for s in samples]
    size = len(arrays[0])
    if any(len(a) != size for a in arrays):
        raise ValueError(f"bootstrap samples must have the same length, got {[len(a) for a in arrays]}.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    if size == 0 or num_resamples < 1:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_resamples):
        index = rng.integers(0, size, size)
        value = float(statistic(*(a[index] for a in arrays)))
        if not math.isnan(value):
            values.append(value)
    if len(values) < num_resamples / 2:
        return math.nan, math.nan
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return float(low), float(high)
