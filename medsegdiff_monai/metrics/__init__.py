"""Segmentation (Dice, IoU, HD95 per BraTS region), grading (AUC, F1, Acc, ECE) and uncertainty metrics, and evaluation
reports."""

from medsegdiff_monai.metrics.evaluation import EvaluationResult, evaluate_subjects, format_table, write_evaluation
from medsegdiff_monai.metrics.grading import expected_calibration_error, grade_metrics
from medsegdiff_monai.metrics.segmentation import BRATS_REGIONS, segmentation_metrics
from medsegdiff_monai.metrics.uncertainty import (
    average_ranks,
    mean_uncertainty,
    spearman_correlation,
    tumour_neighbourhood,
    voxel_error_auroc,
    wrong_voxels,
)

__all__ = [
    "BRATS_REGIONS",
    "EvaluationResult",
    "average_ranks",
    "evaluate_subjects",
    "expected_calibration_error",
    "format_table",
    "grade_metrics",
    "mean_uncertainty",
    "segmentation_metrics",
    "spearman_correlation",
    "tumour_neighbourhood",
    "voxel_error_auroc",
    "write_evaluation",
    "wrong_voxels",
]
