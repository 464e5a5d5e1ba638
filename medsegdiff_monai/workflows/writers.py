"""Write inference outputs: NIfTI volumes on the input's grid, the grade table, and PNG overlays."""

from __future__ import annotations

import csv
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path

import nibabel as nib
import numpy as np

from medsegdiff_monai.data import INDEX_TO_GRADE

__all__ = [
    "BRATS_LABEL_COLOURS",
    "label_overlay",
    "tumour_slice",
    "write_grades_csv",
    "write_nifti_like",
    "write_overlay_png",
    "write_png",
]

BRATS_LABEL_COLOURS: dict[int, tuple[int, int, int]] = {
    1: (230, 40, 40),
    2: (40, 200, 60),
    3: (250, 220, 30),
    4: (250, 220, 30),
}
"""Overlay colour of each BraTS label: 1 necrotic / non-enhancing core red, 2 oedema green, enhancing tumour yellow
(4 in BraTS 2018-2022, 3 from BraTS 2023 on)."""

GRADES_CSV_COLUMNS = ("subject_id", "p_hgg", "grade")


def write_nifti_like(array: np.ndarray, reference: str | Path | nib.Nifti1Image, path: str | Path) -> Path:
    """Save ``array`` as NIfTI with the affine (qform and sform) and voxel size of ``reference``.

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
    out = nib.Nifti1Image(array, image.affine, header)
    out.set_qform(image.affine, code=int(image.header["qform_code"]) or 1)
    out.set_sform(image.affine, code=int(image.header["sform_code"]) or 1)
    out.header.set_slope_inter(1.0, 0.0)
    nib.save(out, str(path))
    return Path(path)


def write_grades_csv(
    rows: Iterable[tuple[str, float]], path: str | Path, threshold: float = 0.5, update: str | Path | None = None
) -> Path:
    """Write ``subject_id,p_hgg,grade`` rows; ``grade`` is ``HGG`` when p_hgg >= ``threshold``, else ``LGG``.

    With ``update``, the rows of that existing table are kept for every subject ``rows`` does not give again (in
    their order, the new subjects appended), so a run on some subjects updates a table instead of replacing it.

    Args:
        rows: (subject_id, p_hgg) pairs.
        path: output CSV.
        threshold: decision threshold on p(HGG).
        update: an earlier table to merge by subject (ignored when it does not exist).
    """
    table: dict[str, list[str]] = {}
    if update is not None and Path(update).is_file():
        with open(update, newline="") as f:
            for row in csv.DictReader(f):
                table[row["subject_id"]] = [row["subject_id"], row["p_hgg"], row["grade"]]
    for subject_id, p_hgg in rows:
        grade = "" if np.isnan(p_hgg) else INDEX_TO_GRADE[int(p_hgg >= threshold)]
        table[subject_id] = [subject_id, f"{p_hgg:.6f}", grade]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(GRADES_CSV_COLUMNS)
        writer.writerows(table.values())
    return Path(path)


def write_png(rgb: np.ndarray, path: str | Path) -> Path:
    """Write an 8-bit RGB image (H, W, 3) as PNG with only ``zlib`` (no imaging library needed)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"PNG writer expects an (H, W, 3) array, got shape {rgb.shape}.")
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    height, width = rgb.shape[:2]
    scanlines = b"".join(b"\x00" + rgb[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(scanlines, 6))
    Path(path).write_bytes(png + chunk(b"IEND", b""))
    return Path(path)


def label_overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend BraTS labels over a grey-scale slice.

    Args:
        image: (H, W) intensities (e.g. FLAIR), scaled to [0, 255] between its 1st and 99th percentile.
        labels: (H, W) BraTS labels 0/1/2/4 or 0/1/2/3.
        alpha: opacity of the label colours.

    Returns:
        (H, W, 3) uint8 RGB, rotated so that anterior is up for RAS-oriented arrays.
    """
    low, high = np.percentile(image, (1, 99)) if image.any() else (0.0, 1.0)
    grey = np.clip((image - low) / max(high - low, 1e-6), 0, 1) * 255
    rgb = np.repeat(grey[..., None], 3, axis=2)
    for value, colour in BRATS_LABEL_COLOURS.items():
        mask = labels == value
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * np.asarray(colour, dtype=np.float64)
    return np.rot90(rgb.astype(np.uint8))


def tumour_slice(labels: np.ndarray, axis: int = 2) -> int:
    """Index of the slice along ``axis`` with the most tumour voxels (the middle one when there is no tumour)."""
    area = (labels > 0).sum(axis=tuple(a for a in range(labels.ndim) if a != axis))
    return int(np.argmax(area)) if area.any() else labels.shape[axis] // 2


def write_overlay_png(image: np.ndarray, labels: np.ndarray, path: str | Path) -> Path:
    """Write the axial slice with the most tumour as PNG: the image alone, then with the labels blended in.

    Args:
        image: (H, W, D) one modality (FLAIR shows the whole tumour best).
        labels: (H, W, D) BraTS labels (0/1/2/4 or 0/1/2/3) on the same grid.
        path: output file.
    """
    index = tumour_slice(labels)
    plain = label_overlay(image[..., index], np.zeros_like(labels[..., index]))
    blended = label_overlay(image[..., index], labels[..., index])
    return write_png(np.concatenate([plain, blended], axis=1), path)
