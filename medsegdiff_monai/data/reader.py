"""Find the subject folders of a BraTS release (2018-2022 or 2023+ naming) and the files inside each of them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from medsegdiff_monai.data.input_checks import modality_in_name
from medsegdiff_monai.data.layout import (
    LABEL_FILE_SUFFIX,
    MODALITIES,
    MODALITY_FILE_SUFFIXES,
    RELEASE_TITLES,
    RELEASES,
    BratsSubject,
    is_label_name,
    is_nifti,
    modality_of_file,
    nifti_stem,
)

__all__ = ["SubjectFiles", "list_subject_dirs", "locate_subject_files"]


@dataclass
class SubjectFiles:
    """What was found in one subject folder.

    Attributes:
        subject: the subject with its files (``grade`` left ``None``), or ``None`` if a required file is missing.
        problems: one message per problem, each naming the subject and the file(s) concerned.
        notes: informational messages, e.g. which non-standard label file was used.
    """

    subject: BratsSubject | None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def list_subject_dirs(data_dir: str | Path) -> list[Path]:
    """Subject folders of a BraTS release: every sub-folder of ``data_dir`` not starting with ``.`` or ``_``.

    Args:
        data_dir: root of the release, e.g. ``MICCAI_BraTS2020_TrainingData``.

    Returns:
        the folders sorted by name.

    Raises:
        FileNotFoundError: when ``data_dir`` is not a folder.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"BraTS data folder {root} does not exist or is not a folder.")
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def _expected_name(subject_id: str, modality: str, release: str | None, bare: bool) -> str:
    """The file names a modality may have in a subject folder, for a message: of ``release`` (None: of either),
    bare names included with ``bare``."""
    index = MODALITIES.index(modality)
    releases = RELEASES if release is None else (release,)
    names = []
    for r in releases:
        suffix = MODALITY_FILE_SUFFIXES[r][index]
        bare_name = f" or {suffix[1:]}.nii.gz" if bare else ""
        names.append(f"{subject_id}{suffix}.nii.gz{bare_name} ({RELEASE_TITLES[r]})")
    return " or ".join(names)


def locate_subject_files(subject_dir: str | Path, require_label: bool = True, bare: bool = False) -> SubjectFiles:
    """Find the four modality files and the label file of one subject folder, in either BraTS naming.

    A modality file ends, before ``.nii`` / ``.nii.gz``, with ``_t1``, ``_t1ce``, ``_t2``, ``_flair`` (BraTS
    2018-2022, e.g. ``BraTS2021_00000_t1ce.nii.gz``) or with ``-t1n``, ``-t1c``, ``-t2w``, ``-t2f`` (BraTS 2023+,
    e.g. ``BraTS-GLI-00000-000-t1c.nii.gz``); one folder must use one naming. The label file is the one other NIfTI
    whose name contains ``seg`` (any case), which covers ``<id>_seg.nii``, ``<id>-seg.nii.gz`` and the BraTS 2020
    subject-355 quirk ``W39_1998.09.19_Segm.nii``; a non-standard label name is reported in ``notes``. Nothing is
    read beyond the folder listing.

    A file named as the modality alone (``t1n.nii.gz``, ``t1.nii.gz``, as BraTS 2023 tools write them) is a
    modality file only with ``bare``; without it, a missing modality whose bare-named file the folder holds says
    where such names are read.

    Args:
        subject_dir: the subject folder; its name is the subject id.
        require_label: whether a missing label file is a problem (``False`` for releases without labels).
        bare: also read a modality file named as the modality alone (the folder of one subject given as inference
            input; see :func:`~medsegdiff_monai.data.layout.modality_of_file`).

    Returns:
        the files found (``subject.release`` set from the naming), with every problem found (not only the first).
    """
    folder = Path(subject_dir)
    subject_id = folder.name
    niftis = sorted(p for p in folder.iterdir() if is_nifti(p))
    problems: list[str] = []
    notes: list[str] = []

    modality_files = {p: found for p in niftis if (found := modality_of_file(p, bare)) is not None}
    releases = sorted({release for release, _ in modality_files.values()})
    if len(releases) > 1:
        examples = "; ".join(
            f"{RELEASE_TITLES[r]} naming: " + ", ".join(p.name for p, (pr, _) in modality_files.items() if pr == r)
            for r in releases
        )
        problems.append(f"subject {subject_id}: mixed file naming in {folder} ({examples}); keep one naming.")
        return SubjectFiles(subject=None, problems=problems, notes=notes)
    release = releases[0] if releases else None

    images: list[Path] = []
    for modality in MODALITIES:
        found = [p for p, (_, m) in modality_files.items() if m == modality]
        if not found:
            bare_named = [p.name for p in niftis if modality_in_name(p) == modality]
            hint = (
                f" {' and '.join(bare_named)} there is named as the modality alone, which is read only when the four "
                "files are given as a list, or this folder alone, as the inference input."
                if bare_named
                else ""
            )
            problems.append(
                f"subject {subject_id}: missing modality '{modality}': expected a file "
                f"{_expected_name(subject_id, modality, release, bare)} (or .nii) in {folder}.{hint}"
            )
        elif len(found) > 1:
            names = ", ".join(p.name for p in found)
            problems.append(f"subject {subject_id}: several files for modality '{modality}' in {folder}: {names}.")
        else:
            images.append(found[0])

    label_candidates = [p for p in niftis if p not in modality_files and is_label_name(p)]
    label_name = f"{subject_id}{LABEL_FILE_SUFFIX[release or 'brats2020']}"
    label: Path | None = None
    if len(label_candidates) > 1:
        names = ", ".join(p.name for p in label_candidates)
        problems.append(
            f"subject {subject_id}: several label candidates (*seg* NIfTI files) in {folder}: {names}; keep one."
        )
    elif label_candidates:
        label = label_candidates[0]
        if nifti_stem(label) != label_name:
            notes.append(f"subject {subject_id}: using label file {label.name}.")
    elif require_label:
        problems.append(
            f"subject {subject_id}: missing label file: expected {label_name}.nii.gz (or another *seg* NIfTI) "
            f"in {folder}."
        )

    subject = None
    if not problems:
        subject = BratsSubject(subject_id=subject_id, images=tuple(images), label=label, release=release)
    return SubjectFiles(subject=subject, problems=problems, notes=notes)
