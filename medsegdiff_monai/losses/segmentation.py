"""Segmentation loss of the diffusion prediction and of the calibration map."""

from __future__ import annotations

import torch
from monai.losses import DiceFocalLoss, DiceLoss
from torch.nn.modules.loss import _Loss

__all__ = ["SegmentationLoss"]


class SegmentationLoss(_Loss):
    """
    ``L_seg = DiceFocal(seg_logits, target) + lambda_calib * DiceFocal(calib_map, target)``.

    ``DiceFocal`` is MONAI's :py:class:`monai.losses.DiceFocalLoss` with ``sigmoid=True`` (one independent sigmoid
    per region channel, TC/WT/ET overlap), ``lambda_dice=1``, ``lambda_focal=lambda_focal`` and ``gamma``; with
    ``use_focal=False`` it is :py:class:`monai.losses.DiceLoss` alone. Both inputs are logits; the loss is computed
    in float32 whatever their dtype (e.g. bf16 under autocast).

    ``batch_dice=True`` (the default) computes the Dice over the whole batch per channel (nnU-Net's "batch Dice")
    instead of per sample: on 2D slices a region is often absent (no tumour, no ET in most LGG slices), and the
    per-sample soft Dice of an empty target is ~1 for any non-zero prediction, however small (e.g. a 64x64 slice
    predicted at p=0.01 everywhere scores a loss of 1.0000 per sample against 0.0 for a perfect one), so those slices
    add a constant with a vanishing gradient; batch Dice counts their false positives against the batch's tumour
    voxels instead. ``batch_dice=False`` gives MONAI's default per-sample behaviour.

    Args:
        use_focal: add the sigmoid focal term to the Dice term.
        gamma: focal exponent.
        lambda_focal: weight of the focal term (the Dice term has weight 1).
        lambda_calib: weight of the calibration-map term.
        batch_dice: Dice over the batch (True) or per sample (False).

    Example:
        >>> loss = SegmentationLoss()
        >>> target = (torch.rand(2, 3, 32, 32) > 0.5).float()
        >>> loss(torch.randn(2, 3, 32, 32), target, calib_map=torch.randn(2, 3, 32, 32))
    """

    def __init__(
        self,
        use_focal: bool = True,
        gamma: float = 1.5,
        lambda_focal: float = 0.5,
        lambda_calib: float = 1.0,
        batch_dice: bool = True,
    ) -> None:
        super().__init__()
        if lambda_calib < 0 or lambda_focal < 0:
            raise ValueError(f"SegmentationLoss weights must be >= 0, got {lambda_focal=}, {lambda_calib=}.")
        self.lambda_calib = lambda_calib
        self.region_loss: _Loss
        if use_focal:
            self.region_loss = DiceFocalLoss(
                sigmoid=True, gamma=gamma, lambda_dice=1.0, lambda_focal=lambda_focal, batch=batch_dice
            )
        else:
            self.region_loss = DiceLoss(sigmoid=True, batch=batch_dice)

    def forward(
        self, seg_logits: torch.Tensor, target: torch.Tensor, calib_map: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            seg_logits: predicted clean-mask logits (B, C_mask, *S).
            target: binary region masks in {0, 1} (B, C_mask, *S) (not the [-1, 1] diffusion scaling).
            calib_map: calibration-map logits (B, C_mask, *S), or None to skip the calibration term.

        Returns:
            scalar loss.
        """
        for name, logits in (("seg_logits", seg_logits), ("calib_map", calib_map)):
            if logits is not None and logits.shape != target.shape:
                raise ValueError(
                    f"SegmentationLoss: {name} shape {tuple(logits.shape)} must equal the target shape "
                    f"{tuple(target.shape)} (B, C_mask, *S)."
                )
        target = target.float()
        loss = self.region_loss(seg_logits.float(), target)
        if calib_map is not None and self.lambda_calib > 0:
            loss = loss + self.lambda_calib * self.region_loss(calib_map.float(), target)
        return loss
