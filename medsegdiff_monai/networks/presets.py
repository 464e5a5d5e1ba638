"""Named size presets of :py:class:`DiffusionUNetWithGradeHead` and a factory usable as a bundle ``_target_``."""

from __future__ import annotations

from typing import Any

from medsegdiff_monai.networks.diffusion_unet_grade import DiffusionUNetWithGradeHead
from medsegdiff_monai.utils import renamed_args

__all__ = ["NETWORK_PRESETS", "get_network"]

NETWORK_PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests and demo: < 2 M parameters, 4 levels (inputs divisible by 8), fast at 64x64-96x96 on 2 cores.
    "small": {
        "channels": (32, 48, 64, 64),
        "num_res_blocks": 1,
        "attention_levels": (False, False, False, True),
        "num_head_channels": 32,
        "norm_num_groups": 8,
        "condition_channels": (16, 32, 48, 64),
        "condition_num_res_blocks": 1,
        "grade_hidden_channels": 64,
    },
    # The seed's MedSegDiff-V2 size: 128 base channels, 2 residual blocks, attention at 1/16 (level 4), 5 levels
    # (inputs divisible by 16); a lighter condition UNet.
    "base": {
        "channels": (128, 128, 256, 256, 512),
        "num_res_blocks": 2,
        "attention_levels": (False, False, False, False, True),
        "num_head_channels": 64,
        "norm_num_groups": 32,
        "condition_channels": (32, 64, 128, 128, 256),
        "condition_num_res_blocks": 1,
        "grade_hidden_channels": 256,
        "use_flash_attention": True,
    },
}


@renamed_args(use_cls_head="use_grade_head", cls_hidden_channels="grade_hidden_channels", cls_dropout="grade_dropout")
def get_network(preset: str = "small", **overrides: Any) -> DiffusionUNetWithGradeHead:
    """
    Build a :py:class:`DiffusionUNetWithGradeHead` from a named preset, any constructor argument overridden.

    Args:
        preset: a key of :py:data:`NETWORK_PRESETS` (``"small"`` or ``"base"``).
        overrides: constructor arguments replacing the preset's (e.g. ``mask_channels=1, use_grade_head=False``).

    Bundle config example: ``{"_target_": "medsegdiff_monai.networks.get_network", "preset": "small"}``.
    """
    if preset not in NETWORK_PRESETS:
        raise ValueError(f"unknown network preset {preset!r}; expected one of {sorted(NETWORK_PRESETS)}.")
    return DiffusionUNetWithGradeHead(**{**NETWORK_PRESETS[preset], **overrides})
