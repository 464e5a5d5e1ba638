"""2D real FFTs whose spectra are real tensors (a trailing (real, imaginary) pair), with explicit gradients.

Why: ``torch.compile`` generates no code for complex tensors, so every complex element-wise operation of a spectral
layer, and of the gradients autograd derives for ``torch.fft.rfft2`` / ``irfft2`` (complex zero-fills, slice
copies, conjugations, doubling of bins), runs as a separate eager kernel: the SS-Former's share of the training step
on the H200 (``docs/network.md``, Speed-related choices). Here complex values exist only between an FFT call and a
``view_as_real`` / ``view_as_complex``; the spectral arithmetic (:py:func:`complex_multiply`) and the gradients'
bookkeeping are real tensor operations that ``torch.compile`` fuses. The gradients are the ones PyTorch defines for
``rfft2`` / ``irfft2`` (``fft_r2c_backward`` / ``fft_c2r_backward``), written on the real views.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["complex_multiply", "irfft2_real", "rfft2_real"]


def _doubled_bins(length: int, onesided_length: int, like: torch.Tensor) -> torch.Tensor:
    """(onesided_length, 1) weights over the last spectral dimension: 2 for the bins whose mirror image lies outside
    the one-sided range (1 .. length - onesided_length), 1 for the others (the DC bin and, for even lengths, the
    Nyquist bin)."""
    index = torch.arange(onesided_length, device=like.device)
    doubled = (index >= 1) & (index <= length - onesided_length)
    return (1.0 + doubled.to(like.dtype))[:, None]


class _RealFFT2(torch.autograd.Function):
    """``view_as_real(rfft2(x))`` over the last two dimensions, unnormalised (``norm="backward"``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.width = x.shape[-1]
        return torch.view_as_real(torch.fft.rfft2(x))

    @staticmethod
    def backward(ctx, grad_spectrum: torch.Tensor) -> torch.Tensor:
        # zero-fill the missing half, inverse complex FFT without scaling, keep the real part
        missing = ctx.width - grad_spectrum.shape[-2]
        full = F.pad(grad_spectrum, (0, 0, 0, missing)).contiguous()
        return torch.view_as_real(torch.fft.ifft2(torch.view_as_complex(full), norm="forward"))[..., 0]


class _InverseRealFFT2(torch.autograd.Function):
    """``irfft2(view_as_complex(spectrum), s=size)`` over the last two dimensions, scaled by 1 / (H W)."""

    @staticmethod
    def forward(ctx, spectrum: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        ctx.width = size[1]
        return torch.fft.irfft2(torch.view_as_complex(spectrum.contiguous()), s=size)

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad_spectrum = torch.view_as_real(torch.fft.rfft2(grad_x.contiguous(), norm="forward"))
        return grad_spectrum * _doubled_bins(ctx.width, grad_spectrum.shape[-2], grad_spectrum), None


def rfft2_real(x: torch.Tensor) -> torch.Tensor:
    """
    Real 2D FFT of the last two dimensions as a real tensor: ``torch.view_as_real(torch.fft.rfft2(x))``.

    Args:
        x: real (*, H, W), float32 or float64.

    Returns:
        (*, H, W // 2 + 1, 2): real and imaginary parts of the one-sided spectrum.
    """
    return _RealFFT2.apply(x)


def irfft2_real(spectrum: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """
    Inverse of :py:func:`rfft2_real`: ``torch.fft.irfft2(torch.view_as_complex(spectrum), s=size)``.

    Args:
        spectrum: (*, H, W // 2 + 1, 2) real and imaginary parts of a one-sided spectrum.
        size: output (H, W).

    Returns:
        real (*, H, W).
    """
    return _InverseRealFFT2.apply(spectrum, tuple(size))


def complex_multiply(a: torch.Tensor, b: torch.Tensor, conjugate_b: bool = False) -> torch.Tensor:
    """
    Product ``a * b`` (or ``a * conj(b)``) of complex numbers stored as trailing (real, imaginary) pairs.

    Args:
        a: (*, 2), broadcastable with ``b``.
        b: (*, 2).
        conjugate_b: multiply by the complex conjugate of ``b``.

    Returns:
        the broadcast shape, (*, 2).
    """
    a_real, a_imag = a.unbind(-1)
    b_real, b_imag = b.unbind(-1)
    if conjugate_b:
        b_imag = -b_imag
    return torch.stack((a_real * b_real - a_imag * b_imag, a_real * b_imag + a_imag * b_real), dim=-1)
