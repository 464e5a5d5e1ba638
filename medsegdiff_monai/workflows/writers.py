"""Write inference outputs: NIfTI volumes on the input's grid and the grade table."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

import nibabel as nib
import numpy as np

from medsegdiff_monai.data import INDEX_TO_GRADE

__all__ = ["write_grades_csv", "write_nifti_like"]

GRADES_CSV_COLUMNS = ("subject_id", "p_hgg", "grade")


def write_nifti_like(array: np.ndarray, reference: str | Path | nib.Nifti1Image, path: str | Path) -> Path:
    """Save ``array`` as NIfTI with the qform, sform (each with its code) and voxel size of ``reference``.

    The reference's intensity window (``cal_min`` / ``cal_max``), description and intent are not copied, since they
    describe its values; a transform the reference lacks (code 0) is its ``affine``, with code 1 (scanner).

    Args:
        array: volume with the reference's spatial shape; its dtype is kept (uint8 labels, float32 maps).
        reference: the input NIfTI (path or loaded image) whose grid the output shares.
        path: output file (``.nii.gz``).

    Raises:
        ValueError: when the shapes differ.
    """
    image = reference if isinstance(reference, nib.Nifti1Image) else nib.load(str(reference))
    if tuple(array.shape) != tuple(image.shape[:3]):
        raise ValueError(f"output shape {tuple(array.shape)} differs from the input's {tuple(image.shape[:3])}.")
    header = image.header.copy()
    header.set_data_dtype(array.dtype)
    # what describes the reference's intensities, not this volume's values (a viewer windows labels by cal_max)
    header["cal_min"], header["cal_max"], header["descrip"], header["aux_file"] = 0, 0, b"", b""
    header.set_intent("none")
    out = nib.Nifti1Image(array, image.affine, header)
    qform_code, sform_code = int(image.header["qform_code"]), int(image.header["sform_code"])
    # each transform as the reference has it (they may differ); one the reference lacks is its affine
    out.set_qform(image.get_qform() if qform_code else image.affine, code=qform_code or 1)
    out.set_sform(image.get_sform() if sform_code else image.affine, code=sform_code or 1)
    out.header.set_slope_inter(1.0, 0.0)
    nib.save(out, str(path))
    return Path(path)


def write_grades_csv(
    rows: Iterable[tuple[str, float]],
    path: str | Path,
    threshold: float = 0.5,
    update: str | Path | None = None,
    drop: Iterable[str] = (),
) -> Path:
    """Write ``subject_id,p_hgg,grade`` rows; ``grade`` is ``HGG`` when p_hgg >= ``threshold``, else ``LGG``.

    p_hgg is written with six decimals, or in full where six decimals would round it across ``threshold``.

    With ``update``, the rows of that existing table are kept for every subject ``rows`` does not give again (in
    their order, the new subjects appended), so a run on some subjects updates a table instead of replacing it.

    Args:
        rows: (subject_id, p_hgg) pairs.
        path: output CSV.
        threshold: decision threshold on p(HGG).
        update: an earlier table to merge by subject (ignored when it does not exist).
        drop: subjects whose rows of ``update`` are left out (e.g. run again by a network without the grade head).
    """
    table: dict[str, list[str]] = {}
    dropped = set(drop)
    if update is not None and Path(update).is_file():
        with open(update, newline="", encoding="utf-8-sig") as f:
            for row in csv.DictReader(f):
                if row["subject_id"] not in dropped:
                    table[row["subject_id"]] = [row["subject_id"], row["p_hgg"], row["grade"]]
    for subject_id, p_hgg in rows:
        grade = "" if np.isnan(p_hgg) else INDEX_TO_GRADE[int(p_hgg >= threshold)]
        written = f"{p_hgg:.6f}"
        if not np.isnan(p_hgg) and (float(written) >= threshold) != (p_hgg >= threshold):
            written = repr(float(p_hgg))  # 0.4999996, not a 0.500000 beside LGG
        table[subject_id] = [subject_id, written, grade]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(GRADES_CSV_COLUMNS)
        writer.writerows(table.values())
    return Path(path)
