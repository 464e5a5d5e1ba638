"""An identity whose gradient is dense in the input's memory layout, and the hooks that place it in the UNets.

Why: the UNet decoders concatenate each feature with a skip feature, so the gradient of every tensor that enters a
concatenation is a channel slice of a wider buffer. Such a slice is not dense (its pixel stride is the wider
channel count), and cuDNN's convolution backward copies it into a dense tensor with aten's generic strided copy,
once per convolution that reads it (a residual block's output feeds ``conv2`` and the skip convolution): 61
copies and 2.6 ms of the H200 training step (``docs/network.md``, Speed-related choices).
:py:func:`dense_gradient` at the outputs that feed a concatenation makes the gradient dense once, as a copy that
``torch.compile`` generates (and may fuse), before it reaches the convolutions.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["dense_gradient", "densify_block_gradients", "memory_format_of"]


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last`` / ``torch.channels_last_3d`` for a (N, C, H, W) / (N, C, D, H, W) tensor stored
    channels-last (and not also plain contiguous, as with C == 1), else ``torch.contiguous_format``."""
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.ndim == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


class _DenseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.memory_format = memory_format_of(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=ctx.memory_format)


def dense_gradient(x: torch.Tensor) -> torch.Tensor:
    """
    ``x`` itself in the forward; in the backward, the incoming gradient made dense in ``x``'s memory layout
    (channels-last for a channels-last ``x``, else contiguous), a no-op when it already is.

    Args:
        x: any tensor, typically (N, C, *S).
    """
    return _DenseGradient.apply(x)


def _dense_output_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return dense_gradient(output)


def densify_block_gradients(network: nn.Module, block_types: tuple[type[nn.Module], ...]) -> nn.Module:
    """
    Register a forward hook on every module of ``network`` that is an instance of ``block_types`` so that its
    output passes through :py:func:`dense_gradient`. No parameters or state-dict entries are added.

    Args:
        network: the network, changed in place.
        block_types: the module types whose (tensor) outputs may enter a concatenation.

    Returns:
        ``network`` itself.
    """
    for module in network.modules():
        if isinstance(module, block_types):
            module.register_forward_hook(_dense_output_hook)
    return network
