"""Find the subject folders of a BraTS release and the modality / label files inside each of them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from medsegdiff_monai.data.layout import MODALITIES, BratsSubject, is_label_name, is_nifti, nifti_stem

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


def _modality_of(path: Path) -> str | None:
    stem = nifti_stem(path).lower()
    for modality in MODALITIES:
        if stem.endswith(f"_{modality}"):
            return modality
    return None


def locate_subject_files(subject_dir: str | Path, require_label: bool = True) -> SubjectFiles:
    """Find the four modality files and the label file of one subject folder.

    A modality file ends with ``_t1``, ``_t1ce``, ``_t2`` or ``_flair`` before ``.nii`` / ``.nii.gz``. The label file
    is the one other NIfTI whose name contains ``seg`` (any case), which covers ``<id>_seg.nii`` and the real
    release's subject-355 quirk ``W39_1998.09.19_Segm.nii``; a non-standard label name is reported in ``notes``.
    Nothing is read beyond the folder listing.

    Args:
        subject_dir: the subject folder; its name is the subject id.
        require_label: whether a missing label file is a problem (``False`` for releases without labels).

    Returns:
        the files found, with every problem found (not only the first).
    """
    folder = Path(subject_dir)
    subject_id = folder.name
    niftis = sorted(p for p in folder.iterdir() if is_nifti(p))
    problems: list[str] = []
    notes: list[str] = []

    images: list[Path] = []
    for modality in MODALITIES:
        found = [p for p in niftis if _modality_of(p) == modality]
        if not found:
            problems.append(
                f"subject {subject_id}: missing modality '{modality}': expected a file {subject_id}_{modality}.nii "
                f"(or .nii.gz) in {folder}."
            )
        elif len(found) > 1:
            names = ", ".join(p.name for p in found)
            problems.append(f"subject {subject_id}: several files for modality '{modality}' in {folder}: {names}.")
        else:
            images.append(found[0])

    label_candidates = [p for p in niftis if _modality_of(p) is None and is_label_name(p)]
    label: Path | None = None
    if len(label_candidates) > 1:
        names = ", ".join(p.name for p in label_candidates)
        problems.append(
            f"subject {subject_id}: several label candidates (*seg* NIfTI files) in {folder}: {names}; keep one."
        )
    elif label_candidates:
        label = label_candidates[0]
        if nifti_stem(label) != f"{subject_id}_seg":
            notes.append(f"subject {subject_id}: using label file {label.name}.")
    elif require_label:
        problems.append(
            f"subject {subject_id}: missing label file: expected {subject_id}_seg.nii (or another *seg* NIfTI) "
            f"in {folder}."
        )

    subject = None if problems else BratsSubject(subject_id=subject_id, images=tuple(images), label=label)
    return SubjectFiles(subject=subject, problems=problems, notes=notes)
