"""PNG pictures with only ``zlib``: an RGB encoder and BraTS label overlays on a grey-scale slice."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = ["BRATS_LABEL_COLOURS", "label_overlay", "tumour_slice", "write_overlay_png", "write_png"]

BRATS_LABEL_COLOURS: dict[int, tuple[int, int, int]] = {
    1: (230, 40, 40),
    2: (40, 200, 60),
    3: (250, 220, 30),
    4: (250, 220, 30),
}
"""Overlay colour of each BraTS label: 1 necrotic / non-enhancing core red, 2 oedema green, enhancing tumour yellow
(4 in BraTS 2018-2022, 3 from BraTS 2023 on)."""


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
