"""Run the GroupNorm Triton kernels on the CPU under the Triton interpreter and print their errors as JSON.

Started by ``test_fused_norm.py`` in a fresh process, because ``TRITON_INTERPRET`` must be set before Triton compiles
(decorates) any kernel. ``python interpreted_group_norm.py`` compares the kernels (launchers, and the
``medsegdiff::group_norm`` custom op through autograd) with float64 ``F.group_norm`` (+ SiLU) autograd on the same
random inputs; ``python interpreted_group_norm.py network`` runs a tiny channels-last network with every eligible
norm forced onto the kernel path (the CPU stands in for CUDA) against the same network on the ``F.group_norm`` path.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tiny_network import tiny_network  # noqa: E402

from medsegdiff_monai.networks import FusedGroupNorm  # noqa: E402
from medsegdiff_monai.networks.fused_norm import group_norm  # noqa: E402
from medsegdiff_monai.networks.kernels.group_norm_triton import (  # noqa: E402
    LaunchConfig,
    group_norm_backward,
    group_norm_forward,
)

# (N, C, H, W, groups, silu, dtype, channels_last, mean shift, launch config, channel offset): non-power-of-two
# channels per group (12, 6), several pixel chunks (33 x 33), both layouts, bf16, inputs far from zero mean (mean
# shift) for the variance's cancellation, a tiling other than the default: small tiles, a chunk count that does not
# divide the rows, and a reduce kernel that takes the 3 samples in blocks of 2 (the last one masked), with the row
# loops software-pipelined; and a per-(sample, channel) offset added before the norm, with both tilings; and whole
# groups, one program per (sample, group) (their rows and channels padded to powers of two and masked).
WHOLE = LaunchConfig(whole_groups=True)
CASES = [
    (2, 8, 5, 7, 2, False, "float32", True, 0.0, None, False),
    (3, 24, 4, 6, 2, True, "float32", True, 0.0, None, False),
    (2, 48, 6, 6, 8, True, "float32", False, 0.0, None, False),
    (1, 16, 33, 33, 4, True, "float32", True, 0.0, None, False),
    (2, 32, 8, 8, 4, True, "float32", True, 1000.0, None, False),
    (2, 96, 6, 6, 8, True, "bfloat16", True, 0.0, None, False),
    (3, 16, 13, 11, 4, True, "float32", True, 0.0, LaunchConfig(128, 21, 8, 64, num_stages=3), False),
    (2, 24, 5, 7, 4, True, "float32", True, 0.0, None, True),
    (3, 16, 13, 11, 4, False, "bfloat16", True, 0.0, LaunchConfig(128, 21, 8, 64, num_stages=3), True),
    (2, 48, 6, 6, 8, True, "float32", False, 0.0, WHOLE, False),
    (1, 16, 33, 33, 4, True, "float32", True, 0.0, WHOLE, False),
    (2, 32, 8, 8, 4, True, "float32", True, 1000.0, WHOLE, False),
    (2, 96, 6, 6, 8, True, "bfloat16", True, 0.0, WHOLE, False),
    (2, 24, 5, 7, 4, True, "float32", True, 0.0, WHOLE, True),
    (3, 16, 13, 11, 4, False, "bfloat16", True, 0.0, WHOLE, True),
]


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.detach().double() - reference.detach()).norm() / reference.detach().norm())


def run_case(
    batch, channels, height, width, groups, silu, dtype, channels_last, mean_shift, config, channel_offset
) -> dict:
    generator = torch.Generator().manual_seed(batch * channels + height)
    x = (torch.randn(batch, channels, height, width, generator=generator, dtype=torch.float64) * 2 + mean_shift).to(
        getattr(torch, dtype)
    )
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = 1 + 0.5 * torch.randn(channels, generator=generator)
    bias = torch.randn(channels, generator=generator)
    grad_y = torch.randn(x.shape, generator=generator).to(x.dtype)
    offset = 3 * torch.randn(batch, channels, generator=generator) if channel_offset else None

    y, mean, rstd = group_norm_forward(x, weight, bias, groups, 1e-5, silu, config, offset=offset)
    grad_x, grad_weight, grad_bias, grad_offset = group_norm_backward(
        grad_y, x, weight, bias, mean, rstd, groups, silu, config, offset=offset
    )

    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    offset_leaf = None if offset is None else offset.clone().requires_grad_()
    op_y = group_norm(*leaves, offset_leaf, groups, 1e-5, silu)[0]
    op_y.backward(grad_y)

    reference_x, reference_weight, reference_bias = (t.double().requires_grad_() for t in (x, weight, bias))
    reference_input = reference_x
    if offset is not None:
        reference_offset = offset.double().requires_grad_()
        reference_input = reference_x + reference_offset[:, :, None, None]
    reference = F.group_norm(reference_input, groups, reference_weight, reference_bias, 1e-5)
    reference = F.silu(reference) if silu else reference
    reference.backward(grad_y.double())
    reference_mean = (
        (reference_input.detach() if offset is not None else x.double()).reshape(batch, groups, -1).mean(-1)
    )
    offset_errors = {}
    if offset is not None:
        offset_errors = {
            "grad_offset": relative_error(grad_offset, reference_offset.grad),
            "op_grad_offset": relative_error(offset_leaf.grad, reference_offset.grad),
        }
    return {
        "case": [batch, channels, height, width, groups, silu, dtype, channels_last, mean_shift, channel_offset],
        "whole_groups": config is not None and config.whole_groups,
        "y": relative_error(y, reference.detach()),
        "grad_x": relative_error(grad_x, reference_x.grad),
        "grad_weight": relative_error(grad_weight, reference_weight.grad),
        "grad_bias": relative_error(grad_bias, reference_bias.grad),
        "op_y": relative_error(op_y, reference.detach()),
        "op_grad_x": relative_error(leaves[0].grad, reference_x.grad),
        "op_grad_weight": relative_error(leaves[1].grad, reference_weight.grad),
        **offset_errors,
        "same_strides": y.stride() == x.stride() and grad_x.stride() == x.stride() and op_y.stride() == x.stride(),
        "dtypes": [str(y.dtype), str(grad_x.dtype), str(grad_weight.dtype)],
        "mean_error": float((mean.double() - reference_mean).abs().max()),
    }


def run_network() -> dict:
    """Outputs and parameter gradients of a channels-last network, kernel path vs ``F.group_norm`` path, and how many
    norm calls took the kernel path (inputs that arrive channels-last)."""
    network = tiny_network(channels_last=True)
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(2, 4, 16, 16, generator=generator).contiguous(memory_format=torch.channels_last)
    x_t = torch.randn(2, 3, 16, 16, generator=generator).contiguous(memory_format=torch.channels_last)
    t = torch.tensor([7, 650])
    calls = {"kernel": 0, "fallback": 0}

    def uses_kernel_on_cpu(self: FusedGroupNorm, x: torch.Tensor) -> bool:
        eligible = self.affine and x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last)
        calls["kernel" if eligible else "fallback"] += 1
        return eligible

    def run(kernel: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        FusedGroupNorm.uses_kernel = uses_kernel_on_cpu if kernel else lambda self, x: False
        network.zero_grad(set_to_none=True)
        outputs = network(x_t, t, image)
        sum(output.square().mean() for output in outputs).backward()
        return [output.detach() for output in outputs], [p.grad.clone() for p in network.parameters()]

    kernel_outputs, kernel_grads = run(kernel=True)
    counted = dict(calls)
    plain_outputs, plain_grads = run(kernel=False)
    # attention key biases (and what feeds them) get gradients that are zero but for rounding (the softmax ignores a
    # shift of all keys): their relative error is noise over noise, so per parameter only gradients above 1e-6 of the
    # whole gradient's norm are compared
    whole = torch.cat([g.flatten() for g in plain_grads]).norm()
    return {
        "calls": counted,
        "outputs": [relative_error(k, p) for k, p in zip(kernel_outputs, plain_outputs)],
        "whole_grad_error": relative_error(
            torch.cat([g.flatten() for g in kernel_grads]), torch.cat([g.flatten() for g in plain_grads])
        ),
        "largest_grad_error": max(
            relative_error(k, p) for k, p in zip(kernel_grads, plain_grads) if p.norm() > 1e-6 * whole
        ),
    }


if __name__ == "__main__":
    if sys.argv[1:] == ["network"]:
        print(json.dumps(run_network()))
    else:
        print(json.dumps([run_case(*case) for case in CASES]))
