"""Build, write and load the MONAI datalist JSON of a BraTS split."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medsegdiff_monai.data.files import write_text_atomically
from medsegdiff_monai.data.layout import BratsSubject, subjects_by_patient
from medsegdiff_monai.data.split import class_balance, held_out_counts, stratified_split

__all__ = [
    "build_datalist",
    "build_segmentation_datalist",
    "check_datalist_path",
    "load_brats_datalist",
    "subject_entry",
    "write_datalist",
]


def subject_entry(subject: BratsSubject, data_dir: str | Path) -> dict[str, Any]:
    """Datalist entry of one subject, paths relative to ``data_dir`` (POSIX separators).

    Args:
        subject: the subject's files and grade.
        data_dir: the data root the paths are made relative to.

    Returns:
        ``{"image": [t1, t1ce, t2, flair], "label": seg, "grade": 0|1, "subject_id": id}``; ``label`` and ``grade``
        are left out where the subject has none.
    """
    root = Path(data_dir)
    entry: dict[str, Any] = {"image": [Path(p).relative_to(root).as_posix() for p in subject.images]}
    if subject.label is not None:
        entry["label"] = Path(subject.label).relative_to(root).as_posix()
    if subject.grade is not None:
        entry["grade"] = int(subject.grade)
    entry["subject_id"] = subject.subject_id
    return entry


def build_datalist(
    subjects: Sequence[BratsSubject],
    data_dir: str | Path,
    val_fraction: float = 0.2,
    seed: int = 0,
    test_fraction: float = 0.0,
) -> dict[str, Any]:
    """MONAI datalist of a patient-level split stratified by grade (see :func:`stratified_split`): the timepoints of a
    BraTS 2023+ patient are all in one list.

    Args:
        subjects: validated subjects with grades (e.g. from :func:`read_brats_folder`).
        data_dir: the data root; entry paths are relative to it.
        val_fraction: share of each grade's patients in the validation split.
        seed: seed of the split.
        test_fraction: share of each grade's patients in the held-out ``testing`` split (0: no ``testing`` key).

    Returns:
        ``{"training": [...], "validation": [...], "testing": [...], "class_balance": {...}, "split": {...}}``;
        ``testing`` only with ``test_fraction > 0``; ``class_balance`` is :func:`class_balance` of the training
        split (``n_LGG``, ``n_HGG``, ``alpha_LGG``, ``alpha_HGG``).

    Raises:
        ValueError: when a subject has no grade, a patient's subjects differ in grade, a fraction above 0 holds out
            no patient, or a split lacks a grade (the message names the split and counts).
    """
    ungraded = [s.subject_id for s in subjects if s.grade is None]
    if subjects and len(ungraded) == len(subjects):
        return build_segmentation_datalist(subjects, data_dir, val_fraction, seed, test_fraction)
    if ungraded:
        raise ValueError(f"datalist: subjects without grade: {', '.join(ungraded)}.")
    by_id = {s.subject_id: s for s in subjects}
    split = stratified_split(
        list(by_id), [s.grade for s in by_id.values()], val_fraction, seed, test_fraction=test_fraction
    )
    datalist: dict[str, Any] = {
        "training": [subject_entry(by_id[s], data_dir) for s in split.training],
        "validation": [subject_entry(by_id[s], data_dir) for s in split.validation],
    }
    if test_fraction > 0:
        datalist["testing"] = [subject_entry(by_id[s], data_dir) for s in split.testing]
    datalist["class_balance"] = class_balance([by_id[s].grade for s in split.training])
    datalist["split"] = {
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "seed": seed,
        "stratified_by": "grade",
    }
    return datalist


def check_datalist_path(path: str | Path) -> Path:
    """``path`` as a ``Path`` when a datalist can be written there, i.e. it is not a folder.

    Raises:
        IsADirectoryError: naming the folder and the file to give instead.
    """
    out = Path(path)
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder: give the JSON file to write, e.g. {out / 'datalist.json'}.")
    return out


def write_datalist(datalist: dict[str, Any], path: str | Path) -> Path:
    """Write a datalist as indented JSON, atomically (a partly written file never appears at ``path``).

    Args:
        datalist: the datalist dictionary.
        path: output file; its folder is created if needed.

    Returns:
        the path written.

    Raises:
        IsADirectoryError: when ``path`` is a folder, naming the file to give instead.
    """
    out = check_datalist_path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomically(out, json.dumps(datalist, indent=2) + "\n")


def load_brats_datalist(path: str | Path, data_list_key: str = "training", base_dir: str | Path | None = None):
    """Load one list of a datalist with absolute paths, as :func:`monai.data.load_decathlon_datalist` does.

    ``load_decathlon_datalist`` also joins ``base_dir`` to any other value that names an existing path, which turns
    ``subject_id`` into the subject folder's path; this loader keeps ``subject_id`` as written.

    Args:
        path: the datalist JSON.
        data_list_key: ``"training"``, ``"validation"`` or ``"testing"``.
        base_dir: the data root; defaults to the JSON file's folder.

    Returns:
        the list of entries with ``image`` and ``label`` paths joined to ``base_dir``.

    Raises:
        KeyError: when the datalist has no list ``data_list_key``, naming the lists it has.
    """
    from monai.data import load_decathlon_datalist  # MONAI (and torch) load lazily, keeping the CLI quick to start

    with open(path) as f:
        content = json.load(f)
    if data_list_key not in content:
        lists = [key for key, value in content.items() if isinstance(value, list)]
        raise KeyError(f"datalist {path} has no list {data_list_key!r}; its lists: {lists}.")
    raw = content[data_list_key]
    entries = load_decathlon_datalist(path, data_list_key=data_list_key, base_dir=base_dir)
    for entry, original in zip(entries, raw, strict=True):
        if "subject_id" in original:
            entry["subject_id"] = original["subject_id"]
    return entries


def build_segmentation_datalist(
    subjects: Sequence[BratsSubject],
    data_dir: str | Path,
    val_fraction: float = 0.2,
    seed: int = 0,
    test_fraction: float = 0.0,
) -> dict[str, Any]:
    """MONAI datalist of subjects without grades (segmentation only, e.g. BraTS 2021 or 2023 without a grade table).

    The subjects are grouped by patient (:func:`~medsegdiff_monai.data.layout.patient_of`: the timepoints of a
    BraTS 2023+ patient stay in one list; any other id is a patient of its own). The ``n`` patients, sorted, are
    shuffled and split by MONAI's ``partition_dataset`` (seeded), not stratified: the first
    ``round(n * test_fraction)`` shuffled patients are held out for testing, the next ``round(n * val_fraction)``
    validate.

    Args:
        subjects: validated subjects (grades ``None``).
        data_dir: the data root; entry paths are relative to it.
        val_fraction: share of patients in the validation split, in [0, 1).
        seed: seed of the split.
        test_fraction: share of patients in the held-out ``testing`` split (0: no ``testing`` key).

    Returns:
        ``{"training": [...], "validation": [...], ["testing": [...],] "split": {...}}``; the entries have no
        ``grade``.

    Raises:
        ValueError: a fraction out of range, a fraction above 0 that holds out no patient (see
            :func:`held_out_counts`), or a split that leaves no training patient.
    """
    from monai.data import partition_dataset  # MONAI (and torch) load lazily, keeping the CLI quick to start

    if not 0.0 <= val_fraction < 1.0 or not 0.0 <= test_fraction < 1.0:
        raise ValueError(
            f"datalist: val_fraction and test_fraction must be in [0, 1), got {val_fraction} and {test_fraction}."
        )
    by_id = {subject.subject_id: subject for subject in subjects}
    subjects_of = {patient: [by_id[s] for s in ids] for patient, ids in subjects_by_patient(by_id).items()}
    patients = sorted(subjects_of)
    num_val, num_test = held_out_counts(val_fraction, test_fraction, len(patients), len(subjects))
    if patients and num_test + num_val >= len(patients):
        unit = "subjects" if len(patients) == len(subjects) else "patients"
        raise ValueError(
            f"datalist: {len(patients)} {unit}, {num_val} for validation and {num_test} for testing leave none for "
            "training; lower --val-fraction or --test-fraction."
        )
    shuffled = partition_dataset(patients, num_partitions=1, shuffle=True, seed=seed)[0]
    parts = shuffled[:num_test], shuffled[num_test : num_test + num_val], shuffled[num_test + num_val :]
    testing, validation, training = (
        sorted((s for p in part for s in subjects_of[p]), key=lambda s: s.subject_id) for part in parts
    )
    datalist: dict[str, Any] = {
        "training": [subject_entry(s, data_dir) for s in training],
        "validation": [subject_entry(s, data_dir) for s in validation],
    }
    if test_fraction > 0:
        datalist["testing"] = [subject_entry(s, data_dir) for s in testing]
    datalist["split"] = {
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "seed": seed,
        "stratified_by": None,
    }
    return datalist
