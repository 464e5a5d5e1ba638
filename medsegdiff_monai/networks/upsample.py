"""Nearest-neighbour upsampling by an integer factor as a broadcast, and the rewrite that installs it.

Why: ``F.interpolate(mode="nearest")`` differentiates into ``upsample_nearest*_backward``, which ``torch.compile``
lowers to a scatter-add (``index_put`` with accumulation) into a zeroed buffer: on the H200 the two full-resolution
upsamplings of the ``base`` preset's training step spend 1.3 ms there (``docs/network.md``, Speed-related
choices). Written as a broadcast (``expand``) and a ``reshape``, the forward is the same copy and the backward a
plain sum over each ``factor**d`` block, which compiles to a reduction kernel. The broadcast runs in the input's
memory layout, so a channels-last input gives a channels-last output (a channels-first broadcast would return a
contiguous tensor and make the next convolution convert it).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from medsegdiff_monai.networks.gradient_layout import memory_format_of

__all__ = ["NearestUpsample", "replace_nearest_upsampling"]


def upsample_nearest(x: torch.Tensor, scale_factor: int) -> torch.Tensor:
    """
    Nearest-neighbour upsampling of every spatial dimension by ``scale_factor``, exactly
    ``F.interpolate(x, scale_factor=scale_factor, mode="nearest")``.

    Args:
        x: (N, C, *S) with one to three spatial dimensions.
        scale_factor: positive integer factor.

    Returns:
        (N, C, *(s * scale_factor for s in S)), channels-last if ``x`` is.
    """
    spatial = x.shape[2:]
    channels_last = memory_format_of(x) != torch.contiguous_format
    # broadcast in memory order, (N, *S, C) for a channels-last tensor (a contiguous view of it) or (N, C, *S),
    # so that the result is laid out like x
    lead, trail = ((x.shape[0],), (x.shape[1],)) if channels_last else (tuple(x.shape[:2]), ())
    ordered = x.movedim(1, -1) if channels_last else x
    expanded = ordered.reshape(*lead, *(d for s in spatial for d in (s, 1)), *trail)
    target = (*lead, *(d for s in spatial for d in (s, scale_factor)), *trail)
    upsampled = expanded.expand(target).reshape(*lead, *(s * scale_factor for s in spatial), *trail)
    return upsampled.movedim(-1, 1) if channels_last else upsampled


class NearestUpsample(nn.Module):
    """
    Nearest-neighbour upsampling by an integer factor (:py:func:`upsample_nearest`): the forward equals
    ``nn.Upsample(scale_factor=scale_factor, mode="nearest")``; the backward is a block sum instead of a scatter-add.

    Args:
        scale_factor: positive integer factor, the same for every spatial dimension.

    Input (N, C, *S); output (N, C, *S * scale_factor), in the input's memory layout.
    """

    def __init__(self, scale_factor: int) -> None:
        super().__init__()
        if int(scale_factor) != scale_factor or scale_factor < 1:
            raise ValueError(f"scale_factor must be a positive integer, got {scale_factor!r}")
        self.scale_factor = int(scale_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample_nearest(x, self.scale_factor)

    def extra_repr(self) -> str:
        return f"scale_factor={self.scale_factor}"


def _integer_factor(upsample: nn.Upsample) -> int | None:
    """The one integer scale factor of a nearest ``nn.Upsample`` given by factor (not by size), else None."""
    if upsample.mode != "nearest" or upsample.size is not None or upsample.scale_factor is None:
        return None
    factors = upsample.scale_factor if isinstance(upsample.scale_factor, tuple) else (upsample.scale_factor,)
    if len(set(factors)) != 1 or int(factors[0]) != factors[0] or factors[0] < 1:
        return None
    return int(factors[0])


def replace_nearest_upsampling(network: nn.Module) -> nn.Module:
    """
    Replace, in place, every ``nn.Upsample`` of ``network`` that upsamples by one integer factor in ``"nearest"``
    mode (MONAI ``UpSample(mode="nontrainable", interp_mode="nearest")``, the upsamplers of MONAI's diffusion UNet) by
    a :py:class:`NearestUpsample`. Upsamplings by size, by other modes or by unequal factors are left alone. The
    module has no parameters, so the state dict is unchanged.

    Returns:
        ``network`` itself.
    """
    for parent in list(network.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Upsample and (factor := _integer_factor(child)) is not None:
                setattr(parent, name, NearestUpsample(factor))
    return network
