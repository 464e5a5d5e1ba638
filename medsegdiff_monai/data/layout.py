"""On-disk layout of the BraTS 2020 release: names, columns and the files of one subject folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
"""Modality order of the image channels everywhere in the library."""

BRATS_LABEL_VALUES: tuple[int, ...] = (0, 1, 2, 4)
"""Label values of a BraTS 2020 segmentation: background, necrotic/non-enhancing core, oedema, enhancing tumour."""

GRADE_TO_INDEX: dict[str, int] = {"LGG": 0, "HGG": 1}
"""Class index of each grade name found in the ``Grade`` column of ``name_mapping.csv``."""

INDEX_TO_GRADE: dict[int, str] = {index: name for name, index in GRADE_TO_INDEX.items()}

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


def is_label_name(path: Path) -> bool:
    """Whether a NIfTI file name looks like a segmentation (``*seg*``, which also matches the ``*Segm*`` quirk)."""
    return "seg" in nifti_stem(path).lower()


@dataclass(frozen=True)
class BratsSubject:
    """Files and grade of one BraTS subject.

    Attributes:
        subject_id: the folder name, e.g. ``BraTS20_Training_001`` (the ``BraTS_2020_subject_ID`` of the CSV).
        images: the four modality files in :data:`MODALITIES` order (t1, t1ce, t2, flair).
        label: the segmentation file, or ``None`` for a release without labels.
        grade: 0 for LGG, 1 for HGG, or ``None`` where no grade is known.
    """

    subject_id: str
    images: tuple[Path, ...]
    label: Path | None = None
    grade: int | None = None
