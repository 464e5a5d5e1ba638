"""Synthetic BraTS-like subjects written in the real on-disk layout of BraTS 2020, 2021 or 2023 (glioma).

Each subject is a skull-stripped brain phantom (white matter, cortical and deep grey matter, ventricles and sulcal
CSF) with a per-modality tissue contrast, a smooth multiplicative bias field, Gaussian noise and a per-subject
intensity scale, plus a glioma whose appearance depends on its grade:

- HGG: an enhancing rim (label 4, bright on T1ce) around a necrotic core (label 1, dark on T1/T1ce), inside a large
  oedema (label 2, bright on T2 and FLAIR).
- LGG: a mostly non-enhancing core (label 1), sometimes a small enhancing focus (label 4), a smaller oedema.

A share of subjects (``atypical_fraction``) looks like the other grade (HGG with a thin, patchy rim and little
oedema; LGG with a sizeable enhancing focus and large oedema), and the tumour sizes of the grades overlap, so that
grading is learnable but not trivial.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from medsegdiff_monai.data.layout import (
    INDEX_TO_GRADE,
    LABEL_FILE_SUFFIX,
    MODALITY_FILE_SUFFIXES,
    NAME_MAPPING_COLUMNS,
    NAME_MAPPING_FILENAME,
    convert_label_convention,
)

__all__ = [
    "SYNTHETIC_LAYOUTS",
    "SyntheticLayout",
    "SyntheticSubject",
    "brats_affine",
    "make_synthetic_subject",
    "write_synthetic_brats",
]

SUBJECT_PREFIX = "BraTS20_Training_"


@dataclass(frozen=True)
class SyntheticLayout:
    """How one BraTS release names and stores its files.

    Attributes:
        subject_id: format of the subject id from the 1-based subject index, e.g. ``"BraTS2021_{:05d}"``.
        first_index: the index of the first subject in the id (1 in BraTS 2020, 0 in 2021 and 2023).
        release: the file naming and label convention (a key of ``MODALITY_FILE_SUFFIXES``).
        extension: ``".nii"`` or ``".nii.gz"``.
        grade_table: whether the release ships ``name_mapping.csv`` with the grades.
    """

    subject_id: str
    first_index: int
    release: str
    extension: str
    grade_table: bool


SYNTHETIC_LAYOUTS: dict[str, SyntheticLayout] = {
    "brats2020": SyntheticLayout(f"{SUBJECT_PREFIX}{{:03d}}", 1, "brats2020", ".nii", True),
    "brats2021": SyntheticLayout("BraTS2021_{:05d}", 0, "brats2020", ".nii.gz", False),
    "brats2023": SyntheticLayout("BraTS-GLI-{:05d}-000", 0, "brats2023", ".nii.gz", False),
}
"""``synth --layout``: BraTS 2020 (``BraTS20_Training_001/BraTS20_Training_001_t1.nii``, labels 0/1/2/4,
``name_mapping.csv``), BraTS 2021 (``BraTS2021_00000/BraTS2021_00000_t1.nii.gz``, labels 0/1/2/4, no grade table)
and BraTS 2023 glioma (``BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz``, labels 0/1/2/3, no grade table)."""
SUBJECT_355_LABEL_NAME = "W39_1998.09.19_Segm.nii"
"""The real release's label file name for subject 355, reproduced when the synthetic set reaches 355 subjects."""

# tissue indices of the phantom
_BACKGROUND, _CSF, _GREY, _WHITE, _NECROSIS, _NON_ENHANCING, _ENHANCING, _OEDEMA = range(8)
_TISSUE_LABEL = np.array([0, 0, 0, 0, 1, 1, 4, 2], dtype=np.uint8)
# mean intensity of each tissue (rows) in t1, t1ce, t2, flair (columns), relative to white matter on T1
_TISSUE_CONTRAST = np.array(
    [
        [0.00, 0.00, 0.00, 0.00],  # background
        [0.30, 0.32, 1.60, 0.25],  # CSF: dark on T1, bright on T2, suppressed on FLAIR
        [0.72, 0.75, 0.85, 0.85],  # grey matter
        [1.00, 0.98, 0.60, 0.65],  # white matter
        [0.40, 0.42, 1.45, 0.95],  # necrosis
        [0.62, 0.66, 1.25, 1.25],  # non-enhancing tumour
        [0.75, 1.65, 1.05, 1.15],  # enhancing tumour: bright on T1ce
        [0.66, 0.70, 1.30, 1.45],  # oedema: bright on T2 and FLAIR
    ],
    dtype=np.float32,
)
_MODALITY_SCALE = np.array([600.0, 750.0, 900.0, 500.0], dtype=np.float32)


@dataclass
class SyntheticSubject:
    """One synthetic subject in memory.

    Attributes:
        images: (4, X, Y, Z) int16 modalities in :data:`MODALITIES` order (t1, t1ce, t2, flair), 0 outside the brain.
        label: (X, Y, Z) uint8 BraTS labels in {0, 1, 2, 4}.
        affine: (4, 4) voxel-to-world affine (1 mm, BraTS orientation).
        grade: 0 for LGG, 1 for HGG.
        atypical: whether the tumour was drawn with the look of the other grade.
    """

    images: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    grade: int
    atypical: bool


def brats_affine(shape: Sequence[int]) -> np.ndarray:
    """The 1 mm affine of the BraTS 2020 release (x and y flipped, origin at the far y corner) for a volume shape."""
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[1, 3] = float(shape[1] - 1)
    return affine


def _axes(shape: Sequence[int], centre: np.ndarray, radii: np.ndarray) -> list[np.ndarray]:
    """Normalised coordinates ``(i - centre) / radius`` per axis, as broadcastable float32 arrays."""
    axes = []
    for axis, (size, c, r) in enumerate(zip(shape, centre, radii, strict=True)):
        view = [1, 1, 1]
        view[axis] = size
        axes.append(((np.arange(size, dtype=np.float32) - c) / r).reshape(view))
    return axes


def _box(shape: Sequence[int], centre: np.ndarray, half: np.ndarray) -> tuple[slice, ...]:
    """Slices of the box ``centre +- half`` clipped to the volume."""
    low = np.clip(np.floor(centre - half), 0, shape).astype(int)
    high = np.clip(np.ceil(centre + half) + 1, 0, shape).astype(int)
    return tuple(slice(lo, hi) for lo, hi in zip(low, high, strict=True))


def _wobble(rng: np.random.Generator, axes: list[np.ndarray], amplitude: float, waves: int = 3) -> np.ndarray:
    """Smooth random perturbation: a sum of sinusoids along random directions of the normalised coordinates."""
    field = np.zeros(np.broadcast_shapes(*(a.shape for a in axes)), dtype=np.float32)
    for _ in range(waves):
        direction = rng.normal(size=3)
        direction *= rng.uniform(1.5, 3.5) / np.linalg.norm(direction)
        phase = rng.uniform(0, 2 * np.pi)
        field += np.sin(axes[0] * direction[0] + axes[1] * direction[1] + axes[2] * direction[2] + phase)
    return field * np.float32(amplitude / waves)


def _ellipsoid(tissue: np.ndarray, value: int, centre: np.ndarray, radii: np.ndarray, inside: np.ndarray) -> None:
    """Set ``tissue`` to ``value`` inside an ellipsoid, only where ``inside`` (same shape as ``tissue``) holds."""
    box = _box(tissue.shape, centre, radii)
    origin = np.array([s.start for s in box], dtype=np.float32)
    sub_shape = [s.stop - s.start for s in box]
    u, v, w = _axes(sub_shape, centre - origin, radii)
    selected = (u * u + v * v + w * w <= 1.0) & inside[box]
    tissue[box][selected] = value


def _draw_tumour(
    rng: np.random.Generator,
    tissue: np.ndarray,
    brain: np.ndarray,
    brain_centre: np.ndarray,
    brain_radii: np.ndarray,
    grade: int,
    atypical: bool,
) -> None:
    """Paint a glioma (necrosis / non-enhancing core / enhancing tissue / oedema) into the tissue map, in place."""
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    centre = brain_centre + direction * rng.uniform(0.1, 0.35) * brain_radii
    mean_radius = float(brain_radii.mean())
    hgg_look = (grade == 1) != atypical
    core_scale = rng.uniform(0.24, 0.38) if grade == 1 else rng.uniform(0.26, 0.4)
    core_radii = core_scale * mean_radius * rng.uniform(0.8, 1.2, size=3)
    oedema_factor = rng.uniform(1.6, 2.2) if hgg_look else rng.uniform(1.2, 1.6)

    box = _box(tissue.shape, centre, core_radii * (oedema_factor + 0.4))
    origin = np.array([s.start for s in box], dtype=np.float32)
    sub_shape = [s.stop - s.start for s in box]
    axes = _axes(sub_shape, centre - origin, core_radii)
    distance = np.sqrt(axes[0] ** 2 + axes[1] ** 2 + axes[2] ** 2)
    core_distance = distance + _wobble(rng, axes, 0.25)
    oedema_distance = distance / oedema_factor + _wobble(rng, axes, 0.2)
    inside = brain[box]
    region = tissue[box]

    core = core_distance <= 1.0
    region[(oedema_distance <= 1.0) & inside & ~core] = _OEDEMA
    if grade == 1 and not atypical:
        rim = rng.uniform(0.25, 0.45)
        region[core & inside] = _ENHANCING
        region[(core_distance <= 1.0 - rim) & inside] = _NECROSIS
    elif grade == 1:
        # atypical HGG: a thin, patchy rim around a mostly non-enhancing core
        region[core & inside] = _NON_ENHANCING
        patchy_rim = (core_distance > 0.85) & core & (_wobble(rng, axes, 1.0, waves=2) > 0.2)
        region[patchy_rim & inside] = _ENHANCING
        region[(core_distance <= 0.4) & inside] = _NECROSIS
    else:
        region[core & inside] = _NON_ENHANCING
        focus_chance = 1.0 if atypical else 0.3
        if rng.random() < focus_chance:
            focus_radius = rng.uniform(0.35, 0.5) if atypical else rng.uniform(0.12, 0.25)
            offset = rng.normal(size=3) * 0.3
            focus = sum((a - o) ** 2 for a, o in zip(axes, offset, strict=True)) <= focus_radius**2
            region[focus & core & inside] = _ENHANCING


def make_synthetic_subject(
    grade: int,
    shape: Sequence[int] = (240, 240, 155),
    seed: int | Sequence[int] | np.random.Generator = 0,
    atypical: bool = False,
) -> SyntheticSubject:
    """Make one synthetic BraTS-like subject in memory (see the module docstring for what it looks like).

    Args:
        grade: 0 for LGG, 1 for HGG.
        shape: volume shape (X, Y, Z), each at least 16; (240, 240, 155) is the real size.
        seed: seed (or generator) of everything random; the same seed gives the same subject.
        atypical: draw the tumour with the look of the other grade.

    Returns:
        the subject's int16 modalities (4, X, Y, Z), uint8 label (X, Y, Z) in {0, 1, 2, 4}, affine and grade.

    Example::

        >>> subject = make_synthetic_subject(grade=1, shape=(48, 48, 32), seed=0)
        >>> subject.images.shape, subject.images.dtype, subject.label.dtype
        ((4, 48, 48, 32), dtype('int16'), dtype('uint8'))
    """
    if grade not in INDEX_TO_GRADE:
        raise ValueError(f"synthetic subject: grade must be 0 (LGG) or 1 (HGG), got {grade}.")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"synthetic subject: shape must be 3 sizes of at least 16 voxels, got {shape}.")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    size = np.array(shape, dtype=np.float32)

    brain_radii = size * np.array([0.30, 0.37, 0.43], dtype=np.float32) * rng.uniform(0.92, 1.05)
    brain_centre = size / 2 + rng.uniform(-0.03, 0.03, size=3) * size
    # all the anatomy is drawn inside the brain's bounding box, which is about a third of the volume
    box = _box(shape, brain_centre, brain_radii * 1.08)
    box_shape = tuple(s.stop - s.start for s in box)
    centre = brain_centre - np.array([s.start for s in box], dtype=np.float32)
    axes = _axes(box_shape, centre, brain_radii)
    radius = np.sqrt(axes[0] ** 2 + axes[1] ** 2 + axes[2] ** 2)
    for a in axes:  # a gently irregular outline: one low-frequency sinusoid per axis
        radius += np.float32(rng.uniform(0.01, 0.025)) * np.sin(a * rng.uniform(2, 4) + rng.uniform(0, 6))
    brain = radius <= 1.0
    gyri = np.float32(0.05) * np.sin(axes[0] * 14.0) * np.sin(axes[1] * 14.0) * np.cos(axes[2] * 10.0)
    cortex_depth = radius + gyri

    tissue = np.full(box_shape, _WHITE, dtype=np.uint8)
    tissue[cortex_depth > 0.82] = _GREY
    tissue[cortex_depth > 0.96] = _CSF
    tissue[~brain] = _BACKGROUND
    for side in (-1.0, 1.0):
        deep_grey = centre + np.array([side * 0.22, 0.02, -0.05]) * brain_radii
        _ellipsoid(tissue, _GREY, deep_grey, np.array([0.13, 0.16, 0.14]) * brain_radii, brain)
        ventricle = centre + np.array([side * 0.09, 0.05, 0.12]) * brain_radii
        _ellipsoid(tissue, _CSF, ventricle, np.array([0.06, 0.32, 0.14]) * brain_radii * rng.uniform(0.8, 1.2), brain)
    _draw_tumour(rng, tissue, brain, centre, brain_radii, grade, atypical)

    contrast = _TISSUE_CONTRAST * rng.uniform(0.95, 1.05, size=_TISSUE_CONTRAST.shape).astype(np.float32)
    scales = _MODALITY_SCALE * rng.uniform(0.6, 1.6, size=4).astype(np.float32)
    images = np.zeros((4, *shape), dtype=np.int16)
    for channel in range(4):
        bias = [np.exp(rng.uniform(-0.12, 0.12) * a + rng.uniform(-0.08, 0.08) * a * a) for a in axes]
        noise_sigma = np.float32(rng.uniform(0.02, 0.05))
        intensity = contrast[:, channel][tissue]
        intensity += noise_sigma * rng.standard_normal(box_shape, dtype=np.float32)
        intensity *= bias[0] * (bias[1] * bias[2] * scales[channel])
        np.clip(intensity, 1.0, np.iinfo(np.int16).max, out=intensity)
        intensity[~brain] = 0.0
        images[(channel, *box)] = intensity.astype(np.int16)
    label = np.zeros(shape, dtype=np.uint8)
    label[box] = _TISSUE_LABEL[tissue]
    return SyntheticSubject(images=images, label=label, affine=brats_affine(shape), grade=grade, atypical=atypical)


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, path)


def _name_mapping_row(index: int, num_subjects: int, grade: int) -> list[str]:
    """A six-column row; older-release IDs exist for the first subjects only, as in the real table."""
    grade_name = INDEX_TO_GRADE[grade]
    brats17 = f"Brats17_SYN_{index:04d}_1" if index <= 0.6 * num_subjects else ""
    tcga = f"TCGA-SY-{index:04d}" if index % 3 == 0 and index <= 0.6 * num_subjects else ""
    brats19 = f"BraTS19_SYN_{index:04d}_1" if index <= 0.9 * num_subjects else ""
    return [grade_name, brats17, brats17, tcga, brats19, f"{SUBJECT_PREFIX}{index:03d}"]


def write_synthetic_brats(
    out_dir: str | Path,
    num_subjects: int,
    lgg_fraction: float = 0.2,
    shape: Sequence[int] = (240, 240, 155),
    seed: int = 0,
    progress: bool = True,
    atypical_fraction: float = 0.12,
    layout: str = "brats2020",
) -> Path:
    """Write a synthetic BraTS training release in the layout of BraTS 2020, 2021 or 2023 (glioma).

    With ``layout="brats2020"`` the layout is the real 2020 one:
    ``out_dir/BraTS20_Training_001/BraTS20_Training_001_{t1,t1ce,t2,flair,seg}.nii`` (uncompressed, int16
    modalities, uint8 labels, 1 mm BraTS affine) and ``out_dir/name_mapping.csv`` with the six columns of the release
    and empty cells for the older IDs of the newest subjects. Subject 355, if written, has the real release's label
    name ``W39_1998.09.19_Segm.nii``. ``"brats2021"`` and ``"brats2023"`` write the names of
    :data:`SYNTHETIC_LAYOUTS` as ``.nii.gz`` and no grade table; ``"brats2023"`` labels the enhancing tumour 3. The
    images and labels are the same for every layout (same seed), and the output is byte-identical for the same
    arguments.

    Args:
        out_dir: output folder (created if needed). Existing files of the same subjects are overwritten; other subject
            folders in it are an error, since they would not be listed in the CSV.
        num_subjects: number of subjects.
        lgg_fraction: share of LGG subjects (``round(num_subjects * lgg_fraction)`` of them).
        shape: volume shape; (240, 240, 155) is the real size, e.g. (48, 48, 32) is fine for tests.
        seed: seed of the whole set.
        progress: show a tqdm progress bar.
        atypical_fraction: probability that a subject's tumour has the look of the other grade.
        layout: one of :data:`SYNTHETIC_LAYOUTS` (``"brats2020"``, ``"brats2021"``, ``"brats2023"``).

    Returns:
        ``out_dir`` as a Path.
    """
    if num_subjects < 1:
        raise ValueError(f"synthetic BraTS: num_subjects must be at least 1, got {num_subjects}.")
    if not 0.0 <= lgg_fraction <= 1.0:
        raise ValueError(f"synthetic BraTS: lgg_fraction must be in [0, 1], got {lgg_fraction}.")
    if not 0.0 <= atypical_fraction <= 1.0:
        raise ValueError(f"synthetic BraTS: atypical_fraction must be in [0, 1], got {atypical_fraction}.")
    if layout not in SYNTHETIC_LAYOUTS:
        raise ValueError(f"synthetic BraTS: layout {layout!r} is not one of {list(SYNTHETIC_LAYOUTS)}.")
    spec = SYNTHETIC_LAYOUTS[layout]
    out = Path(out_dir)
    subject_ids = [spec.subject_id.format(i - 1 + spec.first_index) for i in range(1, num_subjects + 1)]
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name not in set(subject_ids))
        if foreign:
            raise FileExistsError(
                f"synthetic BraTS: {out} already holds other folders ({', '.join(foreign[:5])}); "
                "write into an empty or new folder."
            )
    out.mkdir(parents=True, exist_ok=True)

    n_lgg = int(round(num_subjects * lgg_fraction))
    lgg_indices = set(np.random.default_rng(seed).choice(num_subjects, size=n_lgg, replace=False).tolist())
    rows = []
    bar = tqdm(subject_ids, desc="synthetic BraTS", unit="subject", disable=not progress)
    for position, subject_id in enumerate(bar):
        index = position + 1
        grade = 0 if position in lgg_indices else 1
        rng = np.random.default_rng([seed, index])
        subject = make_synthetic_subject(grade, shape=shape, seed=rng, atypical=bool(rng.random() < atypical_fraction))
        folder = out / subject_id
        folder.mkdir(exist_ok=True)
        for suffix, volume in zip(MODALITY_FILE_SUFFIXES[spec.release], subject.images, strict=True):
            _save_nifti(volume, subject.affine, folder / f"{subject_id}{suffix}{spec.extension}")
        label_name = f"{subject_id}{LABEL_FILE_SUFFIX[spec.release]}{spec.extension}"
        if layout == "brats2020" and index == 355:
            label_name = SUBJECT_355_LABEL_NAME
        label = convert_label_convention(subject.label, "brats2020", spec.release)
        _save_nifti(label, subject.affine, folder / label_name)
        rows.append(_name_mapping_row(index, num_subjects, grade))

    if spec.grade_table:
        with open(out / NAME_MAPPING_FILENAME, "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(NAME_MAPPING_COLUMNS)
            writer.writerows(rows)
    return out
