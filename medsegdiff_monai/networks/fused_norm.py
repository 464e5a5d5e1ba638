"""GroupNorm (+ SiLU) that runs a fused channels-last Triton kernel on the GPU, and the rewrite that installs it.

Why: with bf16 on Hopper, cuDNN's convolutions work in NHWC. In a network stored NCHW every convolution converts its
input, weights and output (26 % of the training step's GPU time, ``docs/network.md``), while a network stored
channels-last had its GroupNorms reduce along the strided channel dimension, which cost more than the conversions it
saved. :py:class:`FusedGroupNorm` removes that trade-off: on CUDA tensors in channels-last memory it calls
``torch.ops.medsegdiff.group_norm`` (Triton kernels of :py:mod:`.kernels.group_norm_triton` behind a custom op with a
fake implementation and autograd, so ``torch.compile`` and CUDA graphs keep it as one opaque call); on every other
input (CPU, NCHW, 3D) it is exactly ``nn.GroupNorm`` followed by the optional SiLU.

:py:func:`fuse_group_norms` swaps every ``nn.GroupNorm`` of a network for one, in place, keeping the parameters and the
state-dict keys, and folds the SiLU that always follows the norms of MONAI's ``DiffusionUNetResnetBlock``, of
:py:class:`~medsegdiff_monai.networks.ConditionResBlock` and of ``nn.Sequential(GroupNorm, SiLU, ...)`` into it.
"""

import importlib.util

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock

__all__ = ["FusedGroupNorm", "FusedResnetBlock", "SiLULinear", "fuse_group_norms", "triton_available"]


# looked up once: a call inside forward would be a graph break for torch.compile
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether Triton is installed (it ships with PyTorch's CUDA builds; CPU builds lack it)."""
    return _TRITON_AVAILABLE


@torch.library.custom_op("medsegdiff::group_norm", mutates_args=())
def group_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    offset: torch.Tensor | None,
    num_groups: int,
    eps: float,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupNorm (+ SiLU) of a (N, C, H, W) map plus an optional (N, C) offset: ``(y, mean, rstd)``, see
    ``group_norm_triton.group_norm_forward``."""
    from medsegdiff_monai.networks.kernels.group_norm_triton import group_norm_forward

    return group_norm_forward(x, weight, bias, num_groups, eps, silu, offset=offset)


@group_norm.register_fake
def _group_norm_fake(x, weight, bias, offset, num_groups, eps, silu):
    statistics = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return torch.empty_like(x), statistics, torch.empty_like(statistics)


@torch.library.custom_op("medsegdiff::group_norm_backward", mutates_args=())
def group_norm_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    offset: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_weight, grad_bias, grad_offset)`` of :py:func:`group_norm`; grad_offset is an empty tensor
    when ``offset`` is ``None`` (a custom op returns tensors only)."""
    from medsegdiff_monai.networks.kernels.group_norm_triton import group_norm_backward as backward

    grad_x, grad_weight, grad_bias, grad_offset = backward(
        grad_y, x, weight, bias, mean, rstd, num_groups, silu, offset=offset
    )
    return grad_x, grad_weight, grad_bias, x.new_empty(0) if grad_offset is None else grad_offset


@group_norm_backward.register_fake
def _group_norm_backward_fake(grad_y, x, weight, bias, offset, mean, rstd, num_groups, silu):
    grad_offset = x.new_empty(0) if offset is None else torch.empty_like(offset)
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias), grad_offset


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, offset, num_groups, _, silu = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, offset, mean, rstd)
    ctx.num_groups, ctx.silu = num_groups, silu
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, grad_y, grad_mean, grad_rstd):
    x, weight, bias, offset, mean, rstd = ctx.saved_tensors
    grad_x, grad_weight, grad_bias, grad_offset = group_norm_backward(
        grad_y, x, weight, bias, offset, mean, rstd, ctx.num_groups, ctx.silu
    )
    return grad_x, grad_weight, grad_bias, None if offset is None else grad_offset, None, None, None


group_norm.register_autograd(_backward, setup_context=_setup_context)


class FusedGroupNorm(nn.GroupNorm):
    """
    ``nn.GroupNorm``, optionally followed by SiLU, with a fused Triton kernel for CUDA inputs in channels-last memory.

    Same parameters and state-dict keys as ``nn.GroupNorm``. The kernel path (2D, affine, CUDA, channels-last, Triton
    installed) computes in float32 and returns the input's dtype; under autocast ``nn.GroupNorm`` would return float32,
    which the bf16 convolution after it casts back anyway. Every other input takes ``F.group_norm`` (+ ``F.silu``).

    Args:
        num_groups: number of groups (must divide ``num_channels``).
        num_channels: number of channels C.
        eps: added to the variance.
        affine: learnable per-channel scale and shift (the kernel path needs them).
        silu: apply SiLU to the output.

    Input (N, C, *S) and optionally an ``offset`` (N, C) added to every element of each sample's channel before the
    norm (the kernel path never stores that sum); output the same shape as the input.
    """

    def __init__(
        self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, silu: bool = False
    ) -> None:
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)
        self.silu = silu

    @classmethod
    def from_group_norm(cls, norm: nn.GroupNorm, silu: bool = False) -> "FusedGroupNorm":
        """A :py:class:`FusedGroupNorm` that shares ``norm``'s parameters (no copy)."""
        fused = cls(norm.num_groups, norm.num_channels, eps=norm.eps, affine=False, silu=silu)
        fused.affine = norm.affine
        fused.weight, fused.bias = norm.weight, norm.bias
        return fused

    @torch.jit.unused
    def uses_kernel(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` takes the Triton kernel path."""
        return (
            self.affine
            and x.is_cuda
            and x.ndim == 4
            and x.is_contiguous(memory_format=torch.channels_last)
            and _TRITON_AVAILABLE
        )

    def forward(self, x: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        # a scripted module (TorchScript, e.g. the bundle's ``ckpt_export``) keeps only the plain path
        if not torch.jit.is_scripting() and self.uses_kernel(x):
            return self._kernel_forward(x, offset)
        if offset is not None:
            for _ in range(x.ndim - 2):
                offset = offset.unsqueeze(-1)
            x = x + offset
        y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.silu(y) if self.silu else y

    @torch.jit.unused
    def _kernel_forward(self, x: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
        return group_norm(x, self.weight, self.bias, offset, self.num_groups, self.eps, self.silu)[0]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, silu={self.silu}"


class SiLULinear(nn.Linear):
    """``nn.Linear`` applied to ``silu(x)``: a linear layer whose input activation was folded in (same state dict)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "SiLULinear":
        """A :py:class:`SiLULinear` that shares ``linear``'s parameters (no copy)."""
        fused = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        fused.weight, fused.bias = linear.weight, linear.bias
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.silu(x))


class FusedResnetBlock(DiffusionUNetResnetBlock):
    """
    MONAI's ``DiffusionUNetResnetBlock`` as :py:func:`fuse_group_norms` leaves it: its ``nonlinearity`` (the
    identity now) lives in ``norm1``, ``norm2`` and ``time_emb_proj``, and the projected timestep embedding and
    ``conv1``'s bias reach ``norm2`` as its per-channel ``offset`` instead of being added to ``conv1``'s output.
    The output is the same; on the kernel path the sum ``conv1(h) + bias + temb`` is never written and read back,
    and the gradients of the bias and the embedding come out of the norm's backward, not from a reduction over the
    feature map.

    Same submodules, parameters and state-dict keys as the block; made by :py:meth:`from_block` only.
    """

    @classmethod
    def from_block(cls, block: DiffusionUNetResnetBlock) -> "FusedResnetBlock":
        """``block`` itself, turned into a :py:class:`FusedResnetBlock` in place (its hooks and parameters kept)."""
        block.norm1 = FusedGroupNorm.from_group_norm(block.norm1, silu=True)
        block.norm2 = FusedGroupNorm.from_group_norm(block.norm2, silu=True)
        block.time_emb_proj = SiLULinear.from_linear(block.time_emb_proj)
        block.nonlinearity = nn.Identity()
        block.__class__ = cls
        return block

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        if self.upsample is not None:
            x = self.upsample(x)
            h = self.upsample(h)
        elif self.downsample is not None:
            x = self.downsample(x)
            h = self.downsample(h)
        conv = self.conv1.conv
        h = conv._conv_forward(h, conv.weight, None)
        offset = self.time_emb_proj(emb)
        if conv.bias is not None:
            offset = offset + conv.bias
        h = self.norm2(h, offset)
        output: torch.Tensor = self.skip_connection(x) + self.conv2(h)
        return output


def fuse_group_norms(network: nn.Module) -> nn.Module:
    """
    Replace, in place, every ``nn.GroupNorm`` of ``network`` by a :py:class:`FusedGroupNorm` sharing its parameters
    (state-dict keys unchanged), folding the SiLU that follows it where the module structure says it always does:
    MONAI ``DiffusionUNetResnetBlock`` (``norm1``/``norm2`` then ``nonlinearity``; the block becomes a
    :py:class:`FusedResnetBlock`, which also hands its timestep embedding and ``conv1``'s bias to ``norm2``),
    :py:class:`~medsegdiff_monai.networks.ConditionResBlock` (``norm1``/``norm2`` then ``act``) and
    ``nn.Sequential(..., GroupNorm, SiLU, ...)``. The outputs are unchanged (on the non-kernel path exactly but for
    the order in which a resnet block's bias and timestep embedding are added).

    Returns:
        ``network`` itself.
    """
    from medsegdiff_monai.networks.condition_unet import ConditionResBlock

    for module in list(network.modules()):
        if type(module) is DiffusionUNetResnetBlock and isinstance(module.nonlinearity, nn.SiLU):
            FusedResnetBlock.from_block(module)
        elif isinstance(module, ConditionResBlock) and isinstance(module.act, nn.SiLU):
            module.norm1 = FusedGroupNorm.from_group_norm(module.norm1, silu=True)
            module.norm2 = FusedGroupNorm.from_group_norm(module.norm2, silu=True)
            module.act = nn.Identity()
        elif isinstance(module, nn.Sequential):
            for index in range(len(module) - 1):
                if type(module[index]) is nn.GroupNorm and isinstance(module[index + 1], nn.SiLU):
                    module[index] = FusedGroupNorm.from_group_norm(module[index], silu=True)
                    module[index + 1] = nn.Identity()
    for parent in list(network.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.GroupNorm:
                setattr(parent, name, FusedGroupNorm.from_group_norm(child))
    return network
