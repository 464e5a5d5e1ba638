"""Checks a training run makes before any work (before the cache fill): settings, datalist and every input file."""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from medsegdiff_monai.data.input_checks import empty_modality_problem, modality_order_problems
from medsegdiff_monai.data.layout import (
    MODALITIES,
    BratsSubject,
    grade_index,
    patient_of,
    release_of_file,
    subjects_by_patient,
)
from medsegdiff_monai.data.validation import BratsDataError, check_subject_volumes

__all__ = [
    "INPUT_ERRORS",
    "check_roi_size",
    "check_subject_entries",
    "check_subject_files",
    "check_training_inputs",
    "exit_on_bad_input",
    "first_image",
    "read_datalist_json",
    "report_errors_briefly",
]

INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, PermissionError)
"""Errors that :func:`exit_on_bad_input` reports as one message: bad input, named, with what to do."""


def exit_on_bad_input(check: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``check(*args, **kwargs)``; on a bad-input error print ``error: <message>`` on stderr and exit with code 1.

    Used by the bundle configs, so that a bad input ends a run with its message and no traceback.
    """
    try:
        return check(*args, **kwargs)
    except INPUT_ERRORS as error:
        # on a line of its own: a progress bar may have left its last state on the current one (a log file)
        print(f"\nerror: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


TRACEBACK_VARIABLE = "MEDSEGDIFF_TRACEBACK"
"""Environment variable that, set to any non-empty value, keeps Python's full tracebacks in bundle runs."""


def _exception_chain(error: BaseException) -> list[BaseException]:
    """An exception and its causes, the first raised last: MONAI's config parser wraps an error raised while it
    builds a component or evaluates an expression in a ``RuntimeError("Failed to ...")`` raised from it."""
    chain = [error]
    while (cause := error.__cause__ or (None if error.__suppress_context__ else error.__context__)) is not None:
        chain.append(cause)
        error = cause
    return chain


_BUILDING = re.compile(r"Failed to instantiate component '([^']+)'")


def _brief_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    """A warning on one line, without its source line (a ``warnings.formatwarning``)."""
    return f"warning: {message} ({category.__name__}, {Path(filename).name}:{lineno})\n"


def report_errors_briefly(interrupted: str = "") -> None:
    """Make the process report a bad setting or input as one message instead of a traceback (``sys.excepthook``).

    Installed by the bundle configs as their first ``initialize`` step. An uncaught error whose first-raised
    exception (the root of the chain that MONAI's config parser builds) is one of :data:`INPUT_ERRORS`, such as a
    sampler given an unknown scheduler, an optimizer given a negative learning rate or an input file whose voxels
    are not finite, then ends the process with ``error: <message>`` on stderr, the place it was raised, and exit
    code 1. Ctrl-C prints ``interrupted.`` and the text of ``interrupted``. Any other error keeps its traceback, and
    so does every error while the environment variable ``MEDSEGDIFF_TRACEBACK`` is set.

    A warning is printed on one line, ``warning: <message> (<category>, <file>:<line>)``, without the source line
    Python adds (``warnings.formatwarning``); with ``MEDSEGDIFF_TRACEBACK`` set it keeps Python's form.

    Args:
        interrupted: what to do after Ctrl-C, e.g. how to resume.
    """
    if not os.environ.get(TRACEBACK_VARIABLE):
        warnings.formatwarning = _brief_warning
    previous = sys.excepthook

    def hook(kind: type[BaseException], error: BaseException, trace: Any) -> None:
        chain = _exception_chain(error)
        root = chain[-1]
        if os.environ.get(TRACEBACK_VARIABLE):
            previous(kind, error, trace)
            return
        # Ctrl-C anywhere in the chain: it may interrupt a worker pool, which then raises its own error from it
        if any(isinstance(link, KeyboardInterrupt) for link in chain):
            print(f"\ninterrupted. {interrupted}".rstrip(), file=sys.stderr, flush=True)
            return
        if not isinstance(root, INPUT_ERRORS):
            previous(kind, error, trace)
            return
        frames = traceback.extract_tb(root.__traceback__)
        where = f" in {frames[-1].name} ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
        built = [match.group(1) for link in chain if (match := _BUILDING.match(str(link)))]
        where += f" while building {built[-1]}" if built else ""
        print(
            f"\nerror: {root}\n  ({type(root).__name__}{where}; set {TRACEBACK_VARIABLE}=1 for the whole traceback)",
            file=sys.stderr,
            flush=True,
        )

    sys.excepthook = hook


def check_roi_size(roi_size: Sequence[int], multiple: int) -> tuple[int, int]:
    """The in-plane ``roi_size`` as two ints, each a positive multiple of ``multiple`` (the network's downsampling).

    Raises:
        ValueError: naming the setting and a valid value.
    """
    try:
        roi = tuple(int(s) for s in roi_size)
    except (TypeError, ValueError):
        raise ValueError(f"roi_size={roi_size!r}: expected two integers, e.g. [64, 64].") from None
    if len(roi) != 2 or min(roi) < 1 or any(s % multiple for s in roi):
        nearest = [max(multiple, round(s / multiple) * multiple) for s in roi] if len(roi) == 2 else [64, 64]
        example = json.dumps(nearest, separators=(",", ":"))  # quoted and without spaces: one shell word
        raise ValueError(
            f"roi_size={list(roi_size)}: expected two positive in-plane sizes, each a multiple of {multiple} (the "
            f'network halves the size {multiple.bit_length() - 1} times); e.g. --roi_size "{example}".'
        )
    return roi


def read_datalist_json(path: str | Path, data_dir: str | Path | None = None) -> dict[str, Any]:
    """Read a datalist JSON, reporting a missing or malformed file by name with the command that writes it.

    Raises:
        FileNotFoundError / ValueError: naming the file and what to do.
    """
    path = Path(path)
    if data_dir is None or Path(data_dir).resolve() == path.parent.resolve():
        make = f"medsegdiff-monai datalist --data-dir {data_dir if data_dir is not None else path.parent} --out {path}"
        root = ""
    else:  # a datalist away from the data root (e.g. one given with --input): which data it lists is not known
        make = f"medsegdiff-monai datalist --data-dir <BraTS folder> --out {path}"
        root = f" (its paths are read relative to dataset_dir {data_dir}: pass --dataset_dir <BraTS folder> too)"
    if not path.is_file():
        raise FileNotFoundError(f"datalist {path} does not exist: write it with `{make}`{root}.")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(
            f"datalist {path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}): "
            f"fix it or write it again with `{make}`."
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"datalist {path} is not a text file: write it again with `{make}`.") from None
    if not isinstance(content, dict):
        raise ValueError(f"datalist {path} holds a {type(content).__name__}, expected an object: `{make}`.")
    return content


def check_subject_files(
    subject_id: str,
    images: Sequence[str | Path],
    label: str | Path | None = None,
    voxels: str = "all",
    allow_empty_modality: bool = False,
) -> list[str]:
    """Problems of one subject's files, in the release their names follow (labels {0, 1, 2, 4} or {0, 1, 2, 3}).

    Checks the modality order by file name and that every file exists; then the headers (readable 3D NIfTI, one
    shape and affine), the voxel data (readable, finite, label values of the release) of ``voxels``: ``"all"``
    files, the ``"label"`` alone (the cost of a headers-only check plus one label read) or ``"none"``; and, unless
    ``allow_empty_modality``, that no modality is all zero or constant.

    Args:
        subject_id: the subject, named in every message.
        images: the four modality files in t1, t1ce, t2, flair order.
        label: the segmentation file, or None.
        voxels: which files' voxel data to read: ``"all"``, ``"label"`` or ``"none"``.
        allow_empty_modality: an empty or constant modality is not a problem.

    Returns:
        one message per problem, each naming the subject and the file.
    """
    if voxels not in ("all", "label", "none"):
        raise ValueError(f"voxels must be 'all', 'label' or 'none', got {voxels!r}.")
    paths = [Path(p) for p in images]
    label_path = Path(label) if label else None
    problems = modality_order_problems(subject_id, images)
    problems.extend(
        f"subject {subject_id}: file {p} does not exist." for p in [*paths, label_path] if p and not p.is_file()
    )
    if problems:
        return problems
    release = release_of_file(paths[0], bare=True) or "brats2020"
    subject = BratsSubject(subject_id, images=tuple(paths), label=label_path, release=release)
    found = check_subject_volumes(subject, check_voxels=voxels == "all")
    if not found and voxels == "label" and label_path is not None:
        found = check_subject_volumes(replace(subject, images=()), check_voxels=True)
    if not found and not allow_empty_modality:
        found = [m for p in paths if (m := empty_modality_problem(subject_id, p)) is not None]
    return found


def check_subject_entries(
    entries: Sequence[Mapping[str, Any]],
    where: str,
    base_dir: str | Path | None = None,
    require_label: bool = True,
    require_grade: bool = False,
    allow_empty_modality: bool = False,
) -> list[str]:
    """Problems of datalist entries: fields, modality order, files, headers, label values and empty modalities.

    Reads the headers of every file, the voxels of the label files and three axial slices of each modality (see
    :func:`~medsegdiff_monai.data.input_checks.empty_modality_problem`): about the cost of a headers-only check.

    Args:
        entries: ``{"image": [t1, t1ce, t2, flair], "label": ..., "grade": ..., "subject_id": ...}`` items.
        where: the list's name for messages, e.g. ``"datalist.json 'training'"``.
        base_dir: the root of relative paths (None: paths as given).
        require_label: a missing ``label`` is a problem.
        require_grade: a missing ``grade`` is a problem (one other than 0 / 1 / ``"LGG"`` / ``"HGG"`` always is).
        allow_empty_modality: an empty or constant modality is not a problem.

    Returns:
        one message per problem, each naming the subject and the file or field.
    """
    root = Path(base_dir) if base_dir is not None else None
    problems: list[str] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            problems.append(f"{where}[{index}]: expected an object with 'image', got {entry!r}.")
            continue
        subject_id = str(entry.get("subject_id", f"{where}[{index}]"))
        images = entry.get("image")
        if not isinstance(images, list) or len(images) != len(MODALITIES):
            problems.append(
                f"subject {subject_id} ({where}[{index}]): 'image' must list the {len(MODALITIES)} modality files "
                f"({', '.join(MODALITIES)}), got {images!r}."
            )
            continue
        if require_label and not entry.get("label"):
            problems.append(f"subject {subject_id} ({where}[{index}]): no 'label' file given.")
            continue
        if require_grade and entry.get("grade") is None:
            problems.append(
                f"subject {subject_id} ({where}[{index}]): no 'grade'; the grade head needs one for every training "
                "and validation subject. Write the datalist again with `medsegdiff-monai datalist --grades "
                "GRADES.csv`, or pass --use_grade_head false to train segmentation only."
            )
        elif entry.get("grade") is not None:
            try:
                grade_index(entry["grade"], subject_id)
            except ValueError as error:
                problems.append(
                    f"{error} ({where}[{index}]) Write the datalist again with `medsegdiff-monai datalist`."
                )
        paths = [root / p if root is not None else Path(p) for p in images]
        label = entry.get("label")
        label_path = (root / label if root is not None else Path(label)) if label else None
        problems.extend(
            check_subject_files(
                subject_id, paths, label_path, voxels="label", allow_empty_modality=allow_empty_modality
            )
        )
    return problems


def check_training_inputs(
    datalist: str | Path,
    dataset_dir: str | Path,
    roi_size: Sequence[int],
    roi_multiple: int,
    require_grade: bool = True,
    allow_empty_modality: bool = False,
    progress: bool = True,
    num_processes: int = 1,
) -> None:
    """Everything a training run reads, checked before the cache fill; the roi size first (no file is read for it).

    Args:
        datalist: the datalist JSON (``training`` and ``validation`` lists, paths relative to ``dataset_dir``).
        dataset_dir: the data root.
        roi_size: the training in-plane size.
        roi_multiple: what each roi side must be a multiple of (``2 ** (levels - 1)`` of the network).
        require_grade: every entry needs a grade (a grade head is trained).
        allow_empty_modality: an empty or constant modality is not an error.
        progress: show a progress bar over subjects.
        num_processes: the DDP world size: each process validates its share of the ``validation`` list, so the list
            needs at least one subject per process.

    Raises:
        ValueError / FileNotFoundError: naming the setting or file and what to do; ``BratsDataError`` lists every
            problem found in the files.
    """
    from tqdm import tqdm

    check_roi_size(roi_size, roi_multiple)
    content = read_datalist_json(datalist, dataset_dir)
    problems: list[str] = []
    for key in ("training", "validation"):
        entries = content.get(key)
        if not isinstance(entries, list) or not entries:
            problems.append(
                f"datalist {datalist}: list {key!r} is missing or empty; write it with `medsegdiff-monai datalist "
                f"--data-dir {dataset_dir} --out {datalist}`."
            )
            continue
        if key == "validation" and len(entries) < num_processes:
            problems.append(
                f"datalist {datalist}: list 'validation' has {len(entries)} subject(s) for {num_processes} processes, "
                "and each process validates at least one: start fewer processes (torchrun --nproc_per_node "
                f"{len(entries)}), or write the datalist with a larger --val-fraction."
            )
        bar = tqdm(entries, desc=f"checking {key} inputs", unit="subject", disable=not progress, leave=False)
        problems.extend(
            check_subject_entries(
                bar,
                f"{Path(datalist).name} {key!r}",
                base_dir=dataset_dir,
                require_grade=require_grade,
                allow_empty_modality=allow_empty_modality,
            )
        )
    problems.extend(_shared_subject_problems(content, datalist, dataset_dir))
    if problems:
        raise BratsDataError(problems)


def first_image(entry: Any) -> str | None:
    """The first ``image`` path of a datalist entry as written, or None for an entry without one (that entry's
    problem is reported by :func:`check_subject_entries`)."""
    images = entry.get("image") if isinstance(entry, Mapping) else None
    return images[0] if isinstance(images, list) and images and isinstance(images[0], str) else None


def _datalist_command(content: Mapping[str, Any], datalist: str | Path, dataset_dir: str | Path) -> str:
    """How to write ``datalist`` again: the ``datalist`` command with the fractions and seed of its ``split`` record
    (the same lists while the folder's subjects are the same), replacing the file."""
    split = content.get("split") if isinstance(content.get("split"), Mapping) else {}
    options = [
        part
        for key, option in (
            ("val_fraction", "--val-fraction"),
            ("test_fraction", "--test-fraction"),
            ("seed", "--seed"),
        )
        if split.get(key) is not None
        for part in (option, str(split[key]))
    ]
    command = ["medsegdiff-monai", "datalist", "--data-dir", str(dataset_dir), "--out", str(datalist), *options]
    fractions = "" if options else " with the --val-fraction and --test-fraction of its lists"
    return (
        f"Write the datalist again with `{shlex.join([*command, '--overwrite'])}`{fractions}, adding the --grades "
        "table it was written with, if any."
    )


def _shared_subject_problems(content: Mapping[str, Any], datalist: str | Path, dataset_dir: str | Path) -> list[str]:
    """A subject (the same first image file) or one patient's timepoints (BraTS 2023+ ``BraTS-GLI-00001-000`` and
    ``BraTS-GLI-00001-001``, see :func:`patient_of`) in two of ``training``, ``validation`` and ``testing``: the
    validation subjects choose the checkpoint and fit the calibration, the testing ones measure what neither saw, so
    none of them may share a patient with another list."""

    def first_images(entries: Any) -> dict[Path, str]:
        found = {}
        for entry in entries if isinstance(entries, list) else []:
            if (image := first_image(entry)) is not None:
                path = (Path(dataset_dir) / image).resolve()
                found[path] = str(entry.get("subject_id") or path.parent.name)
        return found

    lists = {key: first_images(content.get(key)) for key in ("training", "validation", "testing")}
    patients = {key: subjects_by_patient(lists[key].values()) for key in ("training", "validation")}
    again = _datalist_command(content, datalist, dataset_dir)
    problems = []
    for first, second in (("training", "validation"), ("training", "testing"), ("validation", "testing")):
        if shared := [subject for path, subject in lists[second].items() if path in lists[first]]:
            problems.append(
                f"datalist {datalist}: {len(shared)} subject(s) in both {first!r} and {second!r} "
                f"({', '.join(shared)}); a {second} subject must be held out from {first}. {again}"
            )
        pairs = [
            f"{other} in {first!r} and {subject} in {second!r}"
            for path, subject in lists[second].items()
            if path not in lists[first]
            for other in patients[first].get(patient_of(subject), [])
            if other != subject
        ]
        if pairs:
            problems.append(
                f"datalist {datalist}: {len(pairs)} pair(s) of one patient's timepoints in {first!r} and {second!r} "
                f"({', '.join(pairs)}); a patient's timepoints must all be in one list, else the {second} subjects "
                f"are not held out from {first}. {again}"
            )
    return problems
