"""Run the GroupNorm Triton kernels on the CPU under the Triton interpreter and print their errors as JSON.

Started by ``test_fused_norm.py`` in a fresh process, because ``TRITON_INTERPRET`` must be set before Triton compiles
(decorates) any kernel. Each case compares the kernels (launchers, and the ``medsegdiff::group_norm`` custom op through
autograd) with float64 ``F.group_norm`` (+ SiLU) autograd on the same random inputs.
"""

from __future__ import annotations

import json
import os

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from medsegdiff_monai.networks.fused_norm import group_norm  # noqa: E402
from medsegdiff_monai.networks.kernels.group_norm_triton import group_norm_backward, group_norm_forward  # noqa: E402

# (N, C, H, W, groups, silu, dtype, channels_last, offset): non-power-of-two channels per group (12, 6), several pixel
# chunks (33 x 33), both layouts, bf16, and inputs far from zero mean (offset) for the variance's cancellation
CASES = [
    (2, 8, 5, 7, 2, False, "float32", True, 0.0),
    (3, 24, 4, 6, 2, True, "float32", True, 0.0),
    (2, 48, 6, 6, 8, True, "float32", False, 0.0),
    (1, 16, 33, 33, 4, True, "float32", True, 0.0),
    (2, 32, 8, 8, 4, True, "float32", True, 1000.0),
    (2, 96, 6, 6, 8, True, "bfloat16", True, 0.0),
]


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.detach().double() - reference.detach()).norm() / reference.detach().norm())


def run_case(batch, channels, height, width, groups, silu, dtype, channels_last, offset) -> dict:
    generator = torch.Generator().manual_seed(batch * channels + height)
    x = (torch.randn(batch, channels, height, width, generator=generator, dtype=torch.float64) * 2 + offset).to(
        getattr(torch, dtype)
    )
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = 1 + 0.5 * torch.randn(channels, generator=generator)
    bias = torch.randn(channels, generator=generator)
    grad_y = torch.randn(x.shape, generator=generator).to(x.dtype)

    y, mean, rstd = group_norm_forward(x, weight, bias, groups, 1e-5, silu)
    grad_x, grad_weight, grad_bias = group_norm_backward(grad_y, x, weight, bias, mean, rstd, groups, silu)

    leaf, weight_leaf, bias_leaf = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    op_y = group_norm(leaf, weight_leaf, bias_leaf, groups, 1e-5, silu)[0]
    op_y.backward(grad_y)

    reference_x, reference_weight, reference_bias = (t.double().requires_grad_() for t in (x, weight, bias))
    reference = F.group_norm(reference_x, groups, reference_weight, reference_bias, 1e-5)
    reference = F.silu(reference) if silu else reference
    reference.backward(grad_y.double())
    return {
        "case": [batch, channels, height, width, groups, silu, dtype, channels_last, offset],
        "y": relative_error(y, reference.detach()),
        "grad_x": relative_error(grad_x, reference_x.grad),
        "grad_weight": relative_error(grad_weight, reference_weight.grad),
        "grad_bias": relative_error(grad_bias, reference_bias.grad),
        "op_y": relative_error(op_y, reference.detach()),
        "op_grad_x": relative_error(leaf.grad, reference_x.grad),
        "op_grad_weight": relative_error(weight_leaf.grad, reference_weight.grad),
        "same_strides": y.stride() == x.stride() and grad_x.stride() == x.stride() and op_y.stride() == x.stride(),
        "dtypes": [str(y.dtype), str(grad_x.dtype), str(grad_weight.dtype)],
        "mean_error": float((mean.double() - x.double().reshape(batch, groups, -1).mean(-1)).abs().max()),
    }


if __name__ == "__main__":
    print(json.dumps([run_case(*case) for case in CASES]))
