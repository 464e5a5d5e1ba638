"""A tiny stand-in for the diffusion network with the ``encode_condition`` / ``denoise`` interface."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from torch import Tensor, nn


class StandInCondition(NamedTuple):
    features: list[Tensor]
    calib_map: Tensor
    grade_logits: Tensor | None


class StandInNetwork(nn.Module):
    """Two convolutions and a timestep embedding; counts its calls and records what ``denoise`` receives.

    Args:
        mask_channels: channels of the mask (3 = TC, WT, ET).
        use_grade_head: return grade logits from the pooled image features.
        noise_gain: weight of the noisy mask in ``denoise``; 0 makes the output independent of the noise.
    """

    def __init__(self, mask_channels: int = 3, use_grade_head: bool = True, noise_gain: float = 1.0, hidden: int = 8):
        super().__init__()
        self.encoder = nn.Conv2d(4, hidden, 3, padding=1)
        self.calib = nn.Conv2d(hidden, mask_channels, 1)
        self.grade = nn.Linear(hidden, 2) if use_grade_head else None
        self.mask_in = nn.Conv2d(mask_channels, hidden, 3, padding=1)
        self.time = nn.Embedding(1000, hidden)
        self.out = nn.Conv2d(hidden, mask_channels, 3, padding=1)
        self.noise_gain = noise_gain
        self.encode_batches: list[int] = []
        self.denoise_inputs: list[tuple[Tensor, Tensor]] = []

    def encode_condition(self, image: Tensor) -> StandInCondition:
        self.encode_batches.append(image.shape[0])
        features = torch.relu(self.encoder(image))
        grade_logits = None if self.grade is None else self.grade(features.mean(dim=(2, 3)))
        return StandInCondition([features], self.calib(features), grade_logits)

    def denoise(self, x_t: Tensor, t: Tensor, condition: StandInCondition) -> Tensor:
        self.denoise_inputs.append((x_t.clone(), t.clone()))
        hidden = condition.features[0] + self.noise_gain * self.mask_in(x_t) + self.time(t)[:, :, None, None]
        return self.out(torch.relu(hidden))

    def forward(self, x_t: Tensor, t: Tensor, image: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        condition = self.encode_condition(image)
        return self.denoise(x_t, t, condition), condition.grade_logits, condition.calib_map


@pytest.fixture
def stand_in_network():
    """Factory of seeded :class:`StandInNetwork` instances in eval mode."""

    def make(**kwargs) -> StandInNetwork:
        torch.manual_seed(0)
        return StandInNetwork(**kwargs).eval()

    return make


class BrainOracle(nn.Module):
    """Predicts every region on every brain voxel (any channel != 0) and a fixed grade logit; ignores the noise.

    Args:
        hgg_logit: the grade logits are ``(0, hgg_logit)``, i.e. p(HGG) = sigmoid(hgg_logit).
    """

    def __init__(self, hgg_logit: float = 1.0) -> None:
        super().__init__()
        self.hgg_logit = nn.Parameter(torch.tensor(hgg_logit))

    def encode_condition(self, image: Tensor) -> StandInCondition:
        brain = (image != 0).any(dim=1, keepdim=True).float().repeat(1, 3, 1, 1)
        grade_logits = torch.stack([torch.zeros_like(self.hgg_logit), self.hgg_logit]).expand(image.shape[0], 2)
        return StandInCondition([brain], 20 * brain - 10, grade_logits)

    def denoise(self, x_t: Tensor, t: Tensor, condition: StandInCondition) -> Tensor:
        return condition.calib_map


@pytest.fixture
def brain_oracle():
    """Factory of :class:`BrainOracle` networks."""
    return BrainOracle
