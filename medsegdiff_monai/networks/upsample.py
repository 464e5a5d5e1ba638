"""Nearest-neighbour upsampling by an integer factor as a broadcast, and the rewrite that installs it.

Why: ``F.interpolate(mode="nearest")`` differentiates into ``upsample_nearest*_backward``, which ``torch.compile``
lowers to a scatter-add (``index_put`` with accumulation) into a zeroed buffer: on the H200 the two full-resolution
upsamplings of the ``base`` preset's training step spend 1.3 ms there (``docs/performance.md``, section 0.2). Written
as a broadcast (``expand``) and a ``reshape``, the forward is the same copy and the backward a plain sum over each
``factor**d`` block, which compiles to a reduction kernel. The broadcast runs in the input's memory layout, so a
channels-last input gives a channels-last output (a channels-first broadcast would return a contiguous tensor and
make the next convolution convert it).
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["NearestUpsample", "replace_nearest_upsampling"]


def _channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` (N, C, *S) is stored channels-last (and not also plain contiguous, as with C == 1)."""
    if x.ndim == 4:
        return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if x.ndim == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
    return False


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
    if _channels_last(x):
        # (N, *S, C) is a contiguous view of a channels-last tensor: broadcast there, then view back
        moved = x.movedim(1, -1)
        expanded = moved.reshape(x.shape[0], *(d for s in spatial for d in (s, 1)), x.shape[1])
        target = (x.shape[0], *(d for s in spatial for d in (s, scale_factor)), x.shape[1])
        upsampled = expanded.expand(target).reshape(x.shape[0], *(s * scale_factor for s in spatial), x.shape[1])
        return upsampled.movedim(-1, 1)
    expanded = x.reshape(*x.shape[:2], *(d for s in spatial for d in (s, 1)))
    target = (*x.shape[:2], *(d for s in spatial for d in (s, scale_factor)))
    return expanded.expand(target).reshape(*x.shape[:2], *(s * scale_factor for s in spatial))


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
