"""Class-weighted softmax focal loss of the tumour grade (LGG = 0, HGG = 1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.losses import FocalLoss
from torch.nn.modules.loss import _Loss

from medsegdiff_monai.utils import renamed_args

__all__ = ["GradeFocalLoss"]


def _grade_weights(alpha: Any) -> tuple[float, float]:
    """``(alpha_LGG, alpha_HGG)`` from a sequence, array or tensor of two real numbers, finite in float32, >= 0 and
    not both 0.

    Raises:
        ValueError: naming the value and what it must be (``--class_weights`` in the bundle).
    """
    values = None
    if not isinstance(alpha, (str, bytes)):
        try:
            values = np.asarray(alpha.detach().cpu() if isinstance(alpha, torch.Tensor) else alpha)
        except (TypeError, ValueError):
            values = None
    if values is None or values.shape != (2,) or values.dtype.kind not in "iuf":
        raise ValueError(
            "GradeFocalLoss alpha gives one weight per grade, [alpha_LGG, alpha_HGG] (--class_weights in the "
            f"bundle), got {alpha!r}."
        )
    weights = values.astype(np.float32)
    if not np.isfinite(weights).all():
        raise ValueError(f"GradeFocalLoss alpha weights must be finite (in float32), got {alpha!r}.")
    if (weights < 0).any() or not (weights > 0).any():
        raise ValueError(
            f"GradeFocalLoss alpha weights must be >= 0 and not all 0 (the grade loss would be 0, and the grade "
            f"head would learn nothing), got {tuple(float(w) for w in weights)}."
        )
    return float(weights[0]), float(weights[1])


class GradeFocalLoss(_Loss):
    """
    Softmax focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017,
    https://arxiv.org/abs/1708.02002) with per-class weights, on MONAI's :py:class:`monai.losses.FocalLoss`
    (``use_softmax=True, to_onehot_y=True, reduction="none"``; the weight ``alpha[y_b]`` of each sample's target class
    is applied after it, which equals FocalLoss's ``weight=alpha`` without its per-call host synchronisations):

    ``L = (1/B) * sum_b alpha[y_b] * (1 - p_b[y_b])**gamma * (-log p_b[y_b])``, ``p_b = softmax(grade_logits_b)``.

    The weights are not normalised by ``sum_b alpha[y_b]`` (unlike ``torch.nn.CrossEntropyLoss(weight=...)`` with
    mean reduction). With ``alpha_c = N / (2 * n_c)`` from the training split's subject counts the weighted terms
    already average to the scale of an unweighted loss over that split. Note that MONAI's ``FocalLoss(reduction=
    "mean")`` averages over all B x C entries of the one-hot loss map (only the target class is non-zero), which is
    ``L / C``; this class sums over classes and averages over the batch, so with ``gamma=0`` and no ``alpha`` it
    equals the plain cross-entropy.

    Args:
        alpha: per-class weights (alpha_LGG, alpha_HGG), all >= 0 and not all 0; None for no weighting.
        gamma: focusing exponent (0 gives the weighted cross-entropy).

    Example:
        >>> loss = GradeFocalLoss(alpha=(2.428, 0.630))
        >>> loss(torch.randn(4, 2), torch.tensor([0, 1, 1, 0]))
    """

    def __init__(self, alpha: Sequence[float] | None = None, gamma: float = 2.0) -> None:
        super().__init__()
        self.alpha = None if alpha is None else _grade_weights(alpha)
        if gamma < 0:
            raise ValueError(f"GradeFocalLoss gamma must be >= 0, got {gamma}.")
        # alpha is applied here, as alpha[grade], rather than as FocalLoss's ``weight``: MONAI checks and copies that
        # list on every call (two host synchronisations per step on a GPU)
        self.register_buffer("alpha_weights", None if alpha is None else torch.tensor(self.alpha), persistent=False)
        self.alpha_weights: torch.Tensor | None
        self.focal = FocalLoss(to_onehot_y=True, use_softmax=True, gamma=gamma, reduction="none")

    @renamed_args(cls_logits="grade_logits")
    def forward(
        self, grade_logits: torch.Tensor, grade: torch.Tensor, sample_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            grade_logits: grade logits (B, num_classes).
            grade: integer class per sample (B,), values in [0, num_classes); a floating-point grade is refused, and
                a value out of range is refused when ``grade`` is on the CPU.
            sample_weight: optional (B,) weights >= 0 (for example 1 on tumour-bearing slices, 0 elsewhere). The
                loss is then ``sum_b w_b * l_b / max(sum_b w_b, 1)``: with 0 / 1 weights the mean over the samples of
                weight 1, and 0 (with zero gradients) for a batch whose weights are all 0 (weights summing to less
                than 1 are not renormalised).

        Returns:
            scalar loss.
        """
        if grade_logits.ndim != 2 or grade.shape != grade_logits.shape[:1]:
            raise ValueError(
                f"GradeFocalLoss expects grade_logits (B, num_classes) and grade (B,), got {tuple(grade_logits.shape)} "
                f"and {tuple(grade.shape)}."
            )
        num_classes = grade_logits.shape[1]
        if self.alpha is not None and len(self.alpha) != num_classes:
            raise ValueError(
                f"GradeFocalLoss has {len(self.alpha)} alpha weights but grade_logits has {num_classes} classes."
            )
        if grade.is_floating_point() or grade.is_complex():
            raise ValueError(
                f"GradeFocalLoss expects an integer grade (0 = LGG, 1 = HGG), got dtype {grade.dtype}; a fractional "
                "grade would be truncated. Pass grade.long() of whole class indices."
            )
        # the values are checked where that costs no host synchronisation; a CUDA index out of range fails anyway
        if grade.device.type == "cpu" and grade.numel() and not 0 <= int(grade.min()) <= int(grade.max()) < num_classes:
            raise ValueError(
                f"GradeFocalLoss expects grade values in [0, {num_classes}), got {sorted(set(grade.tolist()))}."
            )
        grade = grade.long()
        per_sample = self.focal(grade_logits, grade[:, None]).sum(dim=1)
        if self.alpha_weights is not None:
            if self.alpha_weights.device != grade_logits.device:  # once, for a loss module left on the CPU
                self.alpha_weights = self.alpha_weights.to(grade_logits.device)
            per_sample = per_sample * self.alpha_weights[grade]
        if sample_weight is None:
            return per_sample.mean()
        if sample_weight.shape != per_sample.shape:
            raise ValueError(
                f"GradeFocalLoss expects sample_weight of shape {tuple(per_sample.shape)} (B,), got "
                f"{tuple(sample_weight.shape)}."
            )
        sample_weight = sample_weight.to(per_sample.dtype)
        return (per_sample * sample_weight).sum() / sample_weight.sum().clamp(min=1.0)
