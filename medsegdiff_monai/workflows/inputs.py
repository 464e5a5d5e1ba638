"""Turn an inference input (BraTS folder, datalist, or four modality files) into checked subject entries."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from medsegdiff_monai.data import (
    MODALITIES,
    NAME_MAPPING_FILENAME,
    BratsDataError,
    BratsSubject,
    list_subject_dirs,
    load_brats_datalist,
    locate_subject_files,
    mixed_release_problems,
    parse_name_mapping,
)
from medsegdiff_monai.data.input_checks import split_subject_dirs
from medsegdiff_monai.data.layout import is_nifti, modality_of_file
from medsegdiff_monai.data.preflight import check_subject_files, first_image, read_datalist_json
from medsegdiff_monai.transforms import subject_id_from_path

__all__ = ["check_inference_inputs", "collect_inference_inputs", "is_datalist", "resolve_entries"]

InputSource = str | Path | Sequence[str | Path]


def is_datalist(source: Any) -> bool:
    """Whether an input names a datalist JSON (a path ending in ``.json``), not a folder or modality files."""
    return isinstance(source, (str, os.PathLike)) and Path(source).suffix == ".json"


def _entry(subject: BratsSubject) -> dict[str, Any]:
    entry: dict[str, Any] = {"image": [str(p) for p in subject.images], "subject_id": subject.subject_id}
    if subject.label is not None:
        entry["label"] = str(subject.label)
    if subject.grade is not None:
        entry["grade"] = int(subject.grade)
    return entry


def _folder_grades(folder: Path) -> dict[str, int]:
    """Grades of ``folder/name_mapping.csv`` where it exists (rows with an unknown grade left out), else none."""
    table = folder / NAME_MAPPING_FILENAME
    if not table.is_file():
        return {}
    mapping = parse_name_mapping(table)
    if mapping.problems:
        raise BratsDataError(mapping.problems)
    return mapping.grades


def _holds_other_nifti_files(folder: Path) -> bool:
    """Whether ``folder`` holds NIfTI files, none of them named after a modality (in either naming or alone)."""
    nifti_files = [p for p in folder.iterdir() if is_nifti(p)]
    return bool(nifti_files) and not any(modality_of_file(p, bare=True) for p in nifti_files)


def _holds_named_modality_files(folder: Path) -> bool:
    """Whether ``folder`` holds a modality file named with a subject id (a release's subject folder)."""
    return any(modality_of_file(p) for p in folder.iterdir() if is_nifti(p))


def _from_folder(folder: Path) -> list[dict[str, Any]]:
    """A folder of modality files is one subject, named after the folder, and so is a folder of NIfTI files without
    subject folders; the modality files of such a case folder may be named as the modality alone (``t1n.nii.gz``,
    ``t1.nii.gz``, as BraTS 2023 tools write them), also beside folders without modality files (a mask, earlier
    outputs). Otherwise, and wherever a subject folder holds modality files named with its id, its subject folders
    are the subjects (a release, whose files must carry the subject id), and a NIfTI file beside them (an atlas, a
    template, also one named after a modality such as ``sri24_t1.nii``) is not read."""
    nifti_files = [p for p in folder.iterdir() if is_nifti(p)]
    subject_dirs, bare = split_subject_dirs(list_subject_dirs(folder))[0], False
    # a release's subject folders hold modality files named with their ids, and a NIfTI file beside them (an atlas,
    # sri24_t1.nii) is not read; a case folder holds modality files itself, or bare-named ones beside folders of
    # other NIfTI files (a mask, earlier outputs), and its bare-named files are read too
    is_release = any(_holds_named_modality_files(d) for d in subject_dirs)
    is_case = any(modality_of_file(p) for p in nifti_files) or (
        bool(nifti_files) and all(_holds_other_nifti_files(d) for d in subject_dirs)
    )
    if is_case and not is_release:
        subject_dirs, bare = [folder], True
    if not subject_dirs:
        raise FileNotFoundError(f"input folder {folder} holds neither NIfTI files nor subject folders.")
    grades = _folder_grades(folder)
    subjects, problems = [], []
    for subject_dir in subject_dirs:
        found = locate_subject_files(subject_dir, require_label=False, bare=bare)
        problems.extend(found.problems)
        if found.subject is not None:
            subjects.append(replace(found.subject, grade=grades.get(found.subject.subject_id)))
    problems.extend(mixed_release_problems(subjects, folder))
    if problems:
        raise BratsDataError(problems)
    return [_entry(subject) for subject in subjects]


def _from_datalist(path: Path, datalist_key: str, data_dir: str | Path | None) -> list[dict[str, Any]]:
    content = read_datalist_json(path, data_dir)
    keys = list(content)
    if datalist_key not in keys:
        raise ValueError(f"datalist {path} has no list {datalist_key!r}; it has {keys}.")
    _check_data_root(path, content[datalist_key], data_dir)
    entries = load_brats_datalist(path, datalist_key, data_dir)
    for index, entry in enumerate(entries):
        images = entry.get("image")
        if not isinstance(images, list) or len(images) != len(MODALITIES):
            raise ValueError(
                f"datalist {path}, {datalist_key}[{index}]: 'image' must list the {len(MODALITIES)} modality files "
                f"({', '.join(MODALITIES)}), got {images!r}."
            )
        entry.setdefault("subject_id", subject_id_from_path(images[0]))
    return entries


def _check_data_root(path: Path, entries: Any, data_dir: str | Path | None) -> None:
    """Refuse a ``data_dir`` under which some of a datalist's relative first image files are missing while the
    datalist's own folder holds them all (the datalist was given, ``--input``, without the data root it was written
    for), and one where both folders hold different files of the same relative names (which folder is meant is not
    known)."""
    if data_dir is None or not isinstance(entries, list) or Path(data_dir).resolve() == path.parent.resolve():
        return
    images = [Path(image) for entry in entries if (image := first_image(entry)) is not None]
    relative = [image for image in images if not image.is_absolute()]
    missing = [file for file in relative if not (Path(data_dir) / file).exists()]
    beside = [file for file in relative if (path.parent / file).exists()]
    if missing and len(beside) == len(relative):
        raise FileNotFoundError(
            f"datalist {path}: its paths are read relative to dataset_dir {data_dir}, where {len(missing)} of its "
            f"{len(relative)} subjects' files are missing (e.g. {missing[0]}), but the datalist's own folder holds "
            f"them all: pass --dataset_dir {path.parent}."
        )
    in_both = [
        file for file in beside if file not in missing and not (Path(data_dir) / file).samefile(path.parent / file)
    ]
    if in_both:  # both folders hold such files: reading either could segment the wrong images
        raise ValueError(
            f"datalist {path}: its relative paths name files both under dataset_dir {data_dir} and beside the "
            f"datalist (e.g. {in_both[0]}), which are different files; pass --dataset_dir {path.parent} to read "
            f"those beside it, or move the datalist into {data_dir} to read those under it."
        )


def collect_inference_inputs(
    source: InputSource, datalist_key: str = "validation", data_dir: str | Path | None = None
) -> list[dict[str, Any]]:
    """
    Subject entries ``{"image": [t1, t1ce, t2, flair], "subject_id": ..., ["label": ..., "grade": ...]}`` of an input.

    ``source`` is one of:

    - a BraTS release folder (one sub-folder per subject) or one subject's folder, in the BraTS 2018-2022 or 2023+
      naming: files are found by :func:`medsegdiff_monai.data.locate_subject_files` (labels optional), and grades
      come from the folder's ``name_mapping.csv`` where there is one; the files of one subject's folder (not those
      of a release's subject folders) may also be named as the modality alone (``t1n.nii.gz``, ``t1.nii.gz``, ...),
      the folder's name then being the subject id;
    - a datalist JSON: the list ``datalist_key``, paths relative to ``data_dir`` (default: the JSON's folder);
    - the four modality files of one subject, in the order t1, t1ce, t2, flair (t1n, t1c, t2w, t2f); the subject
      id comes from the t1 file name (``<id>_t1.nii.gz`` or ``<id>-t1n.nii.gz``).

    Only names are resolved here; :func:`check_inference_inputs` reads the files.

    Raises:
        FileNotFoundError: naming a path that does not exist.
        ValueError: for a malformed input (wrong number of files, missing modality, unknown datalist key).
    """
    if isinstance(source, (list, tuple)):
        paths = [Path(p) for p in source]
        if len(paths) != len(MODALITIES):
            raise ValueError(
                f"expected the {len(MODALITIES)} modality files ({', '.join(MODALITIES)}) of one subject, "
                f"got {len(paths)}: {[str(p) for p in paths]}."
            )
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(f"input modality file {path} does not exist.")
        # names that carry a subject id before their modality ending (not bare names, not unnamed files) must agree
        named = {str(path): subject_id_from_path(path) for path in paths if modality_of_file(path) is not None}
        if len(set(named.values())) > 1:
            listed = ", ".join(f"{Path(path).name} ({subject})" for path, subject in named.items())
            raise ValueError(
                f"the {len(MODALITIES)} modality files of one subject name different subjects: {listed}; give the "
                "files of one subject."
            )
        return [{"image": [str(p) for p in paths], "subject_id": subject_id_from_path(paths[0])}]
    path = Path(source)
    if path.is_dir():
        return _from_folder(path)
    if is_datalist(path):
        return _from_datalist(path, datalist_key, data_dir)
    if not path.exists():
        raise FileNotFoundError(f"inference input {path} does not exist.")
    raise ValueError(f"inference input {path}: expected a BraTS folder, a datalist .json or four modality files.")


def check_inference_inputs(
    entries: Sequence[dict[str, Any]], check_voxels: bool = True, allow_empty_modality: bool = False
) -> None:
    """Read every file of every entry before any output is written.

    Checks that each file exists and is a readable 3D NIfTI, that the modalities (and the label, where given)
    share one shape and affine, and with ``check_voxels`` that the voxel data is complete and finite and the label
    values are those of the release the file names follow ({0, 1, 2, 4} or {0, 1, 2, 3}; see
    :func:`medsegdiff_monai.data.check_subject_volumes`); that files named after a
    modality are in the expected order; and, unless ``allow_empty_modality``, that no modality is all zero or
    constant.

    Raises:
        BratsDataError: (a ``ValueError``) listing every problem, each naming the subject and the file.
    """
    problems: list[str] = []
    for entry in entries:
        problems.extend(
            check_subject_files(
                str(entry.get("subject_id", "?")),
                entry["image"],
                entry.get("label"),
                voxels="all" if check_voxels else "none",
                allow_empty_modality=allow_empty_modality,
            )
        )
    if problems:
        raise BratsDataError(problems)


def resolve_entries(
    source: InputSource | Sequence[dict[str, Any]],
    datalist_key: str = "validation",
    data_dir: str | Path | None = None,
    num_cases: int | None = None,
) -> list[dict[str, Any]]:
    """Subject entries of ``source`` (already a list of entries, or anything :func:`collect_inference_inputs`
    takes), limited to the first ``num_cases`` (None: all).

    Raises:
        ValueError: ``num_cases`` below 1, no subject to run (an empty list, or an empty list of a datalist), or
            one ``subject_id`` for two subjects, naming the input and what to do; and what
            :func:`collect_inference_inputs` raises.
    """
    if num_cases is not None and num_cases < 1:
        raise ValueError(f"num_cases must be >= 1 (or null for every subject), got {num_cases}.")
    if isinstance(source, (list, tuple)) and not source:
        raise ValueError("the input lists no subject: give a BraTS folder, a datalist JSON or four modality files.")
    is_entry_list = isinstance(source, (list, tuple)) and isinstance(source[0], dict)
    entries = list(source) if is_entry_list else collect_inference_inputs(source, datalist_key, data_dir)
    if not entries:  # only a datalist's list can be empty: a folder without subjects is refused when read
        raise ValueError(
            f"datalist {source} has an empty list {datalist_key!r}: choose another with --datalist_key (e.g. "
            "training), or write the datalist again with a validation split."
        )
    entries = entries[:num_cases] if num_cases is not None else entries
    first_images: dict[str, list[str]] = {}
    for entry in entries:
        if entry.get("subject_id"):
            first_images.setdefault(str(entry["subject_id"]), []).append(str(entry["image"][0]))
    repeated = {subject_id: images for subject_id, images in first_images.items() if len(images) > 1}
    if repeated:
        listed = "; ".join(f"{subject_id}: {', '.join(images)}" for subject_id, images in repeated.items())
        raise ValueError(
            f"{len(repeated)} subject id(s) name more than one subject of the input ({listed}); their outputs and "
            "scores would overwrite each other. Give each subject its own subject_id."
        )
    return entries
