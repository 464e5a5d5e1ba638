"""Tumour-grade classification head read from the condition UNet's bottleneck."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["GradeHead"]


class GradeHead(nn.Module):
    """
    Global average + max pooling -> LayerNorm -> Linear -> GELU -> Dropout -> Linear(num_classes).

    It reads image-only features (the condition UNet's bottleneck), so the grade depends neither on the diffusion
    timestep nor on the noise.

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
        return self.mlp(pooled)
