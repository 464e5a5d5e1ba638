"""Command line ``medsegdiff-monai`` (also ``python -m medsegdiff_monai``).

Each sub-command is added by one ``_register_<name>(subparsers)`` function listed in :data:`COMMANDS`; it builds its
parser and sets ``handler``, a function taking the parsed arguments and returning the exit code. To add a command,
write such a function and append it to :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from medsegdiff_monai import __version__
from medsegdiff_monai.data import (
    DIFFICULTIES,
    GRADE_TO_INDEX,
    SYNTHETIC_LAYOUTS,
    FolderReport,
    build_datalist,
    check_datalist_path,
    class_balance_line,
    validate_brats_folder,
    write_datalist,
    write_synthetic_brats,
)

__all__ = ["COMMANDS", "build_parser", "main"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer of 0 or more, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def _add_folder_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", required=True, type=Path, help="BraTS release folder (one folder per subject).")
    parser.add_argument(
        "--grades",
        "--csv",
        dest="csv",
        type=Path,
        default=None,
        help="grade table: the release's name_mapping.csv or a CSV with columns subject_id,grade (HGG/LGG) "
        "(default: DATA_DIR/name_mapping.csv where it exists; without one, subjects are segmentation-only).",
    )
    parser.add_argument(
        "--headers-only", action="store_true", help="check NIfTI headers only, do not read voxel data (faster)."
    )
    parser.add_argument(
        "--skip-unmatched",
        action="store_true",
        help="skip (with a note) subjects without a CSV row or with an unknown grade, instead of failing.",
    )
    parser.add_argument(
        "--allow-empty-modality",
        action="store_true",
        help="report an all-zero or constant modality as a note instead of a problem.",
    )


def _print_report(report: FolderReport, success: str, failure: str) -> int:
    """Print the notes, then every problem (stderr) and ``failure``, or ``success``; return the exit code."""
    for note in report.notes:
        print(f"note: {note}")
    if report.problems:
        for problem in report.problems:
            print(f"problem: {problem}", file=sys.stderr)
        print(f"{len(report.problems)} problem(s) found{failure}.", file=sys.stderr)
        return 1
    print(success)
    return 0


def _run_synth(args: argparse.Namespace) -> int:
    out = write_synthetic_brats(
        args.out,
        num_subjects=args.subjects,
        lgg_fraction=args.lgg_fraction,
        shape=tuple(args.shape),
        seed=args.seed,
        progress=not args.no_progress,
        difficulty=args.difficulty,
        layout=args.layout,
        num_workers=args.workers,
        overwrite=args.overwrite,
    )
    print(f"wrote {args.subjects} synthetic subjects of shape {tuple(args.shape)} in the {args.layout} layout to {out}")
    return 0


def _register_synth(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="write a synthetic BraTS-like release in the real on-disk layout of BraTS 2020, 2021 or 2023.",
        description="Write synthetic subjects (int16 modalities, uint8 labels; BraTS 2020 adds the six-column "
        "name_mapping.csv); deterministic from --seed.",
    )
    parser.add_argument(
        "--layout",
        choices=list(SYNTHETIC_LAYOUTS),
        default="brats2020",
        help="release layout: brats2020 (BraTS20_Training_001_t1.nii, labels 0/1/2/4, name_mapping.csv), "
        "brats2021 (BraTS2021_00000_t1.nii.gz, labels 0/1/2/4, no grade table) or brats2023 "
        "(BraTS-GLI-00000-000-t1n.nii.gz, labels 0/1/2/3, no grade table); default brats2020.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder.")
    parser.add_argument("--subjects", type=_positive_int, default=24, help="number of subjects (default 24).")
    parser.add_argument("--lgg-fraction", type=_fraction, default=0.2, help="share of LGG subjects (default 0.2).")
    parser.add_argument(
        "--shape", type=_positive_int, nargs=3, default=[240, 240, 155], metavar=("X", "Y", "Z"), help="volume shape."
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the whole set (default 0).")
    parser.add_argument(
        "--difficulty",
        choices=sorted(DIFFICULTIES),
        default="standard",
        help="image difficulty: 'standard' (default) or 'hard' (low tumour contrast, patchy enhancement, "
        "multifocal and infiltrative tumours, strong bias field and noise).",
    )
    parser.add_argument(
        "--workers",
        type=_non_negative_int,
        default=0,
        help="write subjects in this many worker processes (default 0: in this process); the files are the same.",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the subject folders of a different set in --out (the same set is always written again).",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar.")
    parser.set_defaults(handler=_run_synth)


def _write_new_datalist(args: argparse.Namespace, datalist: dict) -> Path:
    """Write ``datalist`` to ``--out`` (default ``DATA_DIR/datalist.json``); a datalist already there that holds
    another split (whose ``testing`` subjects may be meant to stay held out) is replaced only with ``--overwrite``.

    Raises:
        FileExistsError: naming the file and what to do.
    """
    out = args.out if args.out is not None else args.data_dir / "datalist.json"
    if out.is_file() and not args.overwrite:
        try:
            earlier = json.loads(out.read_text())
        except ValueError:
            earlier = None
        if earlier != json.loads(json.dumps(datalist)):
            raise FileExistsError(
                f"{out} already holds another datalist (other subjects, split or settings); training runs and held-out "
                "testing subjects may depend on it. Nothing was written. Pass --overwrite to replace it, or choose "
                "another --out."
            )
    return write_datalist(datalist, out)


def _write_segmentation_datalist(args: argparse.Namespace, report: FolderReport) -> int:
    """``datalist`` for subjects without grades: a plain seeded split, segmentation only."""
    _print_report(report, f"{len(report.subjects)} subjects valid, without grades (segmentation only).", "")
    datalist = build_datalist(
        report.subjects, args.data_dir, val_fraction=args.val_fraction, seed=args.seed, test_fraction=args.test_fraction
    )
    out = _write_new_datalist(args, datalist)
    lists = [f"{len(datalist[key])} {key}" for key in ("training", "validation", "testing") if key in datalist]
    print(f"wrote {out}: {', '.join(lists[:-1])} and {lists[-1]} subjects")
    return 0


def _run_datalist(args: argparse.Namespace) -> int:
    if args.out is not None:
        check_datalist_path(args.out)  # before the folder's validation, which may take minutes
    report = validate_brats_folder(
        args.data_dir,
        csv_path=args.csv,
        check_voxels=not args.headers_only,
        skip_unmatched=args.skip_unmatched,
        progress=not args.no_progress,
        allow_empty_modality=args.allow_empty_modality,
    )
    if report.ok and report.subjects and all(s.grade is None for s in report.subjects):
        return _write_segmentation_datalist(args, report)
    if _print_report(report, f"{len(report.subjects)} subjects valid.", "; nothing written") != 0:
        return 1
    datalist = build_datalist(
        report.subjects,
        args.data_dir,
        val_fraction=args.val_fraction,
        seed=args.seed,
        test_fraction=args.test_fraction,
    )
    print(class_balance_line(datalist["class_balance"]))
    out = _write_new_datalist(args, datalist)
    counts = []
    for key in ("training", "validation", "testing"):
        if key in datalist:
            grades = [entry["grade"] for entry in datalist[key]]
            counts.append(
                f"{key} {len(grades)} (n_LGG={grades.count(GRADE_TO_INDEX['LGG'])} "
                f"n_HGG={grades.count(GRADE_TO_INDEX['HGG'])})"
            )
    print(f"wrote {out}: {', '.join(counts)} subjects")
    return 0


def _register_datalist(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "datalist",
        help="validate a BraTS folder and write a stratified training/validation(/testing) datalist JSON.",
        description="Validate the folder, split subjects by grade (stratified, seeded; with --test-fraction also a "
        "held-out 'testing' list, used for nothing but the final evaluation) and by patient (the timepoints of a "
        "BraTS 2023+ patient, BraTS-GLI-PPPPP-TTT, are all in one list; the fractions count patients), print the "
        "training split's n_LGG, n_HGG and alpha_c = N / (2 n_c), and write a MONAI datalist with paths relative to "
        "DATA_DIR. Load it with monai.data.load_decathlon_datalist(path, data_list_key='training', base_dir=DATA_DIR).",
    )
    _add_folder_arguments(parser)
    parser.add_argument(
        "--val-fraction", type=float, default=0.2, help="share of each grade for validation (default 0.2)."
    )
    parser.add_argument(
        "--test-fraction",
        type=float,
        default=0.0,
        help="share of each grade held out as the 'testing' list (default 0: none); every split asked for must "
        "hold at least one patient, and both grades where there are grades.",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (default 0).")
    parser.add_argument("--out", type=Path, default=None, help="output JSON (default: DATA_DIR/datalist.json).")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a datalist at --out that holds another split (the same split is always written again).",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar.")
    parser.set_defaults(handler=_run_datalist)


def _run_check(args: argparse.Namespace) -> int:
    report = validate_brats_folder(
        args.data_dir,
        csv_path=args.csv,
        require_label=not args.no_label,
        require_grade=False if args.no_grade else None,
        check_voxels=not args.headers_only,
        skip_unmatched=args.skip_unmatched,
        progress=not args.no_progress,
        allow_empty_modality=args.allow_empty_modality,
    )
    return _print_report(report, f"{args.data_dir}: {len(report.subjects)} subjects, no problem found.", "")


def _register_check(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check",
        help="validate a BraTS folder and list every problem found.",
        description="List every problem of a BraTS folder (missing or extra files, shape/affine mismatches, bad "
        "label values, non-finite or unreadable volumes, CSV mismatches); exit code 1 if there is any.",
    )
    _add_folder_arguments(parser)
    parser.add_argument("--no-label", action="store_true", help="subjects have no label file (inference release).")
    parser.add_argument(
        "--no-grade", action="store_true", help="do not require grades even where a grade table exists."
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar.")
    parser.set_defaults(handler=_run_check)


def _run_submission(args: argparse.Namespace) -> int:
    from medsegdiff_monai.workflows.pipeline import REGION_UNCERTAINTY_SUFFIXES
    from medsegdiff_monai.workflows.submission import write_submission

    written = write_submission(args.predictions, args.out, overwrite=args.overwrite, uncertainty=args.uncertainty)
    others = sorted(set(args.out.glob("*.nii.gz")) - set(written))
    if others:
        print(
            f"note: {args.out} also holds {len(others)} other .nii.gz file(s) (e.g. {others[0].name}), which a portal "
            "would take as part of the submission; remove them if they are not."
        )
    segmentations = sum(not path.name.endswith(tuple(REGION_UNCERTAINTY_SUFFIXES.values())) for path in written)
    maps = " and their region uncertainty maps" if args.uncertainty else ""
    print(f"wrote {segmentations} segmentation(s) to {args.out} as <subject_id>.nii.gz{maps}")
    return 0


def _register_submission(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "submission",
        help="copy an inference run's segmentations into a folder named as BraTS submissions expect.",
        description="Copy every <subject_id>_seg.nii.gz of an inference output folder to OUT/<subject_id>.nii.gz "
        "(e.g. BraTS2021_00001.nii.gz, BraTS-GLI-00001-000.nii.gz), the segmentations alone, byte for byte.",
    )
    parser.add_argument("--predictions", required=True, type=Path, help="the output folder of an inference run.")
    parser.add_argument("--out", required=True, type=Path, help="the submission folder (created if needed).")
    parser.add_argument("--overwrite", action="store_true", help="replace differing files of the same names.")
    parser.add_argument(
        "--uncertainty",
        action="store_true",
        help="also copy the QU-BraTS maps <subject_id>_unc_whole/_unc_core/_unc_enhance.nii.gz (inference with "
        "--write_region_uncertainty true).",
    )
    parser.set_defaults(handler=_run_submission)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _register_synth,
    _register_datalist,
    _register_check,
    _register_submission,
]
"""Registration functions of the sub-commands, in help order."""


def build_parser() -> argparse.ArgumentParser:
    """The ``medsegdiff-monai`` argument parser with every sub-command of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="medsegdiff-monai",
        description="MedSegDiff-V2 brain tumour segmentation and grading on BraTS (MONAI).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in COMMANDS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        the exit code: 0 on success, 1 when the command failed (the reason printed on stderr), 2 on a usage error.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.handler(args))
    except (ValueError, OSError) as error:
        # an operating system's error without a message of this package's reads "<path>: <reason>"
        plain = isinstance(error, OSError) and error.filename is not None and str(error).startswith("[Errno")
        print(f"error: {error.filename}: {error.strerror.lower()}" if plain else f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
