"""The condition UNet: the image encoder-decoder of MedSegDiff-V2 that conditions the diffusion UNet."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution, UpSample
from monai.networks.nets.diffusion_model_unet import DiffusionUnetDownsample

__all__ = ["ConditionResBlock", "ConditionUNet"]


class ConditionResBlock(nn.Module):
    """
    Residual block without timestep input: GroupNorm -> SiLU -> 3x3 conv, twice, plus a (1x1-projected) skip.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: number of input channels.
        out_channels: number of output channels.
        norm_num_groups: number of groups of the GroupNorm layers (must divide both channel counts).
        norm_eps: epsilon of the GroupNorm layers.
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, norm_num_groups: int, norm_eps: float = 1e-6
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_num_groups, in_channels, eps=norm_eps)
        self.conv1 = Convolution(spatial_dims, in_channels, out_channels, kernel_size=3, padding=1, conv_only=True)
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels, eps=norm_eps)
        self.conv2 = Convolution(spatial_dims, out_channels, out_channels, kernel_size=3, padding=1, conv_only=True)
        self.act = nn.SiLU()
        self.skip: nn.Module = (
            nn.Identity()
            if in_channels == out_channels
            else Convolution(spatial_dims, in_channels, out_channels, kernel_size=1, padding=0, conv_only=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        return self.skip(x) + h


class ConditionUNet(nn.Module):
    """
    Image encoder-decoder of MedSegDiff-V2 (the "condition model"): it sees only the image, never the noisy mask
    or the timestep, so its outputs can be computed once per image and reused at every sampling step.

    Level ``i`` works at scale ``2**-i``; levels ``0 .. L-2`` end with a stride-2 conv, the bottleneck sits at level
    ``L-1``; the decoder upsamples (1x1 conv + nearest), concatenates the encoder feature of the same level and
    applies one residual block, back to full resolution; a 1x1 conv turns the last decoder feature into the
    calibration map.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: number of image channels (the MRI modalities).
        channels: feature channels of each level, ``L = len(channels)`` levels.
        out_channels: channels of the calibration map (the mask channels).
        num_res_blocks: residual blocks per encoder level (the bottleneck has two).
        norm_num_groups: GroupNorm groups (must divide every entry of ``channels``).
        norm_eps: GroupNorm epsilon.

    Forward input ``image`` (B, in_channels, *S) with every spatial size divisible by ``2**(L-1)``; returns
    ``(encoder_features, bottleneck, decoder_feature, calib_map)``: ``encoder_features[i]`` (B, channels[i], *S/2**i),
    ``bottleneck`` (B, channels[-1], *S/2**(L-1)), ``decoder_feature`` (B, channels[0], *S) and ``calib_map``
    (B, out_channels, *S) logits.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        channels: Sequence[int],
        out_channels: int,
        num_res_blocks: int = 1,
        norm_num_groups: int = 8,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"ConditionUNet needs at least 2 levels, got channels={tuple(channels)}.")
        if any(c % norm_num_groups for c in channels):
            raise ValueError(f"ConditionUNet channels {tuple(channels)} must be multiples of {norm_num_groups=}.")
        self.conv_in = Convolution(spatial_dims, in_channels, channels[0], kernel_size=3, padding=1, conv_only=True)
        self.encoder = nn.ModuleList(
            nn.Sequential(
                *[ConditionResBlock(spatial_dims, c, c, norm_num_groups, norm_eps) for _ in range(num_res_blocks)]
            )
            for c in channels
        )
        self.downsamplers = nn.ModuleList(
            DiffusionUnetDownsample(spatial_dims, c_in, use_conv=True, out_channels=c_out)
            for c_in, c_out in zip(channels[:-1], channels[1:])
        )
        self.bottleneck = nn.Sequential(
            ConditionResBlock(spatial_dims, channels[-1], channels[-1], norm_num_groups, norm_eps),
            ConditionResBlock(spatial_dims, channels[-1], channels[-1], norm_num_groups, norm_eps),
        )
        self.upsamplers = nn.ModuleList(
            UpSample(
                spatial_dims,
                c_in,
                c_out,
                scale_factor=2,
                mode="nontrainable",
                interp_mode="nearest",
                align_corners=None,
            )
            for c_in, c_out in zip(channels[:0:-1], channels[-2::-1])
        )
        self.decoder = nn.ModuleList(
            ConditionResBlock(spatial_dims, 2 * c, c, norm_num_groups, norm_eps) for c in channels[-2::-1]
        )
        self.calib_out = Convolution(spatial_dims, channels[0], out_channels, kernel_size=1, padding=0, conv_only=True)

    def forward(self, image: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.conv_in(image)
        encoder_features = []
        for level, blocks in enumerate(self.encoder):
            h = blocks(h)
            encoder_features.append(h)
            if level < len(self.downsamplers):
                h = self.downsamplers[level](h)
        bottleneck = self.bottleneck(h)
        h = bottleneck
        for upsample, block, skip in zip(self.upsamplers, self.decoder, encoder_features[-2::-1]):
            h = block(torch.cat([upsample(h), skip], dim=1))
        return encoder_features, bottleneck, h, self.calib_out(h)
