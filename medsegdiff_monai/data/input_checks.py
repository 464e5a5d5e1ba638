"""Checks of input files beyond their headers: modality order by file name, empty modalities, non-subject folders."""

from __future__ import annotations

import zlib
from collections.abc import Collection, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from medsegdiff_monai.data.layout import MODALITIES, is_nifti, modality_of_file

__all__ = [
    "SAMPLED_SLICE_FRACTIONS",
    "empty_modality_problem",
    "modality_in_name",
    "modality_order_problems",
    "split_subject_dirs",
]

SAMPLED_SLICE_FRACTIONS: tuple[float, ...] = (0.25, 0.5, 0.75)
"""Axial positions (fractions of the depth) read to tell an empty or constant modality from a brain image."""


def modality_in_name(path: str | Path) -> str | None:
    """The modality a file name ends with, in either release's naming (``..._t1ce.nii.gz`` and ``...-t1c.nii.gz``
    -> ``"t1ce"``), or that it is alone (``FLAIR.nii`` -> ``"flair"``, ``t1c.nii.gz`` -> ``"t1ce"``); None for another
    name."""
    found = modality_of_file(path, bare=True)
    return found[1] if found is not None else None


def modality_order_problems(subject_id: str, images: Sequence[str | Path]) -> list[str]:
    """Problems of modality files given in the wrong order, judged by their names.

    ``images`` must be t1, t1ce, t2, flair; a file whose name ends with another modality (``_flair.nii`` given as
    t1) is a problem. Files whose names carry no modality are accepted as given.

    Returns:
        one message per misplaced file, naming the subject, the file and the expected order.
    """
    problems = []
    for position, (expected, path) in enumerate(zip(MODALITIES, images, strict=False)):
        named = modality_in_name(path)
        if named is not None and named != expected:
            problems.append(
                f"subject {subject_id}: image file {position + 1} ({path}) is named as '{named}' but position "
                f"{position + 1} is '{expected}': give the files in the order {', '.join(MODALITIES)}."
            )
    return problems


def empty_modality_problem(subject_id: str, path: str | Path) -> str | None:
    """A message when a modality file is all zero or constant, or None.

    Only the axial slices at :data:`SAMPLED_SLICE_FRACTIONS` of the depth are read (a brain image is never constant
    there), so the check costs a fraction of reading the volume.
    """
    image = nib.load(str(path), mmap=False)
    depth = image.shape[2]
    indices = sorted({min(depth - 1, int(fraction * depth)) for fraction in SAMPLED_SLICE_FRACTIONS})
    try:
        voxels = np.stack([np.asanyarray(image.dataobj[..., index]) for index in indices])
    except (OSError, ValueError, EOFError, zlib.error) as error:
        return f"subject {subject_id}: file {path} cannot be read (truncated?): {type(error).__name__}: {error}"
    if voxels.min() != voxels.max():
        return None
    value = voxels.flat[0]
    kind = "all zero" if value == 0 else f"constant ({value})"
    return (
        f"subject {subject_id}: modality file {path} is {kind} on its axial slices {indices}: the scan is missing or "
        "blank. Replace the file, drop the subject, or pass --allow-empty-modality (bundle: allow_empty_modality "
        "true) to use it anyway."
    )


def split_subject_dirs(folders: Sequence[Path], listed: Collection[str] = ()) -> tuple[list[Path], list[str]]:
    """Separate subject folders from other folders of a release (e.g. ``notes/``).

    A folder holding no NIfTI file, not named in the grade table (``listed``) and without a digit in its name
    (subject ids are numbered) is not a subject: it is skipped with a note. Any other folder is kept, so the missing
    files of an empty subject folder are reported.

    Returns:
        the subject folders, and one note per skipped folder.
    """
    subjects, notes = [], []
    for folder in folders:
        numbered = any(c.isdigit() for c in folder.name)
        if numbered or folder.name in listed or any(is_nifti(p) for p in folder.iterdir()):
            subjects.append(folder)
        else:
            notes.append(f"folder {folder} holds no NIfTI file: skipped (not a subject folder).")
    return subjects, notes
