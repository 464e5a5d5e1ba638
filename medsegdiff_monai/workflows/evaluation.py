"""Evaluation workflow: whole-subject inference on labelled subjects, then the metrics report."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medsegdiff_monai.data.layout import grade_index
from medsegdiff_monai.data.preflight import read_datalist_json
from medsegdiff_monai.metrics import EvaluationResult, evaluate_subjects, format_table, write_evaluation
from medsegdiff_monai.metrics.evaluation import REPORT_FILENAMES, check_evaluation_settings
from medsegdiff_monai.utils import unwrap_module
from medsegdiff_monai.workflows.inputs import InputSource, is_datalist, resolve_entries
from medsegdiff_monai.workflows.pipeline import (
    REGION_UNCERTAINTY_KINDS,
    BratsVolumeInferer,
    SubjectOutput,
    subjects_of_stopped_runs,
)

__all__ = ["evaluation_list", "evaluation_provenance", "is_in_sample", "run_evaluation"]

HELD_OUT_LIST = "testing"
"""The datalist list that training never reads (not for training, checkpoint selection or the grade calibration)."""


def evaluation_list(source: InputSource) -> str:
    """The datalist list an evaluation of ``source`` scores by default: ``"testing"`` where the datalist has one
    (held out from training, checkpoint selection and the grade calibration), else ``"validation"``; ``"validation"``
    for any other source (a folder, files), which does not use it."""
    if is_datalist(source) and HELD_OUT_LIST in read_datalist_json(source):
        return HELD_OUT_LIST
    return "validation"


def is_in_sample(source: InputSource, datalist_key: str) -> bool | None:
    """Whether an evaluation of list ``datalist_key`` of ``source`` scores subjects that training used: a datalist's
    ``training`` or ``validation`` list (the validation subjects choose the best checkpoint and fit the grade
    calibration), in which case a warning says so; None for a folder or files, which cannot be told apart."""
    if not is_datalist(source):
        return None
    if datalist_key == HELD_OUT_LIST:
        return False
    logging.getLogger("medsegdiff_monai").warning(
        f"the {datalist_key!r} list of {source} is scored: if the network was trained on this datalist, those "
        "subjects chose its best checkpoint and fitted its grade calibration (or trained it), so the figures are "
        f"in-sample. Score the {HELD_OUT_LIST!r} list (medsegdiff-monai datalist --test-fraction) for held-out figures."
    )
    return True


def evaluation_provenance(
    source: InputSource, datalist_key: str, checkpoint: str | os.PathLike | None = None
) -> dict[str, Any]:
    """What an evaluation of ``source`` scores, for :func:`run_evaluation`'s ``provenance``: the input, the list and
    whether it is in-sample (:func:`is_in_sample`, which warns; both None for a folder or files, which use no list),
    and the checkpoint."""
    in_sample = is_in_sample(source, datalist_key)
    return {
        "input": str(source) if isinstance(source, (str, os.PathLike)) else [str(path) for path in source],
        "datalist_key": datalist_key if in_sample is not None else None,
        "in_sample": in_sample,
        "checkpoint": None if checkpoint is None else str(checkpoint),
    }


def _provenance(inferer: BratsVolumeInferer, given: Mapping[str, Any] | None) -> dict[str, Any]:
    """What produced an evaluation: ``given`` (e.g. input, list, checkpoint), the sampler, the kind of the QU-BraTS
    maps scored (if any) and the grade calibration."""
    sampler = inferer.sampler
    provenance: dict[str, Any] = {
        key: str(value) if isinstance(value, os.PathLike) else value for key, value in (given or {}).items()
    }
    provenance["sampler"] = {
        "scheduler": sampler.scheduler_name,
        "num_inference_steps": sampler.num_inference_steps,
        "ensemble_size": sampler.ensemble_size,
        "eta": sampler.eta,
        "seed": sampler.seed,
    }
    if inferer.write_region_uncertainty:
        provenance["region_uncertainty_map"] = inferer.region_uncertainty_map
    calibration = getattr(unwrap_module(inferer.network), "grade_calibration", None)
    if calibration is not None:
        provenance["grade_calibration"] = {"scale": float(calibration.scale), "bias": float(calibration.bias)}
    return provenance


def run_evaluation(
    inferer: BratsVolumeInferer,
    source: InputSource,
    output_dir: str | Path,
    datalist_key: str = "validation",
    data_dir: str | Path | None = None,
    num_eval_cases: int | None = None,
    include_hd95: bool = True,
    print_table: bool = True,
    hd95_convention: str = "brats",
    lesion_challenge: str | None = "BraTS-GLI",
    bootstrap_resamples: int = 2000,
    provenance: Mapping[str, Any] | None = None,
) -> EvaluationResult:
    """
    Run ``inferer`` on labelled subjects and compare the label maps it wrote with the ground truth.

    Writes into ``output_dir`` the inference outputs (see :class:`BratsVolumeInferer`), ``metrics_per_subject.csv``
    (Dice, IoU, HD95, lesion-wise Dice and HD95 per region TC/WT/ET and their means, true grade, p_hgg; with the
    inferer's ``write_region_uncertainty``, the QU-BraTS uncertainty figures with the T1's non-zero voxels as the
    brain) and
    ``summary.json`` (mean and std of every metric, 95 % bootstrap intervals of every mean; AUC, F1, accuracy, ECE,
    Brier and confusion matrix of the grade, with intervals), ``reliability.png`` where the grade is scored, and
    prints the table. A BraTS folder's grades come from its ``name_mapping.csv``.

    Args:
        inferer: the configured whole-subject inferer.
        source: labelled subjects: a datalist JSON (list ``datalist_key``), a BraTS folder or entries with
            ``label`` (and ``grade`` for the grade metrics).
        output_dir: output folder.
        datalist_key: list of a datalist to evaluate.
        data_dir: data root of the datalist's relative paths (default: the JSON's folder).
        num_eval_cases: evaluate only the first ``num_eval_cases`` subjects (None: all).
        include_hd95: compute HD95 (the slowest metric).
        print_table: print the per-subject table and the summary.
        hd95_convention: ``"brats"`` (pooled 95th percentile, 373.13 mm for one empty region: the BraTS
            leaderboards) or ``"monai"`` (the larger directed 95th percentile, the volume's diagonal).
        lesion_challenge: parameters of the lesion-wise Dice and HD95 (``"BraTS-GLI"``: dilation 3, lesions over
            50 mm^3; see :data:`~medsegdiff_monai.metrics.LESION_WISE_PARAMETERS`); ``None`` leaves them out.
        bootstrap_resamples: resamples of the 95 % intervals of Dice, AUC, ECE and Brier (0: none).
        provenance: what the report was made from (e.g. ``{"input": ..., "datalist_key": ..., "in_sample": ...,
            "checkpoint": ...}``), written to ``summary.json`` under ``"provenance"`` with the sampler's settings and
            the network's grade calibration, so that an in-sample report can be told from a held-out one.

    Raises:
        ValueError: naming the subjects without a label file or with a grade other than 0 / 1 / ``"LGG"`` /
            ``"HGG"``, or a bad setting (see
            :func:`~medsegdiff_monai.metrics.evaluation.check_evaluation_settings`).
        FileExistsError: when ``output_dir`` holds a report and the inferer's ``overwrite`` is False.

    Every error above comes before any subject is sampled. The report is computed from the outputs before they move
    into ``output_dir`` and moves in with them: an interrupted or failed evaluation leaves ``output_dir`` as it was.
    """
    check_evaluation_settings(hd95_convention, lesion_challenge, bootstrap_resamples)
    entries = resolve_entries(source, datalist_key, data_dir, num_eval_cases)
    unlabelled = [str(e.get("subject_id", e["image"][0])) for e in entries if not e.get("label")]
    if unlabelled:
        raise ValueError(f"evaluation needs a label file for every subject; none for: {', '.join(unlabelled)}.")
    bad_grades = []
    for entry in entries:
        if entry.get("grade") is not None:
            try:
                grade_index(entry["grade"], str(entry.get("subject_id", entry["image"][0])))
            except ValueError as error:
                bad_grades.append(str(error))
    if bad_grades:
        raise ValueError(" ".join(bad_grades) + " Correct the datalist's 'grade' fields, or leave them out.")
    report = [name for name in REPORT_FILENAMES if (Path(output_dir) / name).exists()]
    if report and not inferer.overwrite and not subjects_of_stopped_runs(output_dir):  # else its own, moved in
        raise FileExistsError(
            f"output folder {output_dir} already holds an evaluation report ({', '.join(report)}). Nothing was "
            "written. Pass --overwrite true to replace it, or choose another --output_dir."
        )
    report: dict[str, Any] = {}

    def score_before_moving_in(staging: Path, outputs: list[SubjectOutput]) -> None:
        predictions = []
        for output, entry in zip(outputs, entries, strict=True):
            prediction = {
                "subject_id": output.subject_id,
                "pred_file": staging / output.files["seg"].name,
                "label_file": entry["label"],
                "p_hgg": output.p_hgg,
                "grade": entry.get("grade"),
            }
            if inferer.write_region_uncertainty:
                maps = REGION_UNCERTAINTY_KINDS.items()
                prediction["uncertainty_files"] = {region: staging / output.files[kind].name for region, kind in maps}
                prediction["brain_file"] = entry["image"][0]
            predictions.append(prediction)
        result = evaluate_subjects(
            predictions,
            include_hd95=include_hd95,
            hd95_convention=hd95_convention,
            lesion_challenge=lesion_challenge,
            bootstrap_resamples=bootstrap_resamples,
        )
        result.summary["provenance"] = _provenance(inferer, provenance)
        report["result"] = result
        write_evaluation(result, staging)
        report["names"] = {path.name for path in staging.iterdir()}

    inferer.run(entries, output_dir, finalize=score_before_moving_in)
    for name in REPORT_FILENAMES:  # a file of an earlier report that this one has not (reliability.png)
        if name not in report["names"]:
            (Path(output_dir) / name).unlink(missing_ok=True)
    result: EvaluationResult = report["result"]
    if print_table:
        print(format_table(result))
    return result
