"""Spectrum-space transformer (SS-Former) of MedSegDiff-V2: cross-attention in the Fourier domain."""

from __future__ import annotations

import torch
import torch.nn as nn

from medsegdiff_monai.networks.real_fft import complex_multiply, irfft2_real, rfft2_real

__all__ = ["SSFormerBlock", "SpectralCrossAttention"]


def _radial_frequency(height: int, width: int, device: torch.device) -> torch.Tensor:
    """Normalised radial frequency of each ``rfft2`` bin of a (height, width) map: (height, width//2+1), in [0, 1]."""
    freq_y = torch.fft.fftfreq(height, device=device)[:, None]
    freq_x = torch.fft.rfftfreq(width, device=device)[None, :]
    return torch.sqrt(freq_y**2 + freq_x**2) / (0.5 * 2**0.5)


class SpectralCrossAttention(nn.Module):
    """
    Cross-attention from the diffusion bottleneck (queries) to the condition bottleneck (keys, values), computed
    with FFTs (2D only).

    For each head, the query/key affinity of every spatial displacement ``delta`` is the circular cross-correlation
    ``A(delta) = sum_x <q(x + delta), k(x)>``, obtained as ``irfft2(filter * sum_c rfft2(q_c) * conj(rfft2(k_c)))``,
    where ``filter`` is a learnable per-head radial frequency mask (the NBP filter; ``num_filter_bins`` values along the
    normalised radius, linearly interpolated, initialised to 1 so it starts as an all-pass filter and works at any
    input size). The affinities are scaled by ``1 / (N * sqrt(head_channels))`` (N spatial positions), soft-maxed over
    the displacements, and the values are aggregated by the circular convolution
    ``out(x) = sum_delta w(delta) v(x - delta) = irfft2(rfft2(w) * rfft2(v))``. Cost O(C N log N) instead of the
    O(C N^2) of spatial attention; the attention is translation-equivariant (one kernel per head shared by all queries).

    Precision: the FFT core always runs in float32 with autocast disabled (bf16/fp16 FFTs are inaccurate and cuFFT
    only supports power-of-two half-precision sizes); the 1x1 projections follow autocast.

    Args:
        query_channels: channels of the diffusion bottleneck (queries and output).
        context_channels: channels of the condition bottleneck (keys and values).
        num_head_channels: channels per head (must divide ``query_channels``).
        norm_num_groups: GroupNorm groups for the query and the context normalisation.
        num_filter_bins: number of learnable radial frequency bins of the filter.

    Forward: ``x`` (B, query_channels, H, W), ``context`` (B, context_channels, H, W) -> attention output
    (B, query_channels, H, W) with the dtype of ``x`` (not yet added to ``x``).
    """

    def __init__(
        self,
        query_channels: int,
        context_channels: int,
        num_head_channels: int = 32,
        norm_num_groups: int = 8,
        num_filter_bins: int = 8,
    ) -> None:
        super().__init__()
        if query_channels % num_head_channels:
            raise ValueError(f"SpectralCrossAttention: {query_channels=} must be a multiple of {num_head_channels=}.")
        if num_filter_bins < 2:
            raise ValueError(f"SpectralCrossAttention needs num_filter_bins >= 2, got {num_filter_bins}.")
        self.num_heads = query_channels // num_head_channels
        self.head_channels = num_head_channels
        self.norm_query = nn.GroupNorm(norm_num_groups, query_channels, eps=1e-6)
        self.norm_context = nn.GroupNorm(norm_num_groups, context_channels, eps=1e-6)
        self.to_q = nn.Conv2d(query_channels, query_channels, kernel_size=1)
        self.to_k = nn.Conv2d(context_channels, query_channels, kernel_size=1)
        self.to_v = nn.Conv2d(context_channels, query_channels, kernel_size=1)
        self.frequency_filter = nn.Parameter(torch.ones(self.num_heads, num_filter_bins))
        self.proj_out = nn.Conv2d(query_channels, query_channels, kernel_size=1)

    def filter_response(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """The learnable frequency mask at every ``rfft2`` bin, shape (num_heads, height, width//2+1), float32."""
        position = _radial_frequency(height, width, device) * (self.frequency_filter.shape[1] - 1)
        lower = position.floor().long().clamp(max=self.frequency_filter.shape[1] - 2)
        fraction = position - lower
        profile = self.frequency_filter.float()
        return profile[:, lower] * (1 - fraction) + profile[:, lower + 1] * fraction

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The float32 spectral attention core: q, k, v (B, heads, head_channels, H, W) -> same shape.

        The spectra are real tensors with a trailing (real, imaginary) pair (:py:mod:`.real_fft`), so that
        ``torch.compile`` fuses the spectral products and their gradients instead of running complex kernels eagerly.
        """
        height, width = q.shape[-2:]
        # contiguous real inputs: from a channels-last network q, k and v are strided views
        q_spec = rfft2_real(q.float().contiguous())
        k_spec = rfft2_real(k.float().contiguous())
        v_spec = rfft2_real(v.float().contiguous())
        affinity_spec = complex_multiply(q_spec, k_spec, conjugate_b=True).sum(dim=2)
        affinity_spec = affinity_spec * self.filter_response(height, width, q.device)[..., None]
        affinity = irfft2_real(affinity_spec, (height, width))
        scale = 1.0 / (height * width * self.head_channels**0.5)
        weights = torch.softmax(affinity.flatten(2) * scale, dim=-1).reshape(affinity.shape)
        return irfft2_real(complex_multiply(rfft2_real(weights).unsqueeze(2), v_spec), (height, width))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        heads = (batch, self.num_heads, self.head_channels, height, width)
        q = self.to_q(self.norm_query(x)).reshape(heads)
        context = self.norm_context(context)
        k = self.to_k(context).reshape(heads)
        v = self.to_v(context).reshape(heads)
        with torch.autocast(device_type=x.device.type, enabled=False):
            attended = self.attend(q, k, v)
        attended = attended.reshape(batch, channels, height, width).to(q.dtype)
        return self.proj_out(attended).to(x.dtype)


class SSFormerBlock(nn.Module):
    """
    One SS-Former block: ``x <- x + SpectralCrossAttention(x, context)``, then ``x <- x + FFN(GroupNorm(x))`` with a
    1x1-conv FFN (expansion ``ffn_expansion``, GELU). 2D only.

    Args:
        query_channels: channels of the diffusion bottleneck.
        context_channels: channels of the condition bottleneck.
        num_head_channels: channels per attention head.
        norm_num_groups: GroupNorm groups.
        num_filter_bins: radial bins of the learnable frequency filter.
        ffn_expansion: hidden-width multiplier of the FFN.

    Forward: ``x`` (B, query_channels, H, W), ``context`` (B, context_channels, H, W) -> (B, query_channels, H, W),
    dtype of ``x``.
    """

    def __init__(
        self,
        query_channels: int,
        context_channels: int,
        num_head_channels: int = 32,
        norm_num_groups: int = 8,
        num_filter_bins: int = 8,
        ffn_expansion: int = 2,
    ) -> None:
        super().__init__()
        self.attention = SpectralCrossAttention(
            query_channels, context_channels, num_head_channels, norm_num_groups, num_filter_bins
        )
        self.ffn = nn.Sequential(
            nn.GroupNorm(norm_num_groups, query_channels, eps=1e-6),
            nn.Conv2d(query_channels, ffn_expansion * query_channels, kernel_size=1),
            nn.GELU(),
            nn.Conv2d(ffn_expansion * query_channels, query_channels, kernel_size=1),
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(x, context)
        return (x + self.ffn(x)).to(x.dtype)
