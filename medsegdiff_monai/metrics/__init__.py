"""Segmentation (Dice, IoU, HD95 per BraTS region) and grading (AUC, F1, Acc, ECE) metrics."""

from medsegdiff_monai.metrics.grading import expected_calibration_error, grade_metrics
from medsegdiff_monai.metrics.segmentation import BRATS_REGIONS, segmentation_metrics

__all__ = ["BRATS_REGIONS", "expected_calibration_error", "grade_metrics", "segmentation_metrics"]
