"""A folder in the naming of BraTS challenge submissions: ``<subject_id>.nii.gz`` segmentations and, for the
uncertainty task (QU-BraTS), ``<subject_id>_unc_whole.nii.gz``, ``_unc_core`` and ``_unc_enhance`` maps."""

from __future__ import annotations

import filecmp
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from medsegdiff_monai.data.layout import ENHANCING_LABEL, RELEASE_TITLES, label_convention, release_of_subject_id
from medsegdiff_monai.workflows.pipeline import OUTPUT_SUFFIXES, REGION_UNCERTAINTY_SUFFIXES

__all__ = ["SEGMENTATION_SUFFIX", "write_submission"]

SEGMENTATION_SUFFIX = OUTPUT_SUFFIXES[0]
"""File-name ending of the segmentations that inference writes (``<subject_id>_seg.nii.gz``)."""


def _convention_problem(path: Path, subject_id: str) -> str | None:
    """A message when a segmentation's enhancing-tumour label is not the one its subject id's release scores (ET = 4
    in a ``BraTS-GLI-...`` file, 3 in a ``BraTS2021_...`` one); None when it is, or cannot be told."""
    expected = release_of_subject_id(subject_id)
    if expected is None:
        return None
    found = label_convention(np.unique(np.asarray(nib.load(str(path)).dataobj)).tolist(), path)
    if found is None or found == expected:
        return None
    return (
        f"{path} holds ET = {ENHANCING_LABEL[found]} ({RELEASE_TITLES[found]} labels), but {subject_id} is a "
        f"{RELEASE_TITLES[expected]} subject, whose challenge reads ET = {ENHANCING_LABEL[expected]}: run inference "
        f"again with --label_convention {expected}."
    )


def write_submission(
    predictions_dir: str | Path, out_dir: str | Path, overwrite: bool = False, uncertainty: bool = False
) -> list[Path]:
    """Copy every ``<subject_id>_seg.nii.gz`` of ``predictions_dir`` to ``out_dir/<subject_id>.nii.gz``, and with
    ``uncertainty`` each subject's three QU-BraTS region maps under their own names.

    BraTS submission portals take one ``<subject_id>.nii.gz`` per case (``BraTS2021_00001.nii.gz``,
    ``BraTS-GLI-00001-000.nii.gz``) in a folder of segmentations only; inference writes ``_seg``, uncertainty maps,
    overlays and ``grades.csv`` together. The labels are copied byte for byte, in the convention inference wrote
    (ET = 4 for BraTS 2018-2022 inputs, 3 for BraTS 2023+; see ``label_convention``). Each file is written to a
    temporary name and renamed, so a stopped copy leaves whole files only.

    Args:
        predictions_dir: an inference output folder.
        out_dir: the submission folder (created if needed); not ``predictions_dir`` itself.
        overwrite: replace files of the same names that differ; without it they stop the copy before any file is
            written (identical files are accepted, so the same command can run again).
        uncertainty: also copy ``<subject_id>_unc_whole.nii.gz``, ``_unc_core`` and ``_unc_enhance`` (written by
            inference with ``write_region_uncertainty``), as the uncertainty task of the challenge takes them.

    Returns:
        the files of the submission, in subject order (each segmentation before its maps).

    Raises:
        FileNotFoundError: ``predictions_dir`` holds no segmentation, or with ``uncertainty``, a subject lacks a
            region map (naming the subjects); nothing is written then.
        FileExistsError: ``out_dir`` is a file, or a differing file of the same name is in it and not ``overwrite``.
        ValueError: ``out_dir`` is ``predictions_dir``, or a segmentation's enhancing-tumour label is not the one
            its subject id's release scores (ET = 4 in a ``BraTS-GLI-...`` file, 3 in a ``BraTS2021_...`` one).
    """
    predictions_dir, out_dir = Path(predictions_dir), Path(out_dir)
    segmentations = sorted(predictions_dir.glob(f"*{SEGMENTATION_SUFFIX}")) if predictions_dir.is_dir() else []
    if not segmentations:
        raise FileNotFoundError(
            f"{predictions_dir} holds no <subject_id>{SEGMENTATION_SUFFIX}: give the output folder of an inference run."
        )
    if out_dir.resolve() == predictions_dir.resolve():
        raise ValueError(f"--out {out_dir} is the predictions folder itself: choose a folder of its own.")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"--out {out_dir} is a file, not a folder: choose another --out.")
    copies = []
    for path in segmentations:
        subject_id = path.name[: -len(SEGMENTATION_SUFFIX)]
        copies.append((path, out_dir / f"{subject_id}.nii.gz"))
        if uncertainty:
            names = [subject_id + suffix for suffix in REGION_UNCERTAINTY_SUFFIXES.values()]
            copies.extend((predictions_dir / name, out_dir / name) for name in names)
    lacking = sorted({source.name for source, _ in copies if not source.is_file()})
    if lacking:
        shown = ", ".join(lacking[:3]) + (f" and {len(lacking) - 3} more" if len(lacking) > 3 else "")
        raise FileNotFoundError(
            f"{predictions_dir} lacks the region uncertainty maps {shown}. Nothing was written. Run inference with "
            "--write_region_uncertainty true to write them, or leave out --uncertainty."
        )
    mislabelled = [
        problem
        for path in segmentations
        if (problem := _convention_problem(path, path.name[: -len(SEGMENTATION_SUFFIX)]))
    ]
    if mislabelled:
        raise ValueError(" ".join(mislabelled) + " Nothing was written.")
    differing = [
        str(target)
        for source, target in copies
        if target.exists() and not (target.is_file() and filecmp.cmp(source, target, shallow=False))
    ]
    if differing and not overwrite:
        shown = ", ".join(differing[:3]) + (f" and {len(differing) - 3} more" if len(differing) > 3 else "")
        raise FileExistsError(
            f"{shown} already exist(s) with other contents. Nothing was written. Pass --overwrite to replace them, "
            "or choose another --out."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    for source, target in copies:
        partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
        shutil.copyfile(source, partial)
        os.replace(partial, target)
    return [target for _, target in copies]
