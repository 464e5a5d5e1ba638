"""Validate a BraTS folder: files, grades, headers and voxel values, listing every problem found."""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from tqdm import tqdm

from medsegdiff_monai.data.input_checks import empty_modality_problem, split_subject_dirs
from medsegdiff_monai.data.layout import (
    ENHANCING_LABEL,
    LABEL_VALUES,
    NAME_MAPPING_FILENAME,
    RELEASE_TITLES,
    BratsSubject,
)
from medsegdiff_monai.data.name_mapping import NameMapping, parse_name_mapping
from medsegdiff_monai.data.reader import list_subject_dirs, locate_subject_files

__all__ = [
    "AFFINE_TOLERANCE",
    "BratsDataError",
    "FolderReport",
    "check_subject_volumes",
    "mixed_release_problems",
    "read_brats_folder",
    "validate_brats_folder",
]

_READ_ERRORS = (OSError, ValueError, EOFError, zlib.error, ImageFileError)
AFFINE_TOLERANCE = 1e-3
"""Largest difference of two affines' entries (mm) for two files to lie on one voxel grid."""

_ONE_GRID = (
    "A subject's modalities and label must lie on one voxel grid (as in the BraTS releases, co-registered and "
    "resampled to 1 mm): resample this file onto the first one's grid (e.g. MONAI ResampleToMatch, nearest "
    "neighbour for a label), or use the release's preprocessed files."
)


class BratsDataError(ValueError):
    """A BraTS folder failed validation; ``problems`` holds one message per problem, each naming subject and file."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__(f"{len(self.problems)} problem(s) in the BraTS data:\n" + "\n".join(self.problems))


@dataclass
class FolderReport:
    """Outcome of :func:`validate_brats_folder`.

    Attributes:
        subjects: the valid subjects, sorted by id, with their grade (``None`` where no grade table was used).
        problems: every problem found; the folder is valid when this is empty.
        notes: informational messages (non-standard label names, subjects skipped on request).
    """

    subjects: list[BratsSubject] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _load_header(path: Path, subject_id: str, problems: list[str]) -> nib.Nifti1Image | None:
    try:
        image = nib.load(path, mmap=False)
    except _READ_ERRORS as error:
        problems.append(f"subject {subject_id}: file {path} is not a readable NIfTI: {type(error).__name__}: {error}")
        return None
    if len(image.shape) != 3:
        if len(image.shape) < 3:
            remedy = ""
        elif all(size == 1 for size in image.shape[3:]):
            remedy = " (its extra axes have size 1: save it without them, e.g. with nibabel.squeeze_image)"
        else:
            remedy = " (one volume per file: split the series into its 3D volumes, e.g. with nibabel.four_to_three)"
        problems.append(f"subject {subject_id}: file {path} has shape {image.shape}: expected a 3D volume{remedy}.")
        return None
    truncated = _truncation_problem(path, image)
    if truncated:
        problems.append(f"subject {subject_id}: file {path} {truncated}")
        return None
    return image


_GZIP_SIZE_SLACK = 2**20  # bytes a .nii.gz may hold after its voxel data (padding, a trailing extension)


def _truncation_problem(path: Path, image: nib.Nifti1Image) -> str | None:
    """Whether a file ends before the voxel data its header describes, from the file's length alone: a ``.nii`` by
    its size, a ``.nii.gz`` by the uncompressed size its gzip trailer records (modulo 2^32; a truncated file ends
    in compressed data, not in that trailer)."""
    offset = getattr(image.dataobj, "offset", None)  # where the voxel data starts (the loaded header keeps 0)
    if offset is None:
        return None
    expected = int(offset) + int(np.prod(image.shape)) * image.header.get_data_dtype().itemsize
    if path.name.lower().endswith(".gz"):
        if expected >= 2**32 - _GZIP_SIZE_SLACK:
            return None
        with open(path, "rb") as handle:
            handle.seek(-4, os.SEEK_END)
            recorded = int.from_bytes(handle.read(4), "little")
        if expected <= recorded <= expected + _GZIP_SIZE_SLACK:
            return None
        return (
            "is truncated or damaged: its gzip trailer does not record the size of the voxel data its header "
            "describes. Copy the file again."
        )
    size = path.stat().st_size
    if size >= expected:
        return None
    return f"is truncated: {size} bytes, where its header describes {expected}. Copy the file again."


def _check_voxels(image: nib.Nifti1Image, path: Path, subject_id: str, is_label: bool, release: str) -> list[str]:
    try:
        voxels = np.asanyarray(image.dataobj)
    except _READ_ERRORS as error:
        return [f"subject {subject_id}: file {path} cannot be read (truncated?): {type(error).__name__}: {error}"]
    if voxels.dtype.kind == "f" and not np.isfinite(voxels).all():
        count = int(voxels.size - np.isfinite(voxels).sum())
        return [f"subject {subject_id}: file {path} has {count} non-finite voxel(s) (NaN or Inf)."]
    if is_label:
        allowed = LABEL_VALUES[release]
        bad = ~np.isin(voxels, allowed)
        if bad.any():
            values = np.unique(voxels[bad])[:8].tolist()
            other = next(r for r in LABEL_VALUES if r != release)
            hint = (
                f"; {ENHANCING_LABEL[other]} is the enhancing tumour of {RELEASE_TITLES[other]}, whose files are "
                f"named differently"
                if ENHANCING_LABEL[other] in values
                else ""
            )
            return [
                f"subject {subject_id}: label file {path} has values {values} outside the {RELEASE_TITLES[release]} "
                f"label set {list(allowed)} ({int(bad.sum())} voxel(s)){hint}."
            ]
    return []


def check_subject_volumes(subject: BratsSubject, check_voxels: bool = True) -> list[str]:
    """Check the NIfTI files of one subject.

    Headers are read first (shape and affine of every modality and of the label must match the first modality);
    with ``check_voxels`` the voxel data is then streamed file by file to check that it is readable (not truncated),
    finite, and that label values are those of the subject's release ({0, 1, 2, 4} for BraTS 2018-2022, {0, 1, 2,
    3} for BraTS 2023+).

    Args:
        subject: the subject's files.
        check_voxels: also read the voxel data (slower: every byte of the subject is read once).

    Returns:
        one message per problem, naming the subject and the file.
    """
    problems: list[str] = []
    files = [(path, False) for path in subject.images]
    if subject.label is not None:
        files.append((subject.label, True))
    headers = [(path, is_label, _load_header(path, subject.subject_id, problems)) for path, is_label in files]
    loaded = [(path, is_label, image) for path, is_label, image in headers if image is not None]
    if not loaded:
        return problems

    reference_path, _, reference = loaded[0]
    for path, is_label, image in loaded[1:]:
        kind = "label" if is_label else "modality"
        if image.shape != reference.shape:
            problems.append(
                f"subject {subject.subject_id}: {kind} file {path} has shape {image.shape}, "
                f"but {reference_path.name} has shape {reference.shape}. {_ONE_GRID}"
            )
        elif not np.allclose(image.affine, reference.affine, atol=AFFINE_TOLERANCE):
            problems.append(
                f"subject {subject.subject_id}: {kind} file {path} has an affine different from {reference_path.name}:"
                f"\n{np.round(image.affine, 4)}\nvs\n{np.round(reference.affine, 4)}\n{_ONE_GRID}"
            )
    if check_voxels:
        for path, is_label, image in loaded:
            problems.extend(_check_voxels(image, path, subject.subject_id, is_label, subject.release))
    return problems


def validate_brats_folder(
    data_dir: str | Path,
    csv_path: str | Path | None = None,
    require_label: bool = True,
    require_grade: bool | None = None,
    check_voxels: bool = True,
    skip_unmatched: bool = False,
    progress: bool = True,
    allow_empty_modality: bool = False,
) -> FolderReport:
    """Validate a BraTS release folder and collect every problem found.

    Both BraTS namings are read: 2018-2022 (e.g. 2020 and 2021, ``<id>_{t1,t1ce,t2,flair,seg}``) and 2023+
    (``<id>-{t1n,t1c,t2w,t2f,seg}``); all subjects of one folder must use the same one. Checks, per subject: the four
    modalities and the label file are present (one candidate each), the headers agree (shape, affine), the voxels are
    readable and finite, label values are in the release's set ({0, 1, 2, 4} or {0, 1, 2, 3}); and against the grade
    table: every subject folder has a CSV row and every CSV row a folder, and each Grade is HGG or LGG. Subjects are
    read one at a time (headers, then voxel data file by file), so memory stays at one volume.

    Without a grade table (BraTS 2021 and 2023 have none) the subjects are segmentation-only (``grade`` None) and
    one note says so; a table given as ``csv_path`` brings the grades back (see
    :func:`~medsegdiff_monai.data.parse_name_mapping` for its columns).

    Args:
        data_dir: the release folder holding one sub-folder per subject.
        csv_path: the grade table; defaults to ``data_dir/name_mapping.csv``.
        require_label: whether a subject without a label file is a problem (``False`` for inference releases).
        require_grade: whether the grade table must exist and match the folders exactly. With ``False``, a missing
            table is fine, grades are attached where the table has them (``None`` elsewhere) and mismatches are notes.
            ``None`` (default): required when ``csv_path`` is given or ``data_dir/name_mapping.csv`` exists, else
            the subjects are segmentation-only.
        check_voxels: read the voxel data (``False``: headers only, much faster).
        skip_unmatched: report subjects without a CSV row, CSV rows without a folder and unknown grades as notes
            and skip those subjects, instead of reporting problems.
        progress: show a tqdm progress bar over subjects.
        allow_empty_modality: report an all-zero or constant modality (checked with ``check_voxels``) as a note
            instead of a problem.

    Returns:
        the report: valid subjects with grades, problems, notes.
    """
    root = Path(data_dir)
    report = FolderReport()
    try:
        subject_dirs = list_subject_dirs(root)
    except FileNotFoundError as error:
        report.problems.append(str(error))
        return report
    table_path = Path(csv_path) if csv_path is not None else root / NAME_MAPPING_FILENAME
    if require_grade is None:
        require_grade = csv_path is not None or table_path.is_file()
        if not require_grade and subject_dirs:
            report.notes.append(
                f"no grade table {table_path}: the subjects are used for segmentation only (no grade); give a grade "
                "table (--grades CSV with subject_id and grade columns) to train and evaluate the grade."
            )
    use_table = require_grade or table_path.is_file()
    mapping = parse_name_mapping(table_path) if use_table else NameMapping()
    subject_dirs, skipped = split_subject_dirs(subject_dirs, set(mapping.grades) | set(mapping.row_problems))
    report.notes.extend(skipped)
    if not subject_dirs:
        report.problems.append(f"BraTS data folder {root} holds no subject folder.")
    report.problems.extend(mapping.problems)
    use_table = use_table and not mapping.problems
    unmatched = report.problems if require_grade and not skip_unmatched else report.notes
    if use_table:
        unmatched.extend(mapping.row_problems.values())
        on_disk = {d.name for d in subject_dirs}
        listed = set(mapping.grades) | set(mapping.row_problems)
        for subject_id in sorted(listed - on_disk):
            unmatched.append(f"subject {subject_id}: listed in {table_path} but has no folder {root / subject_id}.")

    for subject_dir in tqdm(subject_dirs, desc="validating subjects", unit="subject", disable=not progress):
        subject_id = subject_dir.name
        grade = mapping.grades.get(subject_id)
        graded = not (use_table and grade is None and require_grade)
        if use_table and grade is None:
            if subject_id not in mapping.row_problems:
                unmatched.append(f"subject {subject_id}: folder {subject_dir} has no row in {table_path}.")
            if skip_unmatched:
                report.notes.append(f"subject {subject_id}: skipped (no valid grade).")
                continue
        found = locate_subject_files(subject_dir, require_label=require_label)
        report.problems.extend(found.problems)
        report.notes.extend(found.notes)
        if found.subject is None:
            continue
        problems = check_subject_volumes(found.subject, check_voxels=check_voxels)
        empty = (
            []
            if problems or not check_voxels
            else [empty_modality_problem(subject_id, p) for p in found.subject.images]
        )
        empty = [message for message in empty if message is not None]
        (report.notes if allow_empty_modality else problems).extend(empty)
        report.problems.extend(problems)
        if graded and not problems:
            report.subjects.append(replace(found.subject, grade=grade))
    report.problems.extend(mixed_release_problems(report.subjects, root))
    return report


def mixed_release_problems(subjects: list[BratsSubject], root: str | Path) -> list[str]:
    """One problem when the subjects of one folder follow different BraTS namings, naming a subject of each."""
    by_release: dict[str, list[str]] = {}
    for subject in subjects:
        by_release.setdefault(subject.release, []).append(subject.subject_id)
    if len(by_release) < 2:
        return []
    examples = "; ".join(
        f"{len(ids)} in {RELEASE_TITLES[release]} naming (e.g. {ids[0]})" for release, ids in sorted(by_release.items())
    )
    return [f"folder {root} mixes BraTS layouts: {examples}. Keep one release per folder."]


def read_brats_folder(
    data_dir: str | Path,
    csv_path: str | Path | None = None,
    require_label: bool = True,
    require_grade: bool | None = None,
    check_voxels: bool = True,
    skip_unmatched: bool = False,
    progress: bool = True,
    allow_empty_modality: bool = False,
) -> list[BratsSubject]:
    """Validated subjects of a BraTS release folder; see :func:`validate_brats_folder` for the arguments.

    Returns:
        the subjects sorted by id, with their files, release and grade (LGG 0, HGG 1; ``None`` without a grade table).

    Raises:
        BratsDataError: (a ``ValueError``) listing every problem found, each naming the subject and the file.
    """
    report = validate_brats_folder(
        data_dir,
        csv_path=csv_path,
        require_label=require_label,
        require_grade=require_grade,
        check_voxels=check_voxels,
        skip_unmatched=skip_unmatched,
        progress=progress,
        allow_empty_modality=allow_empty_modality,
    )
    if report.problems:
        raise BratsDataError(report.problems)
    return report.subjects
