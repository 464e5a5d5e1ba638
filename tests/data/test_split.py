import itertools
import random
import re

import pytest

from medsegdiff_monai.data import (
    class_balance,
    class_balance_line,
    grade_class_weights,
    patient_of,
    stratified_split,
)

IDS = [f"BraTS20_Training_{i:03d}" for i in range(1, 370)]
GRADES = [0] * 76 + [1] * 293  # the real release: 76 LGG, 293 HGG


def test_stratified_split_of_the_release():
    train, val, test = stratified_split(IDS, GRADES, val_fraction=0.2, seed=0)
    assert test == []
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
    with pytest.raises(ValueError, match="test_fraction must be"):
        stratified_split(["a", "b"], [0, 1], test_fraction=-0.1)
    with pytest.raises(ValueError, match="must be < 1"):
        stratified_split(IDS, GRADES, val_fraction=0.5, test_fraction=0.5)


def test_held_out_test_split_of_the_release():
    split = stratified_split(IDS, GRADES, val_fraction=0.2, seed=0, test_fraction=0.1)
    train, val, test = split
    assert sorted(train + val + test) == IDS
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    grade_of = dict(zip(IDS, GRADES, strict=True))

    def counts(ids):
        return sum(grade_of[s] == 0 for s in ids), sum(grade_of[s] == 1 for s in ids)

    # per grade: test round(76 * 0.1) = 8, round(293 * 0.1) = 29; validation 15 and 59 as in the two-way split
    assert counts(test) == (8, 29) and counts(val) == (15, 59) and counts(train) == (53, 205)
    assert split == stratified_split(list(reversed(IDS)), list(reversed(GRADES)), 0.2, 0, test_fraction=0.1)


@pytest.mark.parametrize(
    ("val_fraction", "test_fraction", "message"),
    [
        (0.3, 0.1, "--test-fraction 0.1 of 2 LGG and 6 HGG subjects gives 0 testing LGG subjects (round(2 * 0.1) = 0)"),
        (0.1, 0.3, "--val-fraction 0.1 of 2 LGG and 6 HGG subjects gives 0 validation LGG subjects (round(2 * 0.1)"),
        (0.0, 0.75, "the training split would have no LGG subject (n_LGG=0 n_HGG=2 of 8 subjects"),
    ],
)
def test_a_split_without_both_grades_is_refused(val_fraction, test_fraction, message):
    # 2 LGG and 6 HGG: a fraction of 0.1 takes round(0.2) = 0 LGG and round(0.6) = 1 HGG; 0.3 takes 1 and 2;
    # 0.75 takes round(1.5) = 2 and round(4.5) = 4 (round half to even), leaving training 0 LGG and 2 HGG
    ids, grades = [f"s{i}" for i in range(8)], [0, 0, 1, 1, 1, 1, 1, 1]
    with pytest.raises(ValueError, match=re.escape(message)):
        stratified_split(ids, grades, val_fraction=val_fraction, seed=0, test_fraction=test_fraction)


def test_data_without_a_grade_is_refused_naming_what_is_missing():
    ids = [f"s{i}" for i in range(6)]
    with pytest.raises(ValueError) as error:
        stratified_split(ids, [1] * 6, val_fraction=0.34, seed=0)
    assert "the training split would have no LGG subject (n_LGG=0 n_HGG=4 of 6 subjects" in str(error.value)
    assert str(error.value).endswith("every split needs both grades: the data holds no LGG subject: add some.")


def test_alpha_of_the_whole_release():
    weights = grade_class_weights(GRADES)
    assert round(weights["alpha_LGG"], 3) == 2.428 and round(weights["alpha_HGG"], 3) == 0.630
    assert weights["alpha_LGG"] == pytest.approx(369 / 152) and weights["alpha_HGG"] == pytest.approx(369 / 586)
    assert list(weights) == ["alpha_LGG", "alpha_HGG"]  # class-index order, as a focal loss weight expects


def test_alpha_of_the_training_split():
    train = stratified_split(IDS, GRADES, val_fraction=0.2, seed=0).training
    grade_of = dict(zip(IDS, GRADES, strict=True))
    balance = class_balance([grade_of[s] for s in train])
    assert balance == {"n_LGG": 61, "n_HGG": 234, "alpha_LGG": 295 / 122, "alpha_HGG": 295 / 468}
    line = class_balance_line(balance)
    assert line == f"n_LGG=61 n_HGG=234 alpha_LGG={295 / 122:.3f} alpha_HGG={295 / 468:.3f}"


def test_alpha_undefined_without_a_class():
    with pytest.raises(ValueError, match="no LGG subject"):
        grade_class_weights([1, 1, 1])


def _timepoint_ids(num_patients: int) -> tuple[list[str], list[int]]:
    """BraTS 2023 ids of ``num_patients`` patients with one to three timepoints each; every fourth patient is LGG."""
    rng = random.Random(0)
    ids, grades = [], []
    for patient in range(num_patients):
        for timepoint in range(rng.randint(1, 3)):
            ids.append(f"BraTS-GLI-{patient:05d}-{timepoint:03d}")
            grades.append(int(patient % 4 != 0))
    return ids, grades


@pytest.mark.parametrize("seed", range(5))
def test_the_timepoints_of_a_patient_stay_in_one_split(seed):
    ids, grades = _timepoint_ids(20)  # 5 LGG and 15 HGG patients
    assert len(ids) > 30
    split = stratified_split(ids, grades, val_fraction=0.2, seed=seed, test_fraction=0.2)
    assert sorted(sum(split, [])) == sorted(ids)
    patients = [{patient_of(s) for s in part} for part in split]
    assert all(a.isdisjoint(b) for a, b in itertools.combinations(patients, 2))
    # the fractions count patients: round(5 * 0.2) = 1 LGG and round(15 * 0.2) = 3 HGG in each held-out split
    assert [len(part) for part in patients] == [12, 4, 4]


def test_a_patient_with_two_grades_is_refused():
    ids, grades = _timepoint_ids(8)
    ids, grades = [*ids, "BraTS-GLI-00000-009"], [*grades, 1]  # patient 0 is LGG
    message = "the subjects of patient BraTS-GLI-00000 have different grades (BraTS-GLI-00000-000 LGG, "
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        stratified_split(ids, grades, val_fraction=0.25, seed=0)
    assert "BraTS-GLI-00000-009 HGG); a patient's timepoints share one grade" in str(error.value)


@pytest.mark.parametrize(
    ("ids", "val_fraction", "test_fraction", "message"),
    [
        (
            [f"s{i}" for i in range(8)],
            0.25,
            0.05,
            "split: --test-fraction 0.05 of 4 LGG and 4 HGG subjects gives 0 testing LGG subjects "
            "(round(4 * 0.05) = 0); pass --test-fraction from 0.13 to 0.62, or 0 for no testing list.",
        ),
        (
            [f"s{i}" for i in range(8)],
            0.05,
            0.25,
            "split: --val-fraction 0.05 of 4 LGG and 4 HGG subjects gives 0 validation LGG subjects "
            "(round(4 * 0.05) = 0); pass --val-fraction from 0.13 to 0.62.",
        ),
        (
            [f"BraTS-GLI-{i // 2:05d}-{i % 2:03d}" for i in range(8)],
            0.25,
            0.1,
            "split: --test-fraction 0.1 of 2 LGG and 2 HGG patients (8 subjects) gives 0 testing LGG patients "
            "(round(2 * 0.1) = 0); no fraction holds out one patient of each grade and leaves one for training beside "
            "--val-fraction 0.25: lower --val-fraction, or use more subjects, or 0 for no testing list.",
        ),
    ],
)
def test_a_fraction_that_holds_out_no_patient_is_refused(ids, val_fraction, test_fraction, message):
    grades = [0, 0, 1, 1, 0, 0, 1, 1]  # the two timepoints of a patient share its grade
    with pytest.raises(ValueError, match=re.escape(message)):
        stratified_split(ids, grades, val_fraction=val_fraction, seed=0, test_fraction=test_fraction)


def test_both_lists_refused_in_one_message_and_both_suggestions_followed_split():
    """Where neither held-out list would hold a patient of each grade, one refusal names both, and each suggested
    range assumes the other list holds one: both lowest suggestions together split, and so does the highest of
    each beside the lowest of the other."""
    ids, grades = [f"s{i}" for i in range(13)], [0] * 3 + [1] * 10
    with pytest.raises(ValueError) as error:
        stratified_split(ids, grades, val_fraction=0.1, seed=0, test_fraction=0.05)
    message = str(error.value)
    assert "--val-fraction 0.1 of 3 LGG and 10 HGG subjects gives 0 validation LGG subjects" in message
    assert "--test-fraction 0.05 of 3 LGG and 10 HGG subjects gives 0 testing LGG subjects" in message
    ranges = {
        option: tuple(float(x) for x in found.split(" to "))
        for option, found in re.findall(r"pass (--\S+) from (\d+\.\d+ to \d+\.\d+)", message)
    }
    assert set(ranges) == {"--val-fraction", "--test-fraction"}
    (val_low, val_high), (test_low, test_high) = ranges["--val-fraction"], ranges["--test-fraction"]
    for val_fraction, test_fraction in ((val_low, test_low), (val_high, test_low), (val_low, test_high)):
        split = stratified_split(ids, grades, val_fraction=val_fraction, seed=0, test_fraction=test_fraction)
        for part in split:
            assert {grades[ids.index(s)] for s in part} == {0, 1}


@pytest.mark.parametrize(
    ("grades", "val_fraction", "test_fraction", "message"),
    [
        ([0] + [1] * 7, 0.05, 0.0, "no fraction holds out one patient of each grade and leaves one for training"),
        ([0, 0, 1, 1], 0.5, 0.1, "no fraction holds out one patient of each grade and leaves one for training"),
        ([0, 0] + [1] * 6, 0.05, 0.0, "pass --val-fraction from 0.26 to 0.74"),
        ([0] * 3 + [1] * 9, 0.05, 0.2, "pass --val-fraction from 0.17 to 0.49"),
        (
            [0] * 3 + [1] * 9,
            0.05,
            0.5,
            "beside --test-fraction 0.5: lower --test-fraction, or use more subjects",
        ),
    ],
)
def test_the_suggested_fractions_work_or_none_is_suggested(grades, val_fraction, test_fraction, message):
    """Each end of the range a refusal suggests holds out a patient of each grade and leaves each a training
    patient, given the other list's share, and the next step beyond either end does not: followed, it splits;
    where no fraction can, the refusal says so, and says to lower the other list's share where that helps."""
    ids = [f"s{i}" for i in range(len(grades))]
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        stratified_split(ids, grades, val_fraction=val_fraction, seed=0, test_fraction=test_fraction)
    if "pass" not in message:
        return
    low, high = (float(x) for x in str(error.value).split("from ")[-1].rstrip(".").split(" to "))
    for suggested in (low, high):
        split = stratified_split(ids, grades, val_fraction=suggested, seed=0, test_fraction=test_fraction)
        assert {grades[ids.index(s)] for s in split.validation} == {0, 1}
        assert {grades[ids.index(s)] for s in split.training} == {0, 1}
    for outside in (round(low - 0.01, 2), round(high + 0.01, 2)):
        with pytest.raises(ValueError):
            stratified_split(ids, grades, val_fraction=outside, seed=0, test_fraction=test_fraction)
