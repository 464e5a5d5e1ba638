"""Segmentation (Dice, IoU, HD95, lesion-wise scores per BraTS region), grading (AUC, F1, Acc, ECE, Brier) and
uncertainty metrics, bootstrap intervals and evaluation reports."""

from medsegdiff_monai.metrics.bootstrap import bootstrap_interval
from medsegdiff_monai.metrics.calibration import (
    brier_score,
    calibrated_ece_floor,
    reliability_bins,
    reliability_diagram,
)
from medsegdiff_monai.metrics.evaluation import EvaluationResult, evaluate_subjects, format_table, write_evaluation
from medsegdiff_monai.metrics.grading import expected_calibration_error, grade_metrics
from medsegdiff_monai.metrics.lesion_wise import (
    LESION_MISS_HD95,
    LESION_WISE_PARAMETERS,
    lesion_wise_metrics,
    lesion_wise_scores,
)
from medsegdiff_monai.metrics.segmentation import (
    BRATS_EMPTY_HD95,
    BRATS_REGIONS,
    HD95_CONVENTIONS,
    hd95,
    segmentation_metrics,
)
from medsegdiff_monai.metrics.uncertainty import (
    QU_BRATS_MAP_KINDS,
    QU_BRATS_MAX,
    QU_BRATS_REGION_NAMES,
    mean_uncertainty,
    qu_brats_map,
    qu_brats_near_miss_map,
    qu_brats_region_map,
    qu_brats_scores,
    spearman_correlation,
    tumour_neighbourhood,
    voxel_error_auroc,
    wrong_voxels,
)

__all__ = [
    "BRATS_EMPTY_HD95",
    "BRATS_REGIONS",
    "HD95_CONVENTIONS",
    "LESION_MISS_HD95",
    "LESION_WISE_PARAMETERS",
    "QU_BRATS_MAP_KINDS",
    "QU_BRATS_MAX",
    "QU_BRATS_REGION_NAMES",
    "EvaluationResult",
    "bootstrap_interval",
    "calibrated_ece_floor",
    "brier_score",
    "evaluate_subjects",
    "expected_calibration_error",
    "format_table",
    "grade_metrics",
    "hd95",
    "lesion_wise_metrics",
    "lesion_wise_scores",
    "mean_uncertainty",
    "qu_brats_map",
    "qu_brats_near_miss_map",
    "qu_brats_region_map",
    "qu_brats_scores",
    "reliability_bins",
    "reliability_diagram",
    "segmentation_metrics",
    "spearman_correlation",
    "tumour_neighbourhood",
    "voxel_error_auroc",
    "write_evaluation",
    "wrong_voxels",
]
