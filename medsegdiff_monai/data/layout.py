"""On-disk layouts of the BraTS releases (2018-2022 and 2023+): file names, label conventions, grade-table columns."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

LabelMap = TypeVar("LabelMap")

MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
"""Modality order of the image channels everywhere in the library."""

BRATS_LABEL_VALUES: tuple[int, ...] = (0, 1, 2, 4)
"""Label values of a BraTS 2018-2022 segmentation: background, necrotic/non-enhancing core, oedema, enhancing tumour.
This is also the library's internal convention (training targets are built from it)."""

RELEASES: tuple[str, ...] = ("brats2020", "brats2023")
"""The two file-naming and label conventions: ``"brats2020"`` (BraTS 2018-2022, e.g. 2020 and 2021:
``<id>_{t1,t1ce,t2,flair,seg}.nii[.gz]``, enhancing tumour = 4) and ``"brats2023"`` (BraTS 2023+ glioma:
``<id>-{t1n,t1c,t2w,t2f,seg}.nii.gz``, enhancing tumour = 3)."""

RELEASE_TITLES: dict[str, str] = {"brats2020": "BraTS 2018-2022", "brats2023": "BraTS 2023+"}

MODALITY_FILE_SUFFIXES: dict[str, tuple[str, ...]] = {
    "brats2020": ("_t1", "_t1ce", "_t2", "_flair"),
    "brats2023": ("-t1n", "-t1c", "-t2w", "-t2f"),
}
"""File-name ending (before ``.nii[.gz]``) of each modality of :data:`MODALITIES`, per release."""

LABEL_FILE_SUFFIX: dict[str, str] = {"brats2020": "_seg", "brats2023": "-seg"}

ENHANCING_LABEL: dict[str, int] = {"brats2020": 4, "brats2023": 3}
"""Label value of the enhancing tumour, per release."""

LABEL_VALUES: dict[str, tuple[int, ...]] = {"brats2020": BRATS_LABEL_VALUES, "brats2023": (0, 1, 2, 3)}
"""The label values a segmentation of each release may hold."""

GRADE_TO_INDEX: dict[str, int] = {"LGG": 0, "HGG": 1}
"""Class index of each grade name found in the ``Grade`` column of ``name_mapping.csv``."""

INDEX_TO_GRADE: dict[int, str] = {index: name for name, index in GRADE_TO_INDEX.items()}


def grade_index(value: Any, subject: str = "?") -> int:
    """The class index of a grade: LGG 0, HGG 1.

    Args:
        value: 0, 1, ``"LGG"``, ``"HGG"`` (any case), ``"0"``, ``"1"``, a bool, or a one-element array / tensor of
            those.
        subject: subject id named in the error message.

    Raises:
        ValueError: naming the subject, when the value is not a grade.
    """
    number = None
    if isinstance(value, str):
        text = value.strip()
        number = GRADE_TO_INDEX.get(text.upper(), int(text) if text in ("0", "1") else None)
    else:
        array = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)
        if array.size == 1 and array.dtype.kind in "biuf" and float(array.reshape(())) in (0.0, 1.0):
            number = int(array.reshape(()))
    if number is None:
        raise ValueError(f"subject {subject}: grade {value!r} is not valid: expected 0/'LGG' or 1/'HGG'.")
    return number


NAME_MAPPING_COLUMNS: tuple[str, ...] = (
    "Grade",
    "BraTS_2017_subject_ID",
    "BraTS_2018_subject_ID",
    "TCGA_TCIA_subject_ID",
    "BraTS_2019_subject_ID",
    "BraTS_2020_subject_ID",
)
"""The six columns of the release's ``name_mapping.csv``, in file order."""

SUBJECT_ID_COLUMN = "BraTS_2020_subject_ID"
GRADE_COLUMN = "Grade"
NAME_MAPPING_FILENAME = "name_mapping.csv"
NIFTI_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz")

_TIMEPOINT_ID = re.compile(r"(BraTS(?:-[A-Za-z]+)+-\d+)-\d+")
"""A BraTS 2023+ subject id, ``BraTS-<cohort>-<patient>-<timepoint>``; its group 1 names the patient."""


def patient_of(subject_id: str) -> str:
    """The patient of a subject id: ``BraTS-GLI-00001-001`` -> ``BraTS-GLI-00001`` (BraTS 2023+ ids end in the
    patient's timepoint; -MEN, -PED, -SSA, -MET ... alike); any other id (``BraTS20_Training_001``,
    ``BraTS2021_00000``) is a patient of its own and comes back unchanged.

    Args:
        subject_id: the subject's folder name.
    """
    match = _TIMEPOINT_ID.fullmatch(subject_id)
    return match.group(1) if match is not None else subject_id


def subjects_by_patient(subject_ids: Iterable[str]) -> dict[str, list[str]]:
    """The subject ids of each patient (:func:`patient_of`), each list sorted, patients in order of their first id.

    Args:
        subject_ids: the subjects' folder names.
    """
    grouped: dict[str, list[str]] = {}
    for subject_id in sorted(subject_ids):
        grouped.setdefault(patient_of(subject_id), []).append(subject_id)
    return grouped


_RELEASE_2018_2022_ID = re.compile(r"Bra[Tt][Ss](?:18|19|20|2021)_.+")
"""A BraTS 2018-2022 subject id (``Brats18_...``, ``BraTS19_...``, ``BraTS20_Training_001``, ``BraTS2021_00000``)."""


def release_of_subject_id(subject_id: str) -> str | None:
    """The release whose label convention a subject id belongs to: ``"brats2023"`` for ``BraTS-GLI-00001-000`` and
    the other BraTS 2023+ cohorts, ``"brats2020"`` for the ids of BraTS 2018-2022, ``None`` for any other id.

    Args:
        subject_id: the subject's folder name.
    """
    if _TIMEPOINT_ID.fullmatch(subject_id):
        return "brats2023"
    return "brats2020" if _RELEASE_2018_2022_ID.fullmatch(subject_id) else None


def is_nifti(path: Path) -> bool:
    """Whether ``path`` names a NIfTI file (``.nii`` or ``.nii.gz``, any case)."""
    return path.is_file() and path.name.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    """File name without its ``.nii`` / ``.nii.gz`` suffix."""
    name = path.name
    for suffix in sorted(NIFTI_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def modality_of_file(path: str | Path, bare: bool = False) -> tuple[str, str] | None:
    """``(release, modality)`` of a modality file name in either release's naming (``..._t1ce.nii.gz`` ->
    ``("brats2020", "t1ce")``, ``...-t1c.nii.gz`` -> ``("brats2023", "t1ce")``), or ``None`` for another name.

    Args:
        path: the file.
        bare: also read a name that is the modality alone (``FLAIR.nii`` -> ``("brats2020", "flair")``,
            ``t1c.nii.gz`` -> ``("brats2023", "t1ce")``).
    """
    stem = nifti_stem(Path(path)).lower()
    for release, suffixes in MODALITY_FILE_SUFFIXES.items():
        for modality, suffix in zip(MODALITIES, suffixes, strict=True):
            if stem.endswith(suffix) or (bare and stem == suffix[1:]):
                return release, modality
    return None


def release_of_file(path: str | Path, bare: bool = False) -> str | None:
    """Release whose modality naming the file name follows (``"brats2020"`` / ``"brats2023"``), or ``None``;
    ``bare`` as for :func:`modality_of_file`."""
    found = modality_of_file(path, bare)
    return found[0] if found is not None else None


def _listed(values: Iterable[float]) -> str:
    """``[0, 1.4, 4]``: whole numbers as integers, others to six significant digits (a float32 1.4 is not
    1.399999976158142)."""
    return f"[{', '.join(str(v) if isinstance(v, int) else f'{v:.6g}' for v in values)}]"


def label_convention(values: Iterable[float], source: str | Path) -> str | None:
    """The release convention of a label map's values: ``"brats2020"`` (ET = 4), ``"brats2023"`` (ET = 3), or
    ``None`` when the values fit both (only 0, 1, 2: no enhancing tumour).

    Args:
        values: the distinct label values found.
        source: the label file (named in the error).

    Raises:
        ValueError: naming ``source`` and the values, for a value outside both sets (a fractional one such as 1.4
            included) or a map holding both 3 and 4.
    """
    distinct = sorted({float(v) for v in values})
    # a fractional value (an interpolated label map) is unknown as it is, not truncated to a label
    found = [int(v) if v.is_integer() else v for v in distinct]
    known = set(LABEL_VALUES["brats2020"]) | set(LABEL_VALUES["brats2023"])
    unknown = [v for v in found if v not in known]
    if unknown or {3, 4} <= set(found):
        reason = f"values {_listed(unknown[:8])} are outside both" if unknown else "it mixes labels 3 and 4 of"
        raise ValueError(
            f"label file {source} holds labels {_listed(found[:8])}: {reason} BraTS conventions "
            f"({RELEASE_TITLES['brats2020']}: {list(LABEL_VALUES['brats2020'])}, "
            f"{RELEASE_TITLES['brats2023']}: {list(LABEL_VALUES['brats2023'])})."
        )
    for release, enhancing in ENHANCING_LABEL.items():
        if enhancing in found:
            return release
    return None


def convert_label_convention(labels: LabelMap, source: str, target: str) -> LabelMap:
    """Relabel the enhancing tumour of a label map from the ``source`` release's value to the ``target``'s
    (4 <-> 3); the other labels (0, 1, 2) are shared. Returns ``labels`` itself when nothing changes, else a copy.

    Args:
        labels: label map of any shape (numpy array or torch tensor, MetaTensor metadata kept).
        source: release convention of ``labels`` (one of :data:`RELEASES`).
        target: release convention wanted.
    """
    old, new = ENHANCING_LABEL[source], ENHANCING_LABEL[target]
    if old == new:
        return labels
    out = labels.clone() if hasattr(labels, "clone") else labels.copy()
    out[labels == old] = new
    return out


def is_label_name(path: Path) -> bool:
    """Whether a NIfTI file name looks like a segmentation (``*seg*``, which also matches the ``*Segm*`` quirk)."""
    return "seg" in nifti_stem(path).lower()


@dataclass(frozen=True)
class BratsSubject:
    """Files and grade of one BraTS subject.

    Attributes:
        subject_id: the folder name, e.g. ``BraTS20_Training_001``, ``BraTS2021_00000`` or ``BraTS-GLI-00000-000``.
        images: the four modality files in :data:`MODALITIES` order (t1, t1ce, t2, flair; in BraTS 2023 names t1n,
            t1c, t2w, t2f).
        label: the segmentation file, or ``None`` for a release without labels.
        grade: 0 for LGG, 1 for HGG, or ``None`` where no grade is known (segmentation only).
        release: the file naming and label convention, one of :data:`RELEASES`.
    """

    subject_id: str
    images: tuple[Path, ...]
    label: Path | None = None
    grade: int | None = None
    release: str = "brats2020"
