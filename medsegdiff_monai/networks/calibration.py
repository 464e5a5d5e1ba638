"""Platt scaling of the grade logits, stored with the network weights, and its fit on validation subjects."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["GradeCalibration", "fit_platt_scaling", "logit"]

_LOGIT_EPS = 1e-12


def logit(p: float | Sequence[float] | np.ndarray | torch.Tensor) -> float | np.ndarray | torch.Tensor:
    """``log(p / (1 - p))`` in float64, with ``p`` clamped to ``[1e-12, 1 - 1e-12]`` (finite at 0 and 1).

    Args:
        p: a probability (float), a list or array of probabilities (e.g. the ``p_hgg`` column of ``grades.csv``), or
            a tensor of them.

    Returns:
        the log-odds in float64: a float for a float, a tensor for a tensor, else a numpy array.
    """
    if isinstance(p, torch.Tensor):
        return torch.logit(p.to(torch.float64), eps=_LOGIT_EPS)
    log_odds = torch.logit(torch.from_numpy(np.asarray(p, dtype=np.float64)), eps=_LOGIT_EPS)
    return float(log_odds) if log_odds.ndim == 0 else log_odds.numpy()


class GradeCalibration(nn.Module):
    """Two-parameter Platt scaling of the grade logits (Platt, "Probabilistic Outputs for Support Vector Machines",
    1999): ``logit p(HGG) = scale * (z_HGG - z_LGG) + bias``.

    Applied to the head's two logits as ``z' = scale * z + (0, bias)``, so ``softmax(z')[HGG] = sigmoid(scale *
    (z_HGG - z_LGG) + bias)``. The map is affine in the logit difference, so applying it slice by slice and then
    averaging the slice log-odds (the subject-level aggregation) equals applying it to the subject's mean log-odds:
    a calibration fitted on subject-level log-odds holds inside the network. ``scale`` and ``bias`` are buffers (not
    trained by the optimizer), saved in the network's state dict as ``grade_calibration.scale`` / ``.bias``; the
    identity (1, 0) until :func:`fit_platt_scaling` sets them after training.

    A state dict without these keys (a network saved before calibration existed) loads with a warning and leaves
    the identity.

    Forward: (B, 2) logits (LGG, HGG) -> (B, 2) calibrated logits.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("bias", torch.zeros(()))
        self.scale: torch.Tensor
        self.bias: torch.Tensor

    def forward(self, grade_logits: torch.Tensor) -> torch.Tensor:
        if grade_logits.ndim != 2 or grade_logits.shape[1] != 2:
            raise ValueError(f"GradeCalibration expects (B, 2) logits, got {tuple(grade_logits.shape)}.")
        shift = torch.stack([torch.zeros_like(self.bias), self.bias]).to(grade_logits.dtype)
        return grade_logits * self.scale.to(grade_logits.dtype) + shift

    def set(self, scale: float, bias: float) -> None:
        """Set the calibration (``scale > 0``)."""
        if not scale > 0 or not math.isfinite(scale) or not math.isfinite(bias):
            raise ValueError(f"GradeCalibration needs a finite scale > 0 and a finite bias, got {scale=}, {bias=}.")
        self.scale.fill_(scale)
        self.bias.fill_(bias)

    def compose(self, scale: float, bias: float) -> None:
        """Apply ``(scale, bias)`` after the current calibration: a fit on already calibrated log-odds refines it."""
        self.set(scale * float(self.scale), scale * float(self.bias) + bias)

    @property
    def is_identity(self) -> bool:
        return float(self.scale) == 1.0 and float(self.bias) == 0.0

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        if not any(f"{prefix}{name}" in state_dict for name in ("scale", "bias")):
            warnings.warn(
                "the checkpoint holds no grade calibration (saved before calibration existed): p(HGG) is the "
                "uncalibrated network output (identity calibration). Retrain, or fit one with "
                "medsegdiff_monai.networks.fit_platt_scaling on validation subjects.",
                stacklevel=2,
            )
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def fit_platt_scaling(
    log_odds: Sequence[float] | torch.Tensor, grades: Sequence[int] | torch.Tensor, max_iter: int = 200
) -> tuple[float, float]:
    """Fit ``p(HGG) = sigmoid(scale * log_odds + bias)`` by maximum likelihood with Platt's smoothed targets.

    The targets are ``(n_HGG + 1) / (n_HGG + 2)`` for HGG and ``1 / (n_LGG + 2)`` for LGG instead of 1 and 0, which
    keeps the fit finite when the subjects are separable (on a small validation split they often are). ``scale`` is
    kept positive (fitted as ``exp(u)``): the calibration never reverses the network's ranking. L-BFGS in float64.

    Args:
        log_odds: (N,) subject-level log-odds of HGG, e.g. ``logit(p_hgg)`` of the validation subjects.
        grades: (N,) true grades (LGG 0, HGG 1); both grades must be present.
        max_iter: L-BFGS iterations.

    Returns:
        ``(scale, bias)``.

    Raises:
        ValueError: on mismatched lengths, non-finite log-odds or a single grade.
    """
    x = torch.as_tensor(log_odds, dtype=torch.float64).reshape(-1)
    y = torch.as_tensor(grades, dtype=torch.float64).reshape(-1)
    if x.numel() != y.numel():
        raise ValueError(f"fit_platt_scaling: {x.numel()} log-odds but {y.numel()} grades.")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("fit_platt_scaling: the log-odds hold NaN or inf values.")
    n_hgg, n_lgg = int((y == 1).sum()), int((y == 0).sum())
    if n_hgg == 0 or n_lgg == 0 or n_hgg + n_lgg != y.numel():
        raise ValueError(
            f"fit_platt_scaling needs grades 0/1 with both present, got n_LGG={n_lgg} n_HGG={n_hgg} of {y.numel()}."
        )
    target = torch.where(y == 1, (n_hgg + 1.0) / (n_hgg + 2.0), 1.0 / (n_lgg + 2.0))
    log_scale = torch.zeros((), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_scale, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(log_scale.exp() * x + bias, target)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_scale.detach().exp()), float(bias.detach())
