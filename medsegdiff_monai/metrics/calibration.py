"""Calibration of a binary probability: Brier score, reliability-diagram bins and their picture, and the ECE that
sampling noise alone gives."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["brier_score", "calibrated_ece_floor", "reliability_bins", "reliability_diagram"]


def _as_probability(p_positive: Sequence[float] | np.ndarray, name: str = "p_positive") -> np.ndarray:
    """``p_positive`` as a float64 vector of probabilities.

    Raises:
        ValueError: naming ``name``, for NaN or a value outside [0, 1].
    """
    p = np.asarray(p_positive, dtype=np.float64).reshape(-1)
    if np.isnan(p).any():
        raise ValueError(f"{name} holds NaN for {int(np.isnan(p).sum())} of {p.size} subjects.")
    if p.size and (p.min() < 0.0 or p.max() > 1.0):
        raise ValueError(f"{name} must lie in [0, 1], got values from {p.min()} to {p.max()}.")
    return p


def _as_pair(
    p_positive: Sequence[float] | np.ndarray,
    target: Sequence[int] | np.ndarray,
    names: tuple[str, str] = ("p_positive", "target"),
) -> tuple[np.ndarray, np.ndarray]:
    """``p_positive`` (see :func:`_as_probability`) and ``target`` as an int vector of the same length.

    Raises:
        ValueError: naming ``names``, for a length mismatch, or a target other than 0 and 1 (a fraction is not
            truncated, a class name such as "LGG" is not read).
    """
    p = _as_probability(p_positive, names[0])
    try:
        y = np.asarray(target, dtype=np.float64).reshape(-1)
    except ValueError:
        shown = [str(value) for value in np.asarray(target).reshape(-1)[:5]]
        raise ValueError(f"{names[1]} must hold 0 (LGG) or 1 (HGG), got {shown}.") from None
    if p.shape != y.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same length, got {p.size} and {y.size}.")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"{names[1]} must hold 0 (LGG) or 1 (HGG), got values {sorted(set(y.tolist()))}.")
    return p, y.astype(int)


def _bin_index(p: np.ndarray, num_bins: int) -> np.ndarray:
    """Equal-width bin of each probability: ``[k/n, (k+1)/n)``, the last bin closed."""
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}.")
    return np.minimum((p * num_bins).astype(int), num_bins - 1)


def brier_score(p_positive: Sequence[float] | np.ndarray, target: Sequence[int] | np.ndarray) -> float:
    """
    Brier score ``mean((p - y)^2)`` of a binary probability: 0 is perfect, 0.25 is a constant p = 0.5.

    Args:
        p_positive: (N,) predicted probability of class 1 (e.g. p(HGG)).
        target: (N,) true class, 0 or 1.

    Returns:
        the score in [0, 1]; NaN for an empty input.
    """
    p, y = _as_pair(p_positive, target)
    return float(np.mean((p - y) ** 2)) if p.size else math.nan


def reliability_bins(
    p_positive: Sequence[float] | np.ndarray, target: Sequence[int] | np.ndarray, num_bins: int = 10
) -> dict[str, list[float] | list[int]]:
    """
    The bins of a reliability diagram: ``[0, 1]`` cut into ``num_bins`` equal-width bins ``[k/n, (k+1)/n)``, the
    last one closed.

    Args:
        p_positive: (N,) predicted probability of class 1.
        target: (N,) true class, 0 or 1.
        num_bins: number of bins.

    Returns:
        ``{"edges": [num_bins + 1], "count": [num_bins], "mean_predicted": [num_bins], "observed": [num_bins]}``:
        per bin the number of subjects, their mean probability and the share of class 1 among them (both NaN for
        an empty bin).
    """
    p, y = _as_pair(p_positive, target)
    index = _bin_index(p, num_bins)
    count = np.bincount(index, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.bincount(index, weights=p, minlength=num_bins) / count
        observed = np.bincount(index, weights=y, minlength=num_bins) / count
    return {
        "edges": np.linspace(0.0, 1.0, num_bins + 1).tolist(),
        "count": count.astype(int).tolist(),
        "mean_predicted": mean_predicted.tolist(),
        "observed": observed.tolist(),
    }


def calibrated_ece_floor(p_positive: Sequence[float] | np.ndarray, num_bins: int = 10) -> float:
    """
    The ECE that a perfectly calibrated predictor with these probabilities is expected to show on this many subjects.

    :func:`~medsegdiff_monai.metrics.expected_calibration_error` on ``N`` subjects is biased upwards: even when every
    subject's true class is drawn with exactly its predicted probability, the observed share of class 1 in a bin
    scatters around the bin's mean probability. This returns ``E[ECE]`` over targets ``y_i ~ Bernoulli(p_i)`` drawn
    independently, computed exactly: the bins (:func:`reliability_bins`) depend on ``p`` alone, and the number of
    class-1 subjects in a bin follows the Poisson-binomial distribution of its probabilities. An ECE measured near
    this value is what sampling noise alone gives; only the excess over it points to miscalibration.

    Args:
        p_positive: (N,) predicted probability of class 1.
        num_bins: number of equal-width bins, as in ``expected_calibration_error``.

    Returns:
        the expected ECE in [0, 1]; NaN for an empty input.
    """
    p = _as_probability(p_positive)
    index = _bin_index(p, num_bins)
    if p.size == 0:
        return math.nan
    expected = 0.0
    for b in np.unique(index):
        members = p[index == b]
        pmf = np.ones(1)  # distribution of the number of class-1 subjects in the bin, one subject at a time
        for q in members:
            pmf = np.concatenate([pmf * (1.0 - q), [0.0]]) + np.concatenate([[0.0], pmf * q])
        gap = np.abs(np.arange(members.size + 1) / members.size - members.mean())
        expected += members.size / p.size * float(np.sum(pmf * gap))
    return expected


def reliability_diagram(bins: dict[str, list], size: int = 360) -> np.ndarray:
    """
    Draw the reliability diagram of :func:`reliability_bins` as an RGB image (no plotting library needed).

    The square plot has the predicted probability on the x axis and the observed frequency of class 1 on the y
    axis, both from 0 (bottom left) to 1, with tick marks at 0, 0.25, 0.5, 0.75 and 1. Per non-empty bin, a blue bar
    rises to the observed frequency and a red band spans the gap between it and the bin's mean predicted
    probability; the grey diagonal is perfect calibration. Under the x axis, grey bars give each bin's share of the
    subjects (the tallest bin fills the strip).

    Args:
        bins: the output of :func:`reliability_bins`.
        size: side of the plot area in pixels.

    Returns:
        (H, W, 3) ``uint8`` image.
    """
    margin, strip = size // 8, size // 8
    height, width = margin + size + strip + margin, margin + size + margin
    image = np.full((height, width, 3), 255, dtype=np.uint8)
    bottom = margin + size  # pixel row of y = 0

    def row(y: float) -> int:
        return int(round(bottom - y * size))

    def col(x: float) -> int:
        return int(round(margin + x * size))

    edges, counts = bins["edges"], bins["count"]
    largest = max(max(counts), 1)
    for k, n in enumerate(counts):
        left, right = col(edges[k]) + 1, col(edges[k + 1]) - 1
        if right <= left:
            right = left + 1
        if n:
            observed, predicted = bins["observed"][k], bins["mean_predicted"][k]
            image[row(observed) : bottom, left:right] = (70, 130, 190)
            top, low = sorted((row(observed), row(predicted)))
            band = image[top : max(low, top + 2), left:right].astype(np.float64)
            image[top : max(low, top + 2), left:right] = (0.45 * band + 0.55 * np.array([220, 50, 50])).astype(np.uint8)
            strip_top = bottom + strip - int(round((strip - 4) * n / largest))
            image[strip_top : bottom + strip, left:right] = (160, 160, 160)
    for x in np.linspace(0.0, 1.0, 4 * size):  # the diagonal
        image[row(x) - 1 : row(x) + 1, col(x) - 1 : col(x) + 1] = (90, 90, 90)
    for x in (0.0, 0.25, 0.5, 0.75, 1.0):  # tick marks
        image[bottom : bottom + 6, col(x) - 1 : col(x) + 1] = 0
        image[row(x) - 1 : row(x) + 1, margin - 6 : margin] = 0
    image[margin - 1 : bottom + 1, [margin - 1, margin + size]] = 0  # frame
    image[[margin - 1, bottom], margin - 1 : margin + size + 1] = 0
    return image
