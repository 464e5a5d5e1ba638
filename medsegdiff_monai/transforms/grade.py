"""Attach the tumour grade (LGG 0, HGG 1) to a data dictionary."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from medsegdiff_monai.data.layout import (
    LABEL_FILE_SUFFIX,
    MODALITIES,
    MODALITY_FILE_SUFFIXES,
    grade_index,
    nifti_stem,
)
from medsegdiff_monai.data.name_mapping import read_name_mapping

__all__ = ["AttachGraded", "LoadGradeFromCSVd", "grade_to_tensor", "source_path", "subject_id_from_path"]


def grade_to_tensor(value: Any, subject: str = "?") -> torch.Tensor:
    """Convert a grade to a scalar ``torch.long`` tensor, checking it is LGG (0) or HGG (1).

    Args:
        value: 0, 1, ``"LGG"``, ``"HGG"``, ``"0"``, ``"1"``, a bool, or a one-element array / tensor of those.
        subject: subject id used in the error message.

    Raises:
        ValueError: when the value is not a valid grade (see :func:`~medsegdiff_monai.data.grade_index`).
    """
    return torch.tensor(grade_index(value, subject), dtype=torch.long)


class AttachGraded(MapTransform):
    """Turn the ``grade`` of a datalist entry into a validated scalar ``torch.long`` tensor (LGG 0, HGG 1).

    Args:
        keys: keys holding the grade (default ``"grade"``).
        subject_key: key of the subject id, used in error messages.
        allow_missing_keys: do not raise when a key is absent (e.g. inference data without grades).

    Example::

        >>> AttachGraded()({"grade": "HGG", "subject_id": "BraTS20_Training_001"})["grade"]
        tensor(1)
    """

    def __init__(
        self, keys: KeysCollection = "grade", subject_key: str = "subject_id", allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.subject_key = subject_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        subject = str(d.get(self.subject_key, "?"))
        for key in self.key_iterator(d):
            d[key] = grade_to_tensor(d[key], subject)
        return d


def source_path(value: Any) -> Path:
    """Path of a data item: a path, the first of a list of paths, or a loaded MetaTensor's source file(s)."""
    if isinstance(value, MetaTensor):
        value = value.meta.get("filename_or_obj", "")
    if isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    return Path(str(value))


def subject_id_from_path(path: str | Path) -> str:
    """Subject id of a BraTS file: the name before its modality or label ending, else the folder name.

    ``.../BraTS20_Training_001/BraTS20_Training_001_t1.nii`` and ``/in/BraTS20_Training_001_t1.nii.gz`` both give
    ``BraTS20_Training_001``, ``/in/BraTS-GLI-00001-000-t1n.nii.gz`` (BraTS 2023+ naming) ``BraTS-GLI-00001-000``;
    the subject-355 label ``.../BraTS20_Training_355/W39_1998.09.19_Segm.nii`` gives the folder name.
    """
    file = Path(path)
    stem = nifti_stem(file)
    endings = [*(f"_{name}" for name in (*MODALITIES, "seg")), *LABEL_FILE_SUFFIX.values()]
    endings += [suffix for suffixes in MODALITY_FILE_SUFFIXES.values() for suffix in suffixes]
    for ending in sorted(set(endings), key=len, reverse=True):
        if stem.lower().endswith(ending) and len(stem) > len(ending):
            return stem[: -len(ending)]
    return file.parent.name


class LoadGradeFromCSVd(MapTransform):
    """Look the grade up in ``name_mapping.csv``, for pipelines that only have image paths.

    The subject id is ``data[subject_key]`` when present, otherwise derived from the path of ``keys`` (a path, a
    list of paths or a loaded MetaTensor) by :func:`subject_id_from_path`. The CSV is read once, at construction.

    Args:
        keys: key of the image path(s) (default ``"image"``).
        csv_path: the grade table (columns ``BraTS_2020_subject_ID`` and ``Grade``).
        grade_key: output key of the grade, a scalar ``torch.long`` tensor.
        subject_key: key of the subject id; also written when it was absent.
        allow_missing_keys: do not raise when ``keys`` is absent.

    Raises:
        ValueError: at call time, when the subject is not in the CSV (the message names subject and file).
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        csv_path: str | Path = "name_mapping.csv",
        grade_key: str = "grade",
        subject_key: str = "subject_id",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.csv_path = Path(csv_path)
        self.grades = read_name_mapping(self.csv_path)
        self.grade_key = grade_key
        self.subject_key = subject_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            subject = d.get(self.subject_key)
            subject = Path(str(subject)).name if subject is not None else subject_id_from_path(source_path(d[key]))
            if subject not in self.grades:
                raise ValueError(
                    f"subject {subject}: no row in grade table {self.csv_path} (image {source_path(d[key])})."
                )
            d[self.subject_key] = subject
            d[self.grade_key] = torch.tensor(self.grades[subject], dtype=torch.long)
        return d
