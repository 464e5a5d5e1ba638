"""Subject-level stratified split and the grade class weights derived from the training split."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medsegdiff_monai.data.layout import GRADE_TO_INDEX, INDEX_TO_GRADE

__all__ = ["class_balance_line", "grade_class_weights", "stratified_split"]


def stratified_split(
    subject_ids: Sequence[str], grades: Sequence[int], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Split subjects into training and validation, stratified by grade, deterministic from ``seed``.

    Each grade's subjects are sorted by id, shuffled with ``numpy.random.default_rng(seed)`` and the first
    ``round(n_grade * val_fraction)`` go to validation; the result does not depend on the input order.

    Args:
        subject_ids: unique subject ids.
        grades: grade index of each subject (LGG 0, HGG 1).
        val_fraction: share of each grade held out for validation, in [0, 1).
        seed: seed of the shuffle.

    Returns:
        (training ids, validation ids), each sorted, disjoint, together all ``subject_ids``.

    Raises:
        ValueError: on mismatched lengths, repeated ids, grades outside {0, 1} or ``val_fraction`` outside [0, 1).

    Example::

        >>> train, val = stratified_split(["a", "b", "c", "d", "e"], [0, 1, 1, 1, 0], val_fraction=0.4, seed=0)
        >>> len(train), len(val)
        (3, 2)
    """
    if len(subject_ids) != len(grades):
        raise ValueError(f"split: {len(subject_ids)} subject ids but {len(grades)} grades.")
    if len(set(subject_ids)) != len(subject_ids):
        raise ValueError("split: subject ids must be unique.")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"split: val_fraction must be in [0, 1), got {val_fraction}.")
    unknown = sorted({g for g in grades} - set(INDEX_TO_GRADE))
    if unknown:
        raise ValueError(f"split: grades must be 0 (LGG) or 1 (HGG), got {unknown}.")

    rng = np.random.default_rng(seed)
    train: list[str] = []
    val: list[str] = []
    for grade in sorted(INDEX_TO_GRADE):
        members = sorted(s for s, g in zip(subject_ids, grades, strict=True) if g == grade)
        order = rng.permutation(len(members))
        n_val = int(round(len(members) * val_fraction))
        val.extend(members[i] for i in order[:n_val])
        train.extend(members[i] for i in order[n_val:])
    return sorted(train), sorted(val)


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
    for name, index in GRADE_TO_INDEX.items():
        count = sum(1 for g in grades if g == index)
        if count == 0:
            raise ValueError(
                f"the training split has no {name} subject ({len(grades)} training subjects): alpha_{name} is "
                "undefined. Use more subjects, another seed or a smaller val_fraction."
            )
        weights[f"alpha_{name}"] = len(grades) / (2.0 * count)
    return weights


def class_balance_line(train_grades: Sequence[int]) -> str:
    """The line printed at the start of training, e.g. ``n_LGG=61 n_HGG=234 alpha_LGG=2.418 alpha_HGG=0.630``.

    Args:
        train_grades: grade index of each training subject (LGG 0, HGG 1).
    """
    grades = list(train_grades)
    weights = grade_class_weights(grades)
    counts = {name: sum(1 for g in grades if g == index) for name, index in GRADE_TO_INDEX.items()}
    return (
        f"n_LGG={counts['LGG']} n_HGG={counts['HGG']} "
        f"alpha_LGG={weights['alpha_LGG']:.3f} alpha_HGG={weights['alpha_HGG']:.3f}"
    )
