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

How hard the images are is set by a :class:`SyntheticDifficulty`, by name from :data:`DIFFICULTIES`:

- ``"standard"``: the tumour tissues keep their full contrast, one lesion, a mild bias field and noise;
- ``"hard"``: half the tumour-versus-white-matter contrast, patchy enhancement, satellite lesions in half the
  subjects (multifocal), an irregular oedema whose outer part fades into the brain (infiltrative: the label goes
  further than the visible signal), a stronger bias field and about twice the noise, and grade cues that overlap
  more (oedema extent, enhancing rims of LGG foci).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
from tqdm import tqdm

from medsegdiff_monai.data.files import write_text_atomically
from medsegdiff_monai.data.layout import (
    INDEX_TO_GRADE,
    LABEL_FILE_SUFFIX,
    MODALITY_FILE_SUFFIXES,
    NAME_MAPPING_COLUMNS,
    NAME_MAPPING_FILENAME,
    convert_label_convention,
)

__all__ = [
    "DIFFICULTIES",
    "SYNTHETIC_LAYOUTS",
    "SyntheticDifficulty",
    "SyntheticLayout",
    "SyntheticSubject",
    "brats_affine",
    "get_difficulty",
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


SYNTHETIC_RECORD_FILENAME = "synthetic.json"
"""The arguments a synthetic set was written with, in its folder, and whether every subject was written."""

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


@dataclass(frozen=True)
class SyntheticDifficulty:
    """How hard the synthetic images are to segment and grade (the anatomy and label values stay the same).

    Attributes:
        tumour_contrast: share of each tumour tissue's contrast against white matter that is kept (1 = full).
        enhancement_heterogeneity: amplitude of a smooth field scaling the enhancing tissue's contrast (0 = uniform
            enhancement; 0.3 makes parts of a rim barely enhance).
        satellite_probability: probability that a subject has satellite lesions (multifocal tumour).
        max_satellites: at most this many satellites (1 to ``max_satellites``, uniformly); 0 = never.
        margin_wobble: amplitude of the irregularity of the oedema border, in oedema radii.
        margin_waves: number of sinusoids making that irregularity (more = finger-like extensions).
        infiltrative_margin: width, in oedema radii, of the outer oedema band whose contrast fades from full to a
            quarter at the labelled border (0 = a sharp border).
        bias_linear: the multiplicative bias field is ``exp(a x + b x^2)`` per axis with ``|a| <= bias_linear``
            (``x`` is -1..1 across the brain) ...
        bias_quadratic: ... and ``|b| <= bias_quadratic``.
        noise_range: the Gaussian noise's std, relative to white matter on T1, is uniform in this range per modality.
        hgg_oedema_factor: oedema radius over core radius of HGG-looking tumours (uniform in this range).
        lgg_oedema_factor: the same for LGG-looking tumours.
        hgg_rim: thickness range of the enhancing rim of typical HGG, as a share of the core radius.
        lgg_focus_chance: probability that a typical LGG has a small enhancing focus.
    """

    tumour_contrast: float = 1.0
    enhancement_heterogeneity: float = 0.0
    satellite_probability: float = 0.0
    max_satellites: int = 0
    margin_wobble: float = 0.2
    margin_waves: int = 3
    infiltrative_margin: float = 0.0
    bias_linear: float = 0.12
    bias_quadratic: float = 0.08
    noise_range: tuple[float, float] = (0.02, 0.05)
    hgg_oedema_factor: tuple[float, float] = (1.6, 2.2)
    lgg_oedema_factor: tuple[float, float] = (1.2, 1.6)
    hgg_rim: tuple[float, float] = (0.25, 0.45)
    lgg_focus_chance: float = 0.3


DIFFICULTIES: dict[str, SyntheticDifficulty] = {
    "standard": SyntheticDifficulty(),
    "hard": SyntheticDifficulty(
        tumour_contrast=0.5,
        enhancement_heterogeneity=0.3,
        satellite_probability=0.5,
        max_satellites=2,
        margin_wobble=0.35,
        margin_waves=6,
        infiltrative_margin=0.3,
        bias_linear=0.3,
        bias_quadratic=0.2,
        noise_range=(0.05, 0.09),
        hgg_oedema_factor=(1.4, 2.1),
        lgg_oedema_factor=(1.2, 1.8),
        hgg_rim=(0.15, 0.45),
        lgg_focus_chance=0.5,
    ),
}
"""The named presets of ``synth --difficulty``; ``"standard"`` is the default data (demo and tests)."""


def get_difficulty(difficulty: str | SyntheticDifficulty) -> SyntheticDifficulty:
    """The :class:`SyntheticDifficulty` of a preset name of :data:`DIFFICULTIES`, or ``difficulty`` itself."""
    if isinstance(difficulty, SyntheticDifficulty):
        return difficulty
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"synthetic data: difficulty must be one of {sorted(DIFFICULTIES)}, got {difficulty!r}.")
    return DIFFICULTIES[difficulty]


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


def _draw_lesion(
    rng: np.random.Generator,
    region: np.ndarray,
    allowed: np.ndarray,
    axes: list[np.ndarray],
    oedema_factor: float,
    grade: int,
    atypical: bool,
    difficulty: SyntheticDifficulty,
    conspicuity: np.ndarray | None,
) -> None:
    """Paint one lesion (core, enhancing tissue, oedema) into ``region``, in place, only where ``allowed`` holds.

    Args:
        region: (x, y, z) view of the tissue map around the lesion.
        allowed: (x, y, z) bool, where the lesion may be painted.
        axes: coordinates of ``region`` normalised by the core radii (``_axes``), centred on the lesion.
        oedema_factor: oedema radius over core radius.
        conspicuity: (x, y, z) view of the float32 share of the lesion's contrast shown in the image, written for the
            infiltrative margin and the heterogeneous enhancement; None when the difficulty uses neither.
    """
    distance = np.sqrt(axes[0] ** 2 + axes[1] ** 2 + axes[2] ** 2)
    core_distance = distance + _wobble(rng, axes, 0.25)
    oedema_distance = distance / oedema_factor + _wobble(
        rng, axes, difficulty.margin_wobble, waves=difficulty.margin_waves
    )

    core = core_distance <= 1.0
    region[(oedema_distance <= 1.0) & allowed & ~core] = _OEDEMA
    if grade == 1 and not atypical:
        rim = rng.uniform(*difficulty.hgg_rim)
        region[core & allowed] = _ENHANCING
        region[(core_distance <= 1.0 - rim) & allowed] = _NECROSIS
    elif grade == 1:
        # atypical HGG: a thin, patchy rim around a mostly non-enhancing core
        region[core & allowed] = _NON_ENHANCING
        patchy_rim = (core_distance > 0.85) & core & (_wobble(rng, axes, 1.0, waves=2) > 0.2)
        region[patchy_rim & allowed] = _ENHANCING
        region[(core_distance <= 0.4) & allowed] = _NECROSIS
    else:
        region[core & allowed] = _NON_ENHANCING
        focus_chance = 1.0 if atypical else difficulty.lgg_focus_chance
        if rng.random() < focus_chance:
            focus_radius = rng.uniform(0.35, 0.5) if atypical else rng.uniform(0.12, 0.25)
            offset = rng.normal(size=3) * 0.3
            focus = sum((a - o) ** 2 for a, o in zip(axes, offset, strict=True)) <= focus_radius**2
            region[focus & core & allowed] = _ENHANCING
    if conspicuity is None:
        return
    if difficulty.infiltrative_margin > 0:
        # the outer oedema fades into the brain: its contrast falls to a quarter at the labelled border
        oedema = (region == _OEDEMA) & allowed & ~core
        fade = np.clip((1.0 - oedema_distance) / difficulty.infiltrative_margin, 0.0, 1.0)
        conspicuity[oedema] = (0.25 + 0.75 * fade)[oedema]
    if difficulty.enhancement_heterogeneity > 0:
        # patchy enhancement: a smooth field over the lesion scales the enhancing tissue's contrast
        enhancing = (region == _ENHANCING) & allowed
        field = 1.0 + _wobble(rng, [a * 2.0 for a in axes], difficulty.enhancement_heterogeneity * 3, waves=3)
        conspicuity[enhancing] = np.clip(field, 0.15, 1.6)[enhancing]


def _draw_tumour(
    rng: np.random.Generator,
    tissue: np.ndarray,
    brain: np.ndarray,
    brain_centre: np.ndarray,
    brain_radii: np.ndarray,
    grade: int,
    atypical: bool,
    difficulty: SyntheticDifficulty,
    conspicuity: np.ndarray | None,
) -> None:
    """Paint a glioma (necrosis / non-enhancing core / enhancing tissue / oedema), and its satellite lesions when
    the difficulty has them, into the tissue map, in place (``conspicuity``: see :func:`_draw_lesion`)."""
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    centre = brain_centre + direction * rng.uniform(0.1, 0.35) * brain_radii
    mean_radius = float(brain_radii.mean())
    hgg_look = (grade == 1) != atypical
    core_scale = rng.uniform(0.24, 0.38) if grade == 1 else rng.uniform(0.26, 0.4)
    core_radii = core_scale * mean_radius * rng.uniform(0.8, 1.2, size=3)
    oedema_factor = rng.uniform(*(difficulty.hgg_oedema_factor if hgg_look else difficulty.lgg_oedema_factor))
    lesions = [(centre, core_radii, oedema_factor)]
    if difficulty.max_satellites > 0 and rng.random() < difficulty.satellite_probability:
        for _ in range(rng.integers(1, difficulty.max_satellites + 1)):
            # a separate focus: beyond the main oedema, at a place of the brain's inner 85 %, else none
            satellite_radii = core_radii * rng.uniform(0.45, 0.7)
            satellite_factor = rng.uniform(*difficulty.lgg_oedema_factor)
            reach = float((core_radii * oedema_factor + satellite_radii * satellite_factor).max())
            directions = rng.normal(size=(16, 3))
            candidates = centre + directions / np.linalg.norm(directions, axis=1, keepdims=True) * reach * 1.05
            inner = np.linalg.norm((candidates - brain_centre) / brain_radii, axis=1) <= 0.85
            if inner.any():
                lesions.append((candidates[np.argmax(inner)], satellite_radii, satellite_factor))

    for index, (lesion_centre, radii, factor) in enumerate(lesions):
        box = _box(tissue.shape, lesion_centre, radii * (factor + 0.4))
        origin = np.array([s.start for s in box], dtype=np.float32)
        axes = _axes([s.stop - s.start for s in box], lesion_centre - origin, radii)
        region = tissue[box]
        allowed = brain[box]
        if index > 0:  # a satellite paints healthy tissue only
            allowed = allowed & (region < _NECROSIS)
        view = conspicuity[box] if conspicuity is not None else None
        _draw_lesion(rng, region, allowed, axes, factor, grade, atypical, difficulty, view)


def make_synthetic_subject(
    grade: int,
    shape: Sequence[int] = (240, 240, 155),
    seed: int | Sequence[int] | np.random.Generator = 0,
    atypical: bool = False,
    difficulty: str | SyntheticDifficulty = "standard",
) -> SyntheticSubject:
    """Make one synthetic BraTS-like subject in memory (see the module docstring for what it looks like).

    Args:
        grade: 0 for LGG, 1 for HGG.
        shape: volume shape (X, Y, Z), each at least 16; (240, 240, 155) is the real size.
        seed: seed (or generator) of everything random; the same seed gives the same subject.
        atypical: draw the tumour with the look of the other grade.
        difficulty: a name of :data:`DIFFICULTIES` (``"standard"``, ``"hard"``) or a :class:`SyntheticDifficulty`.

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
    difficulty = get_difficulty(difficulty)
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
    healthy = tissue.copy()
    varied = difficulty.infiltrative_margin > 0 or difficulty.enhancement_heterogeneity > 0
    conspicuity = np.ones(box_shape, dtype=np.float32) if varied else None
    _draw_tumour(rng, tissue, brain, centre, brain_radii, grade, atypical, difficulty, conspicuity)

    contrast = _TISSUE_CONTRAST * rng.uniform(0.95, 1.05, size=_TISSUE_CONTRAST.shape).astype(np.float32)
    if difficulty.tumour_contrast != 1.0:  # the tumour tissues move towards white matter
        contrast[_NECROSIS:] = contrast[_WHITE] + np.float32(difficulty.tumour_contrast) * (
            contrast[_NECROSIS:] - contrast[_WHITE]
        )
    scales = _MODALITY_SCALE * rng.uniform(0.6, 1.6, size=4).astype(np.float32)
    images = np.zeros((4, *shape), dtype=np.int16)
    linear, quadratic = difficulty.bias_linear, difficulty.bias_quadratic
    for channel in range(4):
        bias = [np.exp(rng.uniform(-linear, linear) * a + rng.uniform(-quadratic, quadratic) * a * a) for a in axes]
        noise_sigma = np.float32(rng.uniform(*difficulty.noise_range))
        intensity = contrast[:, channel][tissue]
        if conspicuity is not None:
            background = contrast[:, channel][healthy]
            intensity = background + conspicuity * (intensity - background)
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


class _SubjectJob(NamedTuple):
    """What one worker needs to write one synthetic subject (picklable for worker processes)."""

    out: Path
    subject_id: str
    index: int
    grade: int
    num_subjects: int
    shape: tuple[int, ...]
    seed: int
    atypical_fraction: float
    difficulty: SyntheticDifficulty
    layout: str


def _write_subject(job: _SubjectJob) -> list[str]:
    """Write one subject's modalities and label; returns its ``name_mapping.csv`` row."""
    spec = SYNTHETIC_LAYOUTS[job.layout]
    rng = np.random.default_rng([job.seed, job.index])
    atypical = bool(rng.random() < job.atypical_fraction)
    subject = make_synthetic_subject(job.grade, shape=job.shape, seed=rng, atypical=atypical, difficulty=job.difficulty)
    folder = job.out / job.subject_id
    folder.mkdir(exist_ok=True)
    for suffix, volume in zip(MODALITY_FILE_SUFFIXES[spec.release], subject.images, strict=True):
        _save_nifti(volume, subject.affine, folder / f"{job.subject_id}{suffix}{spec.extension}")
    label_name = f"{job.subject_id}{LABEL_FILE_SUFFIX[spec.release]}{spec.extension}"
    if job.layout == "brats2020" and job.index == 355:
        label_name = SUBJECT_355_LABEL_NAME
    label = convert_label_convention(subject.label, "brats2020", spec.release)
    _save_nifti(label, subject.affine, folder / label_name)
    return _name_mapping_row(job.index, job.num_subjects, job.grade)


def write_synthetic_brats(
    out_dir: str | Path,
    num_subjects: int,
    lgg_fraction: float = 0.2,
    shape: Sequence[int] = (240, 240, 155),
    seed: int = 0,
    progress: bool = True,
    atypical_fraction: float = 0.12,
    difficulty: str | SyntheticDifficulty = "standard",
    layout: str = "brats2020",
    num_workers: int = 0,
    overwrite: bool = False,
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
        out_dir: output folder (created if needed). Other subject folders in it are an error, since they would not
            be listed in the CSV. Folders of the same subjects are written again only when ``out_dir`` holds the
            same set (its ``synthetic.json`` records the arguments, and ``"complete": true`` once every subject is
            written) or with ``overwrite``.
        num_subjects: number of subjects.
        lgg_fraction: share of LGG subjects (``round(num_subjects * lgg_fraction)`` of them).
        shape: volume shape; (240, 240, 155) is the real size, e.g. (48, 48, 32) is fine for tests.
        seed: seed of the whole set.
        progress: show a tqdm progress bar.
        atypical_fraction: probability that a subject's tumour has the look of the other grade.
        difficulty: image difficulty, a name of :data:`DIFFICULTIES` or a :class:`SyntheticDifficulty`.
        layout: one of :data:`SYNTHETIC_LAYOUTS` (``"brats2020"``, ``"brats2021"``, ``"brats2023"``).
        num_workers: subjects are written by this many worker processes (0: in this process). Each subject has its
            own seed ``[seed, index]``, so the files are the same for any number of workers.
        overwrite: replace the subject folders of an earlier, different set (or of a release not written here).

    Returns:
        ``out_dir`` as a Path.
    """
    if num_subjects < 1:
        raise ValueError(f"synthetic BraTS: num_subjects must be at least 1, got {num_subjects}.")
    if not 0.0 <= lgg_fraction <= 1.0:
        raise ValueError(f"synthetic BraTS: lgg_fraction must be in [0, 1], got {lgg_fraction}.")
    if not 0.0 <= atypical_fraction <= 1.0:
        raise ValueError(f"synthetic BraTS: atypical_fraction must be in [0, 1], got {atypical_fraction}.")
    if num_workers < 0:
        raise ValueError(f"synthetic BraTS: num_workers must be 0 or more, got {num_workers}.")
    difficulty = get_difficulty(difficulty)
    if layout not in SYNTHETIC_LAYOUTS:
        raise ValueError(f"synthetic BraTS: layout {layout!r} is not one of {list(SYNTHETIC_LAYOUTS)}.")
    spec = SYNTHETIC_LAYOUTS[layout]
    out = Path(out_dir)
    subject_ids = [spec.subject_id.format(i - 1 + spec.first_index) for i in range(1, num_subjects + 1)]
    record = {
        "num_subjects": num_subjects,
        "lgg_fraction": lgg_fraction,
        "shape": [int(side) for side in shape],
        "seed": seed,
        "atypical_fraction": atypical_fraction,
        "difficulty": dataclasses.asdict(difficulty),
        "layout": layout,
    }
    record = json.loads(json.dumps(record))  # as read back: lists, not tuples
    if out.is_dir():
        _check_existing_set(out, subject_ids, record, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    _write_record(out, record, complete=False)  # a killed run leaves it: the same command then writes the set again

    n_lgg = int(round(num_subjects * lgg_fraction))
    lgg_indices = set(np.random.default_rng(seed).choice(num_subjects, size=n_lgg, replace=False).tolist())
    jobs = [
        _SubjectJob(
            out,
            subject_id,
            position + 1,
            0 if position in lgg_indices else 1,
            num_subjects,
            tuple(shape),
            seed,
            atypical_fraction,
            difficulty,
            layout,
        )  # fmt: skip
        for position, subject_id in enumerate(subject_ids)
    ]
    pool = ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn")) if num_workers else None
    with pool or contextlib.nullcontext():
        written = pool.map(_write_subject, jobs, chunksize=4) if pool else map(_write_subject, jobs)
        rows = list(tqdm(written, total=len(jobs), desc="synthetic BraTS", unit="subject", disable=not progress))

    if spec.grade_table:
        with open(out / NAME_MAPPING_FILENAME, "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(NAME_MAPPING_COLUMNS)
            writer.writerows(rows)
    _write_record(out, record, complete=True)
    return out


def _write_record(out: Path, record: dict, complete: bool) -> None:
    write_text_atomically(
        out / SYNTHETIC_RECORD_FILENAME, json.dumps({**record, "complete": complete}, indent=2) + "\n"
    )


def _check_existing_set(out: Path, subject_ids: list[str], record: dict, overwrite: bool) -> None:
    """Refuse to write into ``out`` where it would change or mix with what is there (see
    :func:`write_synthetic_brats`'s ``overwrite``)."""
    foreign = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name not in set(subject_ids))
    if foreign:
        raise FileExistsError(
            f"synthetic BraTS: {out} already holds other folders ({', '.join(foreign[:5])}), which this set would "
            "not list (--overwrite replaces only the folders it writes); write into an empty or new folder."
        )
    existing = [subject_id for subject_id in subject_ids if (out / subject_id).exists()]
    if not existing or overwrite:
        return
    earlier = out / SYNTHETIC_RECORD_FILENAME
    try:
        same_set = {k: v for k, v in json.loads(earlier.read_text()).items() if k != "complete"} == record
    except (OSError, ValueError):
        same_set = False
    if not same_set:
        origin = "of a different synthetic set" if earlier.is_file() else "not written by this command"
        raise FileExistsError(
            f"synthetic BraTS: {out} already holds {len(existing)} of these subject folders (e.g. {existing[0]}), "
            f"{origin}. Nothing was written. Choose a new folder, or pass --overwrite to replace them (a datalist "
            "written for the old set then no longer matches it)."
        )
