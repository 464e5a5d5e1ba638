"""Losses of medsegdiff_monai: segmentation (Dice + focal, with calibration), grade focal, uncertainty weighting."""

from medsegdiff_monai.losses.grade_focal import GradeFocalLoss
from medsegdiff_monai.losses.segmentation import SegmentationLoss
from medsegdiff_monai.losses.uncertainty_weighting import UncertaintyWeightedLoss

__all__ = ["GradeFocalLoss", "SegmentationLoss", "UncertaintyWeightedLoss"]
