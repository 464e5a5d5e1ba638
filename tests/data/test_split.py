import random

import pytest

from medsegdiff_monai.data import class_balance_line, grade_class_weights, stratified_split

IDS = [f"BraTS20_Training_{i:03d}" for i in range(1, 370)]
GRADES = [0] * 76 + [1] * 293  # the real release: 76 LGG, 293 HGG


def test_stratified_split_of_the_release():
    train, val = stratified_split(IDS, GRADES, val_fraction=0.2, seed=0)
    assert set(train).isdisjoint(val) and sorted(train + val) == IDS
    grade_of = dict(zip(IDS, GRADES, strict=True))
    # round(76 * 0.2) = 15 and round(293 * 0.2) = 59 per grade go to validation
    assert sum(grade_of[s] == 0 for s in val) == 15 and sum(grade_of[s] == 1 for s in val) == 59
    assert sum(grade_of[s] == 0 for s in train) == 61 and sum(grade_of[s] == 1 for s in train) == 234


def test_split_is_deterministic_and_order_independent():
    first = stratified_split(IDS, GRADES, seed=3)
    pairs = list(zip(IDS, GRADES, strict=True))
    random.Random(1).shuffle(pairs)
    shuffled = stratified_split([p[0] for p in pairs], [p[1] for p in pairs], seed=3)
    assert first == shuffled
    assert stratified_split(IDS, GRADES, seed=4) != first


def test_split_input_checks():
    with pytest.raises(ValueError, match="unique"):
        stratified_split(["a", "a"], [0, 1])
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_split(["a", "b"], [0, 1], val_fraction=1.0)
    with pytest.raises(ValueError, match="grades must be 0"):
        stratified_split(["a", "b"], [0, 2])
    with pytest.raises(ValueError, match="2 grades"):
        stratified_split(["a"], [0, 1])


def test_alpha_of_the_whole_release():
    weights = grade_class_weights(GRADES)
    assert round(weights["alpha_LGG"], 3) == 2.428 and round(weights["alpha_HGG"], 3) == 0.630
    assert weights["alpha_LGG"] == pytest.approx(369 / 152) and weights["alpha_HGG"] == pytest.approx(369 / 586)
    assert list(weights) == ["alpha_LGG", "alpha_HGG"]  # class-index order, as a focal loss weight expects


def test_alpha_of_the_training_split():
    train, _ = stratified_split(IDS, GRADES, val_fraction=0.2, seed=0)
    grade_of = dict(zip(IDS, GRADES, strict=True))
    line = class_balance_line([grade_of[s] for s in train])
    assert line == f"n_LGG=61 n_HGG=234 alpha_LGG={295 / 122:.3f} alpha_HGG={295 / 468:.3f}"


def test_alpha_undefined_without_a_class():
    with pytest.raises(ValueError, match="no LGG subject"):
        grade_class_weights([1, 1, 1])
