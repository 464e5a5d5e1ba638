"""Evaluation of written predictions against BraTS labels: per-subject table, summary and grade metrics."""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses
from scipy.stats import rankdata

from medsegdiff_monai.data.layout import convert_label_convention, grade_index, label_convention
from medsegdiff_monai.data.validation import AFFINE_TOLERANCE
from medsegdiff_monai.metrics.bootstrap import bootstrap_interval
from medsegdiff_monai.metrics.calibration import (
    brier_score,
    calibrated_ece_floor,
    reliability_bins,
    reliability_diagram,
)
from medsegdiff_monai.metrics.grading import expected_calibration_error, grade_metrics
from medsegdiff_monai.metrics.lesion_wise import LESION_WISE_PARAMETERS, lesion_wise_metrics
from medsegdiff_monai.metrics.segmentation import BRATS_REGIONS, HD95_CONVENTIONS, segmentation_metrics
from medsegdiff_monai.metrics.uncertainty import qu_brats_scores
from medsegdiff_monai.visualize import write_png

__all__ = [
    "REPORT_FILENAMES",
    "EvaluationResult",
    "check_evaluation_settings",
    "evaluate_subjects",
    "format_table",
    "label_map_regions",
    "write_evaluation",
]

METRICS_CSV = "metrics_per_subject.csv"
SUMMARY_JSON = "summary.json"
RELIABILITY_PNG = "reliability.png"
REPORT_FILENAMES = (METRICS_CSV, SUMMARY_JSON, RELIABILITY_PNG)
"""The files of an evaluation report (:func:`write_evaluation`)."""


class EvaluationResult(dict):
    """``{"subjects": [row, ...], "summary": {...}}``: one row per subject, and the aggregate figures."""

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self["subjects"]

    @property
    def summary(self) -> dict[str, Any]:
        return self["summary"]


def _regions(labels: np.ndarray, release: str) -> np.ndarray:
    """(X, Y, Z) BraTS labels of ``release`` -> (3, X, Y, Z) TC, WT, ET with MONAI's converter."""
    internal = convert_label_convention(labels, release, "brats2020")
    return np.asarray(ConvertToMultiChannelBasedOnBratsClasses()(internal[None]), dtype=np.uint8)


def label_map_regions(labels: np.ndarray, source: Any) -> np.ndarray:
    """(3, X, Y, Z) TC, WT, ET of a label map in the convention its values follow (either, without ET; ``source``,
    the file or subject the labels come from, is named in an error)."""
    return _regions(labels, label_convention(np.unique(labels).tolist(), source) or "brats2020")


def _on_label_grid(pred_image: Any, label_image: Any, pred_file: Any, label_file: Any) -> np.ndarray:
    """The voxels of a prediction file on its label file's grid.

    A prediction saved in another axis order or direction (RAS against the label's LPS, say) is reoriented, which
    moves no voxel off the grid; one on another grid (shifted, resampled) is refused, since comparing its voxels
    with the label's index by index would score another place of the head.

    Raises:
        ValueError: naming both files and their affines.
    """
    if pred_image.shape == label_image.shape and np.allclose(
        pred_image.affine, label_image.affine, atol=AFFINE_TOLERANCE
    ):
        return np.asarray(pred_image.dataobj)
    if len(pred_image.shape) == 3:
        transform = nib.orientations.ornt_transform(
            nib.io_orientation(pred_image.affine), nib.io_orientation(label_image.affine)
        )
        reoriented = pred_image.as_reoriented(transform)
        if reoriented.shape == label_image.shape and np.allclose(
            reoriented.affine, label_image.affine, atol=AFFINE_TOLERANCE
        ):
            return np.asarray(reoriented.dataobj)
    raise ValueError(
        f"prediction {pred_file} (shape {pred_image.shape}) does not lie on the voxel grid of its label {label_file} "
        f"(shape {label_image.shape}), also after reorienting:\n{np.round(pred_image.affine, 4)}\nvs\n"
        f"{np.round(label_image.affine, 4)}\nResample the prediction onto the label's grid (e.g. MONAI ResampleToMatch "
        "with mode='nearest') before scoring it."
    )


def _qu_brats_row(prediction: dict[str, Any], pred_regions: np.ndarray, truth_regions: np.ndarray, label_image: Any):
    """The QU-BraTS figures of each region (``qu_dice_auc_TC`` ... ``qu_score_ET``) and ``qu_score_mean``, from the
    region maps of ``prediction["uncertainty_files"]`` and the brain of ``prediction["brain_file"]`` (voxels > 0),
    each on the label's grid."""
    label_file = prediction["label_file"]
    subject = f"subject {prediction['subject_id']}"

    def on_label_grid(path: Any, what: str) -> np.ndarray:
        try:
            return _on_label_grid(nib.load(str(path)), label_image, path, label_file)
        except (OSError, ValueError) as error:  # a missing or unreadable file, or another grid
            raise ValueError(f"{subject}: {what} {path}: {error}") from error

    brain = on_label_grid(prediction["brain_file"], "brain_file") > 0
    row: dict[str, float] = {}
    for index, region in enumerate(BRATS_REGIONS):
        path = prediction["uncertainty_files"][region]
        uncertainty = on_label_grid(path, f"{region} map")
        try:
            scores = qu_brats_scores(pred_regions[index] > 0, truth_regions[index] > 0, uncertainty, brain)
        except ValueError as error:
            raise ValueError(f"{subject}: {region} map {path}: {error}") from error
        row.update({f"qu_{name}_{region}": value for name, value in scores.items()})
    row["qu_score_mean"] = float(np.mean([row[f"qu_score_{region}"] for region in BRATS_REGIONS]))
    return row


def _auc(p_hgg: np.ndarray, grade: np.ndarray) -> float:
    """ROC AUC from ranks (ties count one half, as in scikit-learn); NaN unless both grades are present."""
    positive = grade == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    return float((rankdata(p_hgg)[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def check_evaluation_settings(hd95_convention: str, lesion_challenge: str | None, bootstrap_resamples: int) -> None:
    """The settings of :func:`evaluate_subjects`, checked before any subject is read or sampled.

    Raises:
        ValueError: naming the setting and its valid values.
    """
    if hd95_convention not in HD95_CONVENTIONS:
        raise ValueError(f"hd95_convention {hd95_convention!r}: expected one of {list(HD95_CONVENTIONS)}.")
    if lesion_challenge is not None and lesion_challenge not in LESION_WISE_PARAMETERS:
        raise ValueError(
            f"lesion_challenge {lesion_challenge!r}: expected one of {list(LESION_WISE_PARAMETERS)}, or None to leave "
            "the lesion-wise scores out (--lesion_challenge null on the bundle's command line)."
        )
    if bootstrap_resamples < 0:
        raise ValueError(f"bootstrap_resamples must be >= 0 (0: no intervals), got {bootstrap_resamples}.")


def evaluate_subjects(
    predictions: Sequence[dict[str, Any]],
    include_hd95: bool = True,
    grade_threshold: float = 0.5,
    hd95_convention: str = "brats",
    lesion_challenge: str | None = "BraTS-GLI",
    bootstrap_resamples: int = 2000,
    seed: int = 0,
) -> EvaluationResult:
    """
    Per-subject segmentation metrics and subject-level grade metrics.

    Each prediction is ``{"subject_id", "label_file" (ground truth NIfTI), "p_hgg" (float or None), "grade" (0/1 or
    None; ``"LGG"`` / ``"HGG"`` are read as 0 / 1)}`` with either ``"pred_labels"`` ((X, Y, Z) BraTS labels) or
    ``"pred_file"`` (a label-map NIfTI, read one subject at a time), and optionally ``"uncertainty_files"``
    (``{"TC": ..., "WT": ..., "ET": ...}``, QU-BraTS maps 0-100) with ``"brain_file"`` (an image whose non-zero
    voxels are the brain, e.g. the T1). The label convention (enhancing tumour 4 in BraTS 2018-2022, 3 in BraTS
    2023+) of each map is detected from its values, so a prediction written in the other release's convention is
    scored by its regions all the same. Both label maps are turned into regions TC, WT, ET with MONAI's
    ``ConvertToMultiChannelBasedOnBratsClasses`` and compared on the input grid with
    :func:`~medsegdiff_monai.metrics.segmentation_metrics` (BraTS Dice convention; HD95 in mm from the label file's
    voxel size, in ``hd95_convention``: ``"brats"`` pooled percentile and 373.13 for one empty region, or
    ``"monai"``), and the lesion-wise Dice and HD95 of the BraTS 2023+ ranking
    (:func:`~medsegdiff_monai.metrics.lesion_wise_metrics` with the parameters of ``lesion_challenge``; ``None``
    leaves them out). With uncertainty maps, the QU-BraTS figures of each region (``qu_dice_auc``, ``qu_ftp_auc``,
    ``qu_ftn_auc``, ``qu_score``; :func:`~medsegdiff_monai.metrics.qu_brats_scores`) and ``qu_score_mean``.

    Intervals are percentile-bootstrap 95 % intervals over subjects (:func:`~medsegdiff_monai.metrics.
    bootstrap_interval`, ``bootstrap_resamples`` resamples from ``seed``; 0 resamples leaves them out).

    Returns:
        :class:`EvaluationResult`; ``summary`` holds, per metric, the mean and std over subjects (NaN-aware) and,
        for every one with a value (Dice, IoU, HD95, lesion-wise), ``ci95`` = [low, high] of the mean; the
        grade metrics of :func:`~medsegdiff_monai.metrics.grade_metrics` (NaN with a warning when undefined) with
        ``auc_ci95``, ``ece_ci95``, ``brier_ci95``, the ``reliability`` bins
        (:func:`~medsegdiff_monai.metrics.reliability_bins`) and ``ece_if_calibrated``
        (:func:`~medsegdiff_monai.metrics.calibrated_ece_floor`), or ``grade`` None with the reason in
        ``grade_skipped`` where no subject has both; ``grade_excluded_subjects`` (with a warning) where some
        subjects have a true grade and others none, or a NaN p_hgg; ``bootstrap`` (the interval method); and
        ``num_subjects``.
    """
    check_evaluation_settings(hd95_convention, lesion_challenge, bootstrap_resamples)
    with_maps = [bool(prediction.get("uncertainty_files")) for prediction in predictions]
    if any(with_maps) and not all(with_maps):
        missing = [str(p["subject_id"]) for p, has in zip(predictions, with_maps, strict=True) if not has]
        raise ValueError(
            f"uncertainty_files are given for some subjects but not for {', '.join(missing[:5])}: give them for every "
            "subject, or for none."
        )
    for prediction in predictions:
        files = prediction.get("uncertainty_files") or {}
        lacking = [region for region in BRATS_REGIONS if region not in files]
        if files and (lacking or not prediction.get("brain_file")):
            given = "no brain_file" if not lacking else f"no map of {', '.join(lacking)}"
            raise ValueError(
                f"subject {prediction['subject_id']}: uncertainty_files needs a map of each of TC, WT and ET and a "
                f"brain_file (e.g. the T1) beside them; got {given}."
            )
    rows = []
    for prediction in predictions:
        subject_id = prediction["subject_id"]
        label_image = nib.load(str(prediction["label_file"]))
        truth = np.asarray(label_image.dataobj)
        if "pred_labels" in prediction:
            pred = np.asarray(prediction["pred_labels"])
            pred_source = f"subject {subject_id} prediction"
        else:
            pred_source = prediction["pred_file"]
            pred = _on_label_grid(nib.load(str(pred_source)), label_image, pred_source, prediction["label_file"])
        if pred.shape != truth.shape:
            raise ValueError(
                f"subject {subject_id}: prediction shape {pred.shape} differs from label "
                f"{prediction['label_file']} shape {truth.shape}."
            )
        spacing = [float(z) for z in label_image.header.get_zooms()[:3]]
        row: dict[str, Any] = {"subject_id": subject_id}
        grade = prediction.get("grade")
        grade = None if grade is None else grade_index(grade, subject_id)
        row.update(grade=grade, p_hgg=prediction.get("p_hgg"))
        pred_regions = label_map_regions(pred, pred_source)
        truth_regions = label_map_regions(truth, prediction["label_file"])
        row.update(
            segmentation_metrics(pred_regions, truth_regions, BRATS_REGIONS, include_hd95, spacing, hd95_convention)
        )
        if lesion_challenge is not None:
            row.update(lesion_wise_metrics(pred_regions, truth_regions, BRATS_REGIONS, spacing, lesion_challenge))
        if prediction.get("uncertainty_files"):
            row.update(_qu_brats_row(prediction, pred_regions, truth_regions, label_image))
        rows.append(row)
    metric_names = [k for k in rows[0] if k not in ("subject_id", "grade", "p_hgg")] if rows else []
    summary: dict[str, Any] = {"num_subjects": len(rows)}
    for name in metric_names:
        values = np.asarray([row[name] for row in rows], dtype=np.float64)
        finite = values[~np.isnan(values)]
        summary[name] = {
            "mean": float(finite.mean()) if finite.size else math.nan,
            "std": float(finite.std()) if finite.size else math.nan,
        }
        if bootstrap_resamples and finite.size:
            summary[name]["ci95"] = list(
                bootstrap_interval(np.mean, finite, num_resamples=bootstrap_resamples, seed=seed)
            )
    if bootstrap_resamples:
        summary["bootstrap"] = {
            "method": "percentile bootstrap, subjects drawn with replacement",
            "confidence": 0.95,
            "num_resamples": bootstrap_resamples,
            "seed": seed,
        }
    with_p = [row for row in rows if row["p_hgg"] is not None]
    with_grade = [row for row in with_p if row["grade"] is not None]
    excluded = {  # NaN: no brain slice to grade; no grade: named only where others have one (else none is scored)
        "p_hgg is NaN": [row for row in with_grade if math.isnan(row["p_hgg"])],
        "no true grade": [row for row in with_p if row["grade"] is None] if with_grade else [],
    }
    for reason, left_out in excluded.items():
        if left_out:
            names = ", ".join(str(row["subject_id"]) for row in left_out[:5])
            warnings.warn(
                f"evaluation: {reason} for {len(left_out)} subject(s) ({names}): the grade metrics leave them out.",
                stacklevel=2,
            )
    if any(excluded.values()):
        summary["grade_excluded_subjects"] = [str(row["subject_id"]) for group in excluded.values() for row in group]
    graded = [row for row in with_grade if not math.isnan(row["p_hgg"])]
    if graded:
        p_hgg = np.asarray([row["p_hgg"] for row in graded], dtype=np.float64)
        grade = np.asarray([row["grade"] for row in graded], dtype=int)
        summary["grade"] = grade_metrics(p_hgg, grade, threshold=grade_threshold)
        if bootstrap_resamples:
            for name, statistic in (("auc", _auc), ("ece", expected_calibration_error), ("brier", brier_score)):
                interval = bootstrap_interval(statistic, p_hgg, grade, num_resamples=bootstrap_resamples, seed=seed)
                summary["grade"][f"{name}_ci95"] = list(interval)
        summary["grade"]["reliability"] = reliability_bins(p_hgg, grade)
        summary["grade"]["ece_if_calibrated"] = calibrated_ece_floor(p_hgg)
    else:
        reason = "no subject has both p_hgg and a true grade"
        summary["grade"], summary["grade_skipped"] = None, reason
        warnings.warn(f"evaluation: {reason}; grade metrics skipped.", stacklevel=2)
    return EvaluationResult(subjects=rows, summary=summary)


def format_table(result: EvaluationResult, columns: Sequence[str] | None = None) -> str:
    """A plain-text table: one line per subject, then the mean, std and 95 % interval of the mean over subjects,
    then the grade metrics (with 95 % intervals). The default columns are the region figures and their means, of
    the QU-BraTS figures the scores alone."""
    rows = result.rows
    if columns is None:
        per_region = tuple(f"_{r}" for r in (*BRATS_REGIONS, "mean"))
        columns = [
            k
            for k in (rows[0] if rows else {})
            if k.endswith(per_region) and (not k.startswith("qu_") or k.startswith("qu_score_"))
        ]
    header = ["subject_id", "grade", "p_hgg", *columns]

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = [[cell(row.get(key)) for key in header] for row in rows]
    lines.append(["mean", "", "", *(cell(result.summary[c]["mean"]) for c in columns)])
    lines.append(["std", "", "", *(cell(result.summary[c]["std"]) for c in columns)])
    if any("ci95" in result.summary[c] for c in columns):
        intervals = [result.summary[c].get("ci95") for c in columns]
        lines.append(["ci95", "", "", *(f"{cell(i[0])}-{cell(i[1])}" if i else "" for i in intervals)])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    text = [" ".join(h.rjust(w) for h, w in zip(header, widths))]
    text += [" ".join(v.rjust(w) for v, w in zip(line, widths)) for line in lines]
    grade = result.summary.get("grade")
    if grade is not None:

        def with_interval(key: str) -> str:
            interval = grade.get(f"{key}_ci95")
            return cell(grade[key]) + (f" [{cell(interval[0])}, {cell(interval[1])}]" if interval else "")

        text.append(
            "grade: "
            + " ".join(f"{k}={with_interval(k)}" for k in ("auc", "f1", "accuracy", "ece", "brier"))
            + f" ece_if_calibrated={cell(grade['ece_if_calibrated'])}"
            + f" confusion_matrix={grade['confusion_matrix']} (rows true LGG, HGG; columns predicted)"
        )
    return "\n".join(text)


def _json_safe(value: Any) -> Any:
    """NaN -> None (``null``), recursively, so that ``summary.json`` is strict JSON."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_evaluation(result: EvaluationResult, output_dir: str | Path) -> tuple[Path, Path]:
    """Write ``metrics_per_subject.csv``, ``summary.json`` (NaN written as ``null``) and, where the grade was scored,
    ``reliability.png`` (:func:`~medsegdiff_monai.metrics.reliability_diagram`) into ``output_dir``.

    Returns:
        the paths of the CSV and the JSON.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = output_dir / METRICS_CSV, output_dir / SUMMARY_JSON
    rows = result.rows
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["subject_id"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    with open(json_path, "w") as f:
        json.dump(_json_safe(result.summary), f, indent=2, allow_nan=False)
        f.write("\n")
    reliability = (result.summary.get("grade") or {}).get("reliability")
    if reliability is not None:
        write_png(reliability_diagram(reliability), output_dir / RELIABILITY_PNG)
    return csv_path, json_path
