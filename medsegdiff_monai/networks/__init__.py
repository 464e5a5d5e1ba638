"""Networks of medsegdiff_monai: the MedSegDiff-V2 diffusion UNet with a grade head, its blocks, presets, weights."""

from medsegdiff_monai.networks.anchor import AnchorGate, SeparableGaussianBlur
from medsegdiff_monai.networks.calibration import GradeCalibration, fit_platt_scaling, logit
from medsegdiff_monai.networks.checkpoint import extract_network_state, load_network_weights
from medsegdiff_monai.networks.condition_unet import ConditionResBlock, ConditionUNet
from medsegdiff_monai.networks.diffusion_unet_grade import ConditionFeatures, DiffusionUNetWithGradeHead
from medsegdiff_monai.networks.fused_norm import (
    FusedGroupNorm,
    FusedResnetBlock,
    SiLULinear,
    fuse_group_norms,
    triton_available,
)
from medsegdiff_monai.networks.grade_head import GradeHead, RunningStandardization
from medsegdiff_monai.networks.inferer_adapter import DiffusionInfererAdapter
from medsegdiff_monai.networks.presets import NETWORK_PRESETS, get_network
from medsegdiff_monai.networks.ss_former import SpectralCrossAttention, SSFormerBlock
from medsegdiff_monai.networks.upsample import NearestUpsample, replace_nearest_upsampling
from medsegdiff_monai.utils import moved_names

__all__ = [
    "NETWORK_PRESETS",
    "AnchorGate",
    "ConditionFeatures",
    "ConditionResBlock",
    "ConditionUNet",
    "DiffusionInfererAdapter",
    "DiffusionUNetWithGradeHead",
    "FusedGroupNorm",
    "FusedResnetBlock",
    "GradeCalibration",
    "GradeHead",
    "RunningStandardization",
    "NearestUpsample",
    "SSFormerBlock",
    "SeparableGaussianBlur",
    "SiLULinear",
    "SpectralCrossAttention",
    "extract_network_state",
    "fit_platt_scaling",
    "fuse_group_norms",
    "get_network",
    "load_network_weights",
    "logit",
    "replace_nearest_upsampling",
    "triton_available",
]

__getattr__ = moved_names(__name__, {"DiffusionUNetWithClsHead": f"{__name__}.DiffusionUNetWithGradeHead"})
