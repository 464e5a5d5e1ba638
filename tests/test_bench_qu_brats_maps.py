"""``benchmarks/bench_qu_brats_maps.py`` scores each map kind on the same samples against a map of 0."""

from __future__ import annotations

import numpy as np
import pytest
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_qu_brats_maps")


def _subject(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A 1-D subject of 200 voxels per region: the truth, a prediction missing a third of it, probabilities that
    put the missed voxels at 0.3-0.45 and the rest far from 0.5, and a spread on the prediction's border."""
    truth = np.zeros((3, 200), dtype=bool)
    truth[:, 20:80] = True
    predicted = truth.copy()
    predicted[:, 60:80] = False
    probability = np.where(predicted, 0.95, 0.02)
    probability[:, 60:80] = rng.uniform(0.3, 0.45, size=(3, 20))
    std = np.where(predicted, rng.uniform(0.1, 0.4, size=(3, 200)), 0.0)  # the members disagree inside only
    return {"probability": probability, "std": std, "predicted": predicted, "truth": truth, "brain": np.ones(200, bool)}


def test_each_kind_is_scored_against_the_zeros_of_dice_plus_two_over_three(bench):
    subjects = [_subject(np.random.default_rng(seed)) for seed in range(4)]
    scores = bench.score_kinds(subjects, bench.map_kinds())
    # a map of 0 filters nothing: (Dice + 2) / 3, Dice = 2 * 40 / (40 + 60) by hand
    np.testing.assert_allclose(scores["zeros"], (0.8 + 2) / 3)
    table = bench.summarise(scores)
    assert table["zeros"]["mean"]["difference_to_zeros"] == 0
    # flagging the missed voxels only gains; flagging the right ones inside the prediction costs true positives
    near_miss, std = table["near_miss"]["mean"], table["ensemble_std"]["mean"]
    assert near_miss["difference_to_zeros"] > 0 and near_miss["ci95"][0] > 0
    assert std["difference_to_zeros"] < 0 and std["ci95"][1] < 0
    assert table["ensemble_std_inside0"]["mean"]["score"] == pytest.approx(table["zeros"]["mean"]["score"])
    difference = scores["near_miss"][:, 3] - scores["zeros"][:, 3]
    assert near_miss["difference_to_zeros"] == pytest.approx(difference.mean())
