"""Tumour-grade classification head read from the condition UNet's bottleneck."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = ["GradeHead", "RunningStandardization"]


class RunningStandardization(nn.Module):
    """
    Per-feature standardisation with running statistics, in training as in evaluation:
    ``(x - running_mean) / sqrt(running_var + eps)``.

    In training mode each call first updates the running mean and (biased) variance with the batch, with the weight
    ``max(1 / (n + 1), momentum)`` after ``n`` updates (a cumulative average for the first ``1 / momentum`` batches,
    then an exponential one), and then normalises with the updated running statistics. Unlike
    :py:class:`torch.nn.BatchNorm1d` in training mode it never normalises with the batch's own statistics: a batch
    often holds the slices of only a few subjects, and their batch mean would remove the very subject-level
    differences a grade is read from. No gradient flows into the statistics.

    Without statistics (a freshly built module, or a checkpoint saved before the module existed, whose missing keys
    are filled on load) the module is the identity: mean 0, variance ``1 - eps``.

    Args:
        num_features: size of the last input dimension.
        momentum: the weight of a batch once the cumulative average has reached it.
        eps: added to the variance.

    Forward: (B, num_features) -> (B, num_features).
    """

    def __init__(self, num_features: int, momentum: float = 0.01, eps: float = 1e-5) -> None:
        super().__init__()
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"RunningStandardization momentum must be in (0, 1], got {momentum}.")
        self.momentum = momentum
        self.eps = eps
        for name, value in self._identity_statistics(num_features).items():
            self.register_buffer(name, value)
        self._register_load_state_dict_pre_hook(self._fill_missing_statistics)

    def _identity_statistics(self, num_features: int) -> dict[str, torch.Tensor]:
        """The statistics under which the module is the identity: mean 0, variance ``1 - eps``, no update yet."""
        return {
            "running_mean": torch.zeros(num_features),
            "running_var": torch.full((num_features,), 1.0 - self.eps),
            "num_batches_tracked": torch.zeros((), dtype=torch.long),
        }

    def _fill_missing_statistics(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """A checkpoint without statistics loads as the identity (what the network computed when it was saved)."""
        for name, value in self._identity_statistics(self.running_mean.numel()).items():
            state_dict.setdefault(prefix + name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                batch = x.detach().float()
                weight = torch.clamp(1.0 / (self.num_batches_tracked + 1).float(), min=self.momentum)
                self.running_mean.lerp_(batch.mean(dim=0), weight)
                self.running_var.lerp_(batch.var(dim=0, unbiased=False), weight)
                self.num_batches_tracked.add_(1)
        scale = torch.rsqrt(self.running_var + self.eps)
        return ((x - self.running_mean) * scale).to(x.dtype)


class GradeHead(nn.Module):
    """
    Global average + max pooling -> running standardisation -> LayerNorm -> Linear -> GELU -> Dropout ->
    Linear(num_classes).

    It reads image-only features (the condition UNet's bottleneck), so the grade depends neither on the diffusion
    timestep nor on the noise. The pooled features share a large common profile and differ between subjects by a few
    per cent of it; :py:class:`RunningStandardization` centres and scales each pooled feature over the training
    slices, so that the head sees those differences at unit scale and learns the grade within a few dozen steps
    (with LayerNorm alone, Adam's per-weight steps mostly follow the common profile).

    Args:
        in_channels: channels of the input feature map.
        hidden_channels: width of the hidden layer.
        num_classes: number of grades (2: LGG = 0, HGG = 1).
        dropout: dropout probability before the last layer.

    Forward: (B, in_channels, *S) -> logits (B, num_classes).
    """

    def __init__(
        self, in_channels: int, hidden_channels: int = 128, num_classes: int = 2, dropout: float = 0.2
    ) -> None:
        super().__init__()
        self.feature_norm = RunningStandardization(2 * in_channels)
        self.mlp = nn.Sequential(
            nn.LayerNorm(2 * in_channels),
            nn.Linear(2 * in_channels, hidden_channels),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_channels, num_classes),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        flat = features.flatten(2)
        pooled = torch.cat([flat.mean(dim=-1), flat.amax(dim=-1)], dim=1)
        return self.mlp(self.feature_norm(pooled))
