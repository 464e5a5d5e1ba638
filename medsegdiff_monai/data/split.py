"""Patient-level stratified split (training / validation / testing) and the training split's grade class balance."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from medsegdiff_monai.data.layout import GRADE_TO_INDEX, INDEX_TO_GRADE, subjects_by_patient

__all__ = [
    "SubjectSplit",
    "class_balance",
    "class_balance_line",
    "grade_class_weights",
    "held_out_count",
    "held_out_counts",
    "stratified_split",
]


class SubjectSplit(NamedTuple):
    """Subject ids of each split, each list sorted; the three are disjoint.

    Attributes:
        training: subjects the network is trained on.
        validation: subjects for checkpoint selection and the grade calibration.
        testing: held-out subjects, used for nothing but the final evaluation (empty without a test fraction).
    """

    training: list[str]
    validation: list[str]
    testing: list[str]


def _grade_counts(grades: Sequence[int]) -> dict[str, int]:
    return {name: sum(1 for g in grades if g == index) for name, index in GRADE_TO_INDEX.items()}


def _counted(num_patients: int, num_subjects: int, by_group: Mapping[str, int] | None = None) -> str:
    """``"6 subjects"``, or ``"4 patients (6 subjects)"`` where patients have several subjects (timepoints); with
    ``by_group`` (patients per grade) ``"2 LGG and 4 HGG subjects"`` or ``"1 LGG and 3 HGG patients (6 subjects)"``."""
    counted = " and ".join(f"{size} {name}" for name, size in by_group.items()) if by_group else str(num_patients)
    if num_patients == num_subjects:
        return f"{counted} subjects"
    return f"{counted} patients ({num_subjects} subjects)"


_FRACTION_OPTIONS: dict[str, str] = {"validation": "--val-fraction", "testing": "--test-fraction"}


def _working_fractions(group_sizes: Sequence[int], other_fraction: float) -> list[float]:
    """The fractions in steps of 0.01 that hold out at least one patient of each group and leave each group a
    training patient beside the other list, in increasing order (they form one range). The other list holds
    ``round(n * other_fraction)`` patients of a group of ``n``, and at least one where ``other_fraction`` is above 0
    (it is refused otherwise)."""

    def other_count(n: int) -> int:
        return max(1, round(n * other_fraction)) if other_fraction > 0 else 0

    return [
        k / 100
        for k in range(1, 100)
        if k / 100 + other_fraction < 1 and all(1 <= round(n * k / 100) <= n - 1 - other_count(n) for n in group_sizes)
    ]


def held_out_count(
    split: str,
    fraction: float,
    num_patients: int,
    num_subjects: int,
    group_sizes: Mapping[str, int] | None = None,
    other_fraction: float = 0.0,
) -> int:
    """Number of patients a held-out list takes, ``round(num_patients * fraction)``; a fraction above 0 that takes
    none (the list asked for would be empty), or none of a group that is split on its own, is refused.

    Args:
        split: the list, ``"validation"`` or ``"testing"``.
        fraction: its share (``--val-fraction`` / ``--test-fraction``).
        num_patients: the patients split (see :func:`~medsegdiff_monai.data.layout.patient_of`).
        num_subjects: their subjects (named in the error where they outnumber the patients).
        group_sizes: the patients of each group that is split on its own by name (each grade of a stratified split,
            ``{"LGG": 3, "HGG": 9}``), each of which the list must hold one of; default: all patients together.
        other_fraction: the share of the other held-out list, so that the suggested fractions leave each group a
            training patient.

    Raises:
        ValueError: naming the option, the fraction, the numbers of patients and subjects (and the group left
            out), and the range of fractions that hold one patient out (of each group) and leave one for training,
            or what else to change.
    """
    count = int(round(num_patients * fraction))
    groups = dict(group_sizes) if group_sizes else {"": num_patients}
    empty = [name for name, size in groups.items() if size > 0 and round(size * fraction) == 0]
    if fraction <= 0 or not empty:
        return count
    option = _FRACTION_OPTIONS[split]
    unit = "subjects" if num_patients == num_subjects else "patients"
    sizes = [size for size in groups.values() if size > 0]
    each = " of each grade" if group_sizes else ""
    working = _working_fractions(sizes, other_fraction)
    if working:
        low, high = working[0], working[-1]
        instead = f"pass {option} {low:g}" if low == high else f"pass {option} from {low:g} to {high:g}"
    elif other_fraction > 0 and _working_fractions(sizes, 0.0):
        other = _FRACTION_OPTIONS["testing" if split == "validation" else "validation"]
        instead = (
            f"no fraction holds out one patient{each} and leaves one for training beside {other} "
            f"{other_fraction:g}: lower {other}, or use more subjects"
        )
    else:
        instead = f"no fraction holds out one patient{each} and leaves one for training: use more subjects"
    instead += ", or 0 for no testing list" if split == "testing" else ""
    if group_sizes:
        name, size = empty[0], groups[empty[0]]
        gives = f"gives 0 {split} {name} {unit} (round({size} * {fraction}) = 0)"
    else:
        gives = f"gives 0 {split} {unit} (round({num_patients} * {fraction}) = 0)"
    raise ValueError(
        f"split: {option} {fraction} of {_counted(num_patients, num_subjects, group_sizes)} {gives}; {instead}."
    )


def held_out_counts(
    val_fraction: float,
    test_fraction: float,
    num_patients: int,
    num_subjects: int,
    group_sizes: Mapping[str, int] | None = None,
) -> tuple[int, int]:
    """:func:`held_out_count` of the validation and the testing list together.

    Returns:
        the numbers of validation and testing patients.

    Raises:
        ValueError: with the refusal of each list that holds out no patient (of a group), both where both do.
    """
    counts, refusals = {}, []
    for split, fraction, other in (
        ("validation", val_fraction, test_fraction),
        ("testing", test_fraction, val_fraction),
    ):
        try:
            counts[split] = held_out_count(split, fraction, num_patients, num_subjects, group_sizes, other)
        except ValueError as refusal:
            refusals.append(str(refusal))
    if refusals:
        raise ValueError(" ".join(refusals))
    return counts["validation"], counts["testing"]


def stratified_split(
    subject_ids: Sequence[str],
    grades: Sequence[int],
    val_fraction: float = 0.2,
    seed: int = 0,
    test_fraction: float = 0.0,
) -> SubjectSplit:
    """Split subjects into training, validation and testing by patient, stratified by grade, deterministic from
    ``seed``.

    The subjects are grouped by patient (:func:`~medsegdiff_monai.data.layout.patient_of`): the timepoints of a
    BraTS 2023+ patient (``BraTS-GLI-00001-000``, ``BraTS-GLI-00001-001``) go to one split together; any other id
    is a patient of its own. Each grade's patients are sorted and shuffled with ``numpy.random.default_rng(seed)``;
    the first ``round(n_grade * test_fraction)`` go to testing, the next ``round(n_grade * val_fraction)`` to
    validation, the rest to training (``n_grade`` counts patients). The result does not depend on the input order.
    With ``test_fraction=0`` the training and validation splits are those of the two-way split of the same seed.

    Args:
        subject_ids: unique subject ids.
        grades: grade index of each subject (LGG 0, HGG 1); a patient's subjects share one grade.
        val_fraction: share of each grade held out for validation, in [0, 1).
        seed: seed of the shuffle.
        test_fraction: share of each grade held out for testing, in [0, 1); ``val_fraction + test_fraction < 1``.

    Returns:
        :class:`SubjectSplit`; together the three lists hold all ``subject_ids``.

    Raises:
        ValueError: on mismatched lengths, repeated ids, grades outside {0, 1}, a patient with subjects of both
            grades, fractions out of range, a fraction above 0 that holds out no patient (see
            :func:`held_out_count`), or when the training split, or a validation / testing split asked for
            (fraction > 0), lacks a grade; the message names the split and its counts.

    Example::

        >>> split = stratified_split(["a", "b", "c", "d", "e", "f"], [0, 1, 1, 1, 0, 0], val_fraction=0.34, seed=0)
        >>> len(split.training), len(split.validation), len(split.testing)
        (4, 2, 0)
    """
    if len(subject_ids) != len(grades):
        raise ValueError(f"split: {len(subject_ids)} subject ids but {len(grades)} grades.")
    if len(set(subject_ids)) != len(subject_ids):
        raise ValueError("split: subject ids must be unique.")
    for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"split: {name} must be in [0, 1), got {fraction}.")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"split: val_fraction + test_fraction must be < 1 to leave training subjects, got {val_fraction} + "
            f"{test_fraction}."
        )
    unknown = sorted({g for g in grades} - set(INDEX_TO_GRADE))
    if unknown:
        raise ValueError(f"split: grades must be 0 (LGG) or 1 (HGG), got {unknown}.")

    grade_of = dict(zip(subject_ids, grades, strict=True))
    subjects_of = subjects_by_patient(subject_ids)
    for patient, members in subjects_of.items():
        if len({grade_of[s] for s in members}) > 1:
            listed = ", ".join(f"{s} {INDEX_TO_GRADE[grade_of[s]]}" for s in members)
            raise ValueError(
                f"split: the subjects of patient {patient} have different grades ({listed}); a patient's timepoints "
                "share one grade: correct the grade table."
            )
    patients_of_grade = {
        grade: sorted(p for p, members in subjects_of.items() if grade_of[members[0]] == grade)
        for grade in sorted(INDEX_TO_GRADE)
    }
    grade_sizes = {INDEX_TO_GRADE[grade]: len(patients) for grade, patients in patients_of_grade.items()}
    held_out_counts(val_fraction, test_fraction, len(subjects_of), len(subject_ids), grade_sizes)

    rng = np.random.default_rng(seed)
    parts: dict[str, list[str]] = {"training": [], "validation": [], "testing": []}
    for members in patients_of_grade.values():
        order = [members[i] for i in rng.permutation(len(members))]
        n_test = int(round(len(members) * test_fraction))
        n_val = int(round(len(members) * val_fraction))
        for name, patients in (
            ("testing", order[:n_test]),
            ("validation", order[n_test : n_test + n_val]),
            ("training", order[n_test + n_val :]),
        ):
            parts[name].extend(s for p in patients for s in subjects_of[p])
    for name, fraction in (("training", 1.0), ("validation", val_fraction), ("testing", test_fraction)):
        counts = _grade_counts([grade_of[s] for s in parts[name]])
        missing = [grade for grade, count in counts.items() if count == 0]
        if fraction > 0 and missing:
            absent = [grade for grade in missing if not grade_sizes[grade]]
            remedy = (
                f"the data holds no {' and no '.join(absent)} subject: add some"
                if absent
                else "use more subjects or lower fractions"
            )
            raise ValueError(
                f"split: the {name} split would have no {' and no '.join(missing)} subject "
                f"(n_LGG={counts['LGG']} n_HGG={counts['HGG']} of {_counted(len(subjects_of), len(subject_ids))} with "
                f"val_fraction={val_fraction}, test_fraction={test_fraction}); every split needs both grades: "
                f"{remedy}."
            )
    return SubjectSplit(*(sorted(parts[name]) for name in SubjectSplit._fields))


def grade_class_weights(train_grades: Sequence[int]) -> dict[str, float]:
    """Per-class focal-loss weights from the training split's subject counts: ``alpha_c = N / (2 * n_c)``.

    Args:
        train_grades: grade index of each training subject (LGG 0, HGG 1).

    Returns:
        ``{"alpha_LGG": ..., "alpha_HGG": ...}``; e.g. 76 LGG and 293 HGG give 2.428 and 0.630.

    Raises:
        ValueError: when a grade has no training subject (its alpha is undefined).
    """
    grades = list(train_grades)
    weights = {}
    for name, count in _grade_counts(grades).items():
        if count == 0:
            raise ValueError(
                f"the training split has no {name} subject ({len(grades)} training subjects): alpha_{name} is "
                "undefined. Use more subjects, another seed or a smaller val_fraction."
            )
        weights[f"alpha_{name}"] = len(grades) / (2.0 * count)
    return weights


def class_balance(train_grades: Sequence[int]) -> dict[str, float]:
    """The class balance of the training split, the one source of the grade loss weights and the printed counts.

    Args:
        train_grades: grade index of each training subject (LGG 0, HGG 1).

    Returns:
        ``{"n_LGG", "n_HGG", "alpha_LGG", "alpha_HGG"}`` (see :func:`grade_class_weights`), as stored under
        ``class_balance`` in ``datalist.json`` and read by the training workflow.
    """
    grades = list(train_grades)
    balance: dict[str, float] = {f"n_{name}": count for name, count in _grade_counts(grades).items()}
    balance.update(grade_class_weights(grades))
    return balance


def class_balance_line(balance: Mapping[str, float]) -> str:
    """The line printed by ``datalist``, e.g. ``n_LGG=61 n_HGG=234 alpha_LGG=2.418 alpha_HGG=0.630``.

    Args:
        balance: the output of :func:`class_balance`.
    """
    return (
        f"n_LGG={balance['n_LGG']} n_HGG={balance['n_HGG']} "
        f"alpha_LGG={balance['alpha_LGG']:.3f} alpha_HGG={balance['alpha_HGG']:.3f}"
    )
