"""Anchor conditioning of MedSegDiff-V2: a blurred soft anchor that gates the diffusion UNet's features."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers import Pool

__all__ = ["AnchorGate", "SeparableGaussianBlur"]


class SeparableGaussianBlur(nn.Module):
    """
    Depthwise Gaussian blur with a fixed kernel size and a (optionally learnable) standard deviation.

    The kernel is built from ``sigma`` at every call (a few flops), so a learnable sigma gets gradients; the kernel
    size never depends on ``sigma``, which keeps the shapes static (no host sync, ``torch.compile``/export friendly).
    Borders are zero-padded. Unlike ``monai.networks.layers.GaussianFilter`` this needs no ``float(sigma)`` in forward.
    The arithmetic is float32 (float64 for float64 inputs) whatever the input dtype, rounded to it once at the end.

    Args:
        spatial_dims: number of spatial dimensions (1, 2 or 3).
        kernel_size: odd kernel length along each spatial dimension.
        sigma: initial standard deviation in voxels.
        learnable_sigma: if True ``log_sigma`` is an ``nn.Parameter``, otherwise a buffer.
        sigma_bounds: the standard deviation is clamped to this range (voxels) in forward.

    Input and output: (B, C, *S), same dtype.
    """

    def __init__(
        self,
        spatial_dims: int,
        kernel_size: int = 7,
        sigma: float = 1.0,
        learnable_sigma: bool = True,
        sigma_bounds: tuple[float, float] = (0.3, 4.0),
    ) -> None:
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"SeparableGaussianBlur supports spatial_dims 1, 2 or 3, got {spatial_dims}.")
        if kernel_size % 2 != 1 or kernel_size < 3:
            raise ValueError(f"SeparableGaussianBlur kernel_size must be an odd number >= 3, got {kernel_size}.")
        if sigma <= 0:
            raise ValueError(f"SeparableGaussianBlur sigma must be positive, got {sigma}.")
        self.spatial_dims = spatial_dims
        self.kernel_size = kernel_size
        self.sigma_bounds = sigma_bounds
        log_sigma = torch.tensor(math.log(sigma), dtype=torch.float32)
        if learnable_sigma:
            self.log_sigma = nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_sigma", log_sigma)
        radius = kernel_size // 2
        self.register_buffer("offsets", torch.arange(-radius, radius + 1, dtype=torch.float32), persistent=False)

    def sigma(self) -> torch.Tensor:
        """The clamped standard deviation (0-d tensor, voxels)."""
        return self.log_sigma.exp().clamp(*self.sigma_bounds)

    def kernel_1d(self) -> torch.Tensor:
        """The normalised 1-D Gaussian kernel, shape (kernel_size,), float32."""
        weights = torch.exp(-0.5 * (self.offsets / self.sigma()) ** 2)
        return weights / weights.sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # each pass is a weighted sum of shifted copies, accumulated in float32 or wider: pointwise operations that
        # torch.compile fuses into one kernel, where a depthwise convolution of a few channels runs far below the
        # GPU's bandwidth, its weight gradient most of all (docs/performance.md, section 1)
        kernel = self.kernel_1d()
        radius = self.kernel_size // 2
        blurred = x.to(torch.promote_types(x.dtype, torch.float32))
        for dim in range(2, 2 + self.spatial_dims):
            size = blurred.shape[dim]
            padding = [0, 0] * (x.dim() - 2)  # F.pad lists the last dimension first
            padding[2 * (x.dim() - 1 - dim)] = padding[2 * (x.dim() - 1 - dim) + 1] = radius
            padded = F.pad(blurred, padding)
            blurred = sum(kernel[tap] * padded.narrow(dim, tap, size) for tap in range(self.kernel_size))
        return blurred.to(x.dtype)


class AnchorGate(nn.Module):
    """
    Anchor conditioning (MedSegDiff-V2, Wu et al. 2024, https://arxiv.org/abs/2301.11798) at one diffusion UNet level.

    ``a = sigmoid(pool(g))``, ``f_anc = max(GaussBlur(a), a)``, ``f_d <- f_d + sigmoid(conv1x1(f_anc)) * f_d``,
    where ``g`` is the anchor logits map (here: the calibration map, a 1x1 projection of the condition UNet's last
    decoder feature) and ``pool`` an average pooling by ``downsample_factor`` to reach this level's scale.
    Nothing is detached: the gate back-propagates into the condition UNet.

    Args:
        spatial_dims: number of spatial dimensions.
        anchor_channels: channels of ``g``.
        feature_channels: channels of ``f_d``.
        downsample_factor: integer factor between ``g``'s and ``f_d``'s spatial size (``2**level``).
        blur_kernel_size: odd Gaussian kernel size.
        blur_sigma: initial Gaussian standard deviation (voxels at this level).
        learnable_sigma: learn the Gaussian's sigma, or keep it fixed.

    Forward: ``features`` (B, feature_channels, *S), ``anchor_logits`` (B, anchor_channels, *S * downsample_factor)
    -> (B, feature_channels, *S).
    """

    def __init__(
        self,
        spatial_dims: int,
        anchor_channels: int,
        feature_channels: int,
        downsample_factor: int = 1,
        blur_kernel_size: int = 7,
        blur_sigma: float = 1.0,
        learnable_sigma: bool = True,
    ) -> None:
        super().__init__()
        self.pool: nn.Module = (
            Pool[Pool.AVG, spatial_dims](kernel_size=downsample_factor) if downsample_factor > 1 else nn.Identity()
        )
        self.blur = SeparableGaussianBlur(spatial_dims, blur_kernel_size, blur_sigma, learnable_sigma)
        self.gate_conv = Convolution(
            spatial_dims, anchor_channels, feature_channels, kernel_size=1, padding=0, conv_only=True
        )

    def anchor(self, anchor_logits: torch.Tensor) -> torch.Tensor:
        """``f_anc = max(GaussBlur(sigmoid(g)), sigmoid(g))`` at this level's scale, values in (0, 1)."""
        soft = torch.sigmoid(self.pool(anchor_logits))
        return torch.maximum(self.blur(soft), soft)

    def forward(self, features: torch.Tensor, anchor_logits: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.gate_conv(self.anchor(anchor_logits)))
        return features + gate * features
