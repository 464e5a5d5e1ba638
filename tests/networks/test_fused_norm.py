"""FusedGroupNorm: the fallback equals nn.GroupNorm (+ SiLU), the network rewrite keeps weights and outputs, and the
Triton kernels (run on the CPU by the Triton interpreter) match a float64 reference."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock

from medsegdiff_monai.networks import (
    ConditionResBlock,
    FusedGroupNorm,
    FusedResnetBlock,
    SiLULinear,
    get_network,
    triton_available,
)


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("shape", [(2, 8, 6, 5), (2, 8, 4, 4, 3)])
def test_fallback_is_group_norm_then_silu(silu, shape):
    torch.manual_seed(0)
    norm = FusedGroupNorm(4, 8, eps=1e-6, silu=silu)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(shape)
    reference = F.group_norm(x, 4, norm.weight, norm.bias, 1e-6)
    reference = F.silu(reference) if silu else reference
    assert not norm.uses_kernel(x)
    torch.testing.assert_close(norm(x), reference, rtol=0, atol=0)
    assert "silu=" + str(silu) in repr(norm)


@pytest.mark.parametrize("shape", [(2, 8, 6, 5), (2, 8, 4, 4, 3)])
def test_fallback_offset_is_added_per_sample_and_channel(shape):
    torch.manual_seed(0)
    norm = FusedGroupNorm(4, 8, silu=True)
    x, offset = torch.randn(shape), torch.randn(shape[:2])
    broadcast = offset.reshape(*shape[:2], *(1,) * (len(shape) - 2))
    torch.testing.assert_close(norm(x, offset), norm(x + broadcast), rtol=0, atol=0)
    # an offset shared by a group's channels is removed by the norm; one that differs between them is not
    assert not torch.allclose(norm(x, offset), norm(x), atol=1e-3)
    torch.testing.assert_close(norm(x, torch.ones(shape[:2]) * 3.0), norm(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("up", "down", "out_channels"), [(False, False, 8), (True, False, 8), (False, True, 16)])
def test_fused_resnet_block_matches_monai_block(up, down, out_channels):
    torch.manual_seed(0)
    block = DiffusionUNetResnetBlock(
        2, 8, temb_channels=12, out_channels=out_channels, up=up, down=down, norm_num_groups=4
    )
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.normal_(0, 0.3)
    reference = DiffusionUNetResnetBlock(
        2, 8, temb_channels=12, out_channels=out_channels, up=up, down=down, norm_num_groups=4
    )
    reference.load_state_dict(block.state_dict())
    fused = FusedResnetBlock.from_block(block)
    assert fused is block and isinstance(fused, DiffusionUNetResnetBlock)
    assert list(fused.state_dict()) == list(reference.state_dict())
    x, emb = torch.randn(3, 8, 8, 8, requires_grad=True), torch.randn(3, 12, requires_grad=True)
    outputs = [module(x, emb) for module in (reference, fused)]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    grads = [
        torch.autograd.grad(output.square().sum(), [x, emb, *module.parameters()])
        for output, module in zip(outputs, (reference, fused))
    ]
    for name, value, expected in zip(["x", "emb", *dict(reference.named_parameters())], grads[1], grads[0]):
        torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-5, msg=name)


def test_from_group_norm_shares_parameters():
    plain = nn.GroupNorm(2, 6)
    fused = FusedGroupNorm.from_group_norm(plain, silu=True)
    assert fused.weight is plain.weight and fused.bias is plain.bias
    assert (fused.num_groups, fused.num_channels, fused.eps, fused.affine) == (2, 6, plain.eps, True)
    assert list(fused.state_dict()) == list(plain.state_dict())
    linear = nn.Linear(5, 3)
    folded = SiLULinear.from_linear(linear)
    assert folded.weight is linear.weight and folded.bias is linear.bias
    x = torch.randn(4, 5)
    torch.testing.assert_close(folded(x), linear(F.silu(x)))


def test_fused_network_keeps_state_dict_outputs_and_gradients():
    torch.manual_seed(0)
    plain = get_network("small", fused_norm=False)
    fused = get_network("small")
    assert list(fused.state_dict()) == list(plain.state_dict())
    fused.load_state_dict(plain.state_dict())
    assert not any(type(m) is nn.GroupNorm for m in fused.modules())
    resnets = [m for m in fused.modules() if isinstance(m, DiffusionUNetResnetBlock)]
    assert resnets and all(
        type(m) is FusedResnetBlock
        and isinstance(m.nonlinearity, nn.Identity)
        and m.norm1.silu
        and m.norm2.silu
        and isinstance(m.time_emb_proj, SiLULinear)
        for m in resnets
    )
    assert all(isinstance(m.act, nn.Identity) for m in fused.modules() if isinstance(m, ConditionResBlock))
    plain.eval()
    fused.eval()
    x_t, t, image = torch.randn(2, 3, 32, 32), torch.tensor([5, 900]), torch.randn(2, 4, 32, 32)
    outputs = [network(x_t, t, image) for network in (plain, fused)]
    for reference, value in zip(*outputs):
        # equal but for the order of the resnet blocks' bias and timestep-embedding additions
        torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-6)
    for seg_logits, grade_logits, calib_map in outputs:
        (seg_logits.square().mean() + grade_logits.square().mean() + calib_map.square().mean()).backward()
    for (name, p_plain), p_fused in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(p_fused.grad, p_plain.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_kernel_path_needs_cuda_channels_last():
    norm = FusedGroupNorm(2, 4)
    x = torch.randn(1, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    assert not norm.uses_kernel(x)  # CPU: never the kernel, whatever the layout


def _interpreted(*arguments: str):
    """JSON printed by ``interpreted_group_norm.py`` run in a fresh process under the Triton interpreter."""
    script = Path(__file__).with_name("interpreted_group_norm.py")
    command = [sys.executable, str(script), *arguments]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


needs_triton = pytest.mark.skipif(not triton_available(), reason="Triton is not installed (pip install triton)")


@needs_triton
def test_triton_kernels_match_float64_reference_under_interpreter():
    results = _interpreted()
    assert len(results) == 15 and sum(result["case"][9] for result in results) == 4
    assert sum(result["whole_groups"] for result in results) == 6
    for result in results:
        dtype, offset = result["case"][6], result["case"][8]
        # float32 arithmetic on every path; bf16 outputs are rounded to 8 bits of mantissa; at a mean of 1000 and a
        # std of 2 the float32 mean alone carries 3e-5 of the std (E[x^2] - E[x]^2 would be off by percents)
        tolerance = 1e-2 if dtype == "bfloat16" else 1e-4 if offset else 1e-5
        for key in ("y", "grad_x", "op_y", "op_grad_x"):
            assert result[key] < tolerance, (key, result)
        gradient_keys = ["grad_weight", "grad_bias", "op_grad_weight"]
        if result["case"][9]:
            gradient_keys += ["grad_offset", "op_grad_offset"]
        for key in gradient_keys:
            assert result[key] < (1e-4 if offset else 1e-5), (key, result)
        assert result["same_strides"], result
        assert result["dtypes"] == [f"torch.{dtype}", f"torch.{dtype}", "torch.float32"], result
        assert result["mean_error"] < 1e-5 * max(1.0, offset), result


@needs_triton
def test_channels_last_network_on_the_kernel_path_matches_the_plain_path():
    result = _interpreted("network")
    # a channels-last network keeps its norm inputs channels-last (the rest: attention blocks' reshaped tensors)
    assert result["calls"]["kernel"] >= 4 * result["calls"]["fallback"] > 0, result
    assert max(result["outputs"]) < 1e-5, result
    assert result["whole_grad_error"] < 1e-5, result
    assert result["largest_grad_error"] < 1e-4, result


@needs_triton
@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize(
    "shape", [(8, 128, 256, 256), (8, 768, 32, 32), (8, 512, 16, 16), (1, 64, 7, 5), (160, 256, 24, 24)]
)
def test_default_tiling_covers_every_pixel_row_once(shape, backward):
    from medsegdiff_monai.networks.kernels.group_norm_triton import LaunchConfig, _Launch

    config = LaunchConfig.for_input(shape, backward)
    launch = _Launch(torch.empty(shape, device="meta"), 32 if shape[1] % 32 == 0 else 1, config)
    rows = shape[2] * shape[3]
    # chunks of whole tiles that cover the rows, none empty, within the reduce kernels' block sizes
    assert not config.whole_groups
    assert launch.rows_per_chunk % launch.block_r == 0
    assert (launch.num_chunks - 1) * launch.rows_per_chunk < rows <= launch.num_chunks * launch.rows_per_chunk
    assert launch.num_chunks <= launch.block_s and launch.block_r * launch.block_c <= max(config.tile_elements, 1024)
    assert launch.block_n == 1 or launch.block_n * launch.block_s * launch.block_cg <= config.reduce_tile_elements
    assert (launch.num_warps, launch.num_stages) == (config.num_warps, config.num_stages)


@needs_triton
@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize(
    "shape", [(8, 256, 16, 16), (8, 256, 32, 32), (8, 512, 32, 32), (8, 128, 64, 64), (1, 64, 7, 5), (160, 256, 24, 24)]
)
def test_default_tiling_holds_small_inputs_whole_where_groups_fit(shape, backward):
    """Whole groups over 8 warps exactly for inputs of at most 2^22 elements whose group, its pixel rows and channels
    each padded to a power of two, has at most 8,192 elements (by hand: 2 ** ceil(log2(n))); never without the
    group count."""
    from medsegdiff_monai.networks.kernels.group_norm_triton import LaunchConfig

    batch, channels, height, width = shape
    padded_group = 2 ** math.ceil(math.log2(height * width)) * 2 ** math.ceil(math.log2(channels // 32))
    whole = batch * channels * height * width <= 4194304 and padded_group <= 8192
    config = LaunchConfig.for_input(shape, backward, num_groups=32)
    assert config.whole_groups == whole and (config.num_warps == 8 or not whole)
    assert not LaunchConfig.for_input(shape, backward).whole_groups


@needs_triton
@pytest.mark.parametrize("shape", [(8, 512, 16, 16), (8, 256, 32, 32), (1, 64, 7, 5), (3, 96, 33, 33)])
def test_whole_groups_hold_each_group_in_one_padded_tile(shape):
    from medsegdiff_monai.networks.kernels.group_norm_triton import MAX_WHOLE_GROUP_TILE, LaunchConfig, _Launch

    launch = _Launch(torch.empty(shape, device="meta"), 32, LaunchConfig(whole_groups=True))
    rows, channels_per_group = shape[2] * shape[3], shape[1] // 32
    # one chunk of all the rows, padded to the next power of two, as are the group's channels
    assert (launch.num_chunks, launch.rows_per_chunk, launch.block_s) == (1, rows, 1)
    assert rows <= launch.block_r < 2 * rows and channels_per_group <= launch.block_cg < 2 * channels_per_group
    assert launch.block_r * launch.block_cg <= MAX_WHOLE_GROUP_TILE


@needs_triton
def test_whole_groups_reject_a_group_larger_than_the_tile():
    from medsegdiff_monai.networks.kernels.group_norm_triton import LaunchConfig, _Launch

    # 64 x 64 rows of 4 channels: 16,384 elements, twice the tile
    with pytest.raises(ValueError, match=r"up to 8192 elements.*4096 rows x 4 channels needs 16384"):
        _Launch(torch.empty(8, 128, 64, 64, device="meta"), 32, LaunchConfig(whole_groups=True))


@needs_triton
@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("whole_groups", [False, True])
def test_every_kernel_launch_binds_to_its_kernel_parameters(monkeypatch, whole_groups, offset):
    """Each launch of the two launchers passes exactly its kernel's parameters (besides launch options), which Triton's
    JIT checks before compiling on a GPU and the interpreter does not: the launches are bound to the kernels'
    signatures instead of run."""
    import inspect

    import triton

    from medsegdiff_monai.networks.kernels.group_norm_triton import (
        LaunchConfig,
        group_norm_backward,
        group_norm_forward,
    )

    launched = []

    def bind(kernel, *args, grid, warmup, **kwargs):
        for option in ("num_warps", "num_stages"):
            kwargs.pop(option, None)
        inspect.signature(kernel.fn).bind(*args, **kwargs)  # TypeError on a missing or unknown parameter
        launched.append(kernel.fn.__name__)

    monkeypatch.setattr(triton.runtime.jit.JITFunction, "run", bind)
    x = torch.randn(2, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.ones(64), torch.zeros(64)
    channel_offset = torch.zeros(2, 64) if offset else None
    config = LaunchConfig(whole_groups=whole_groups)
    y, mean, rstd = group_norm_forward(x, weight, bias, 8, 1e-5, True, config, offset=channel_offset)
    group_norm_backward(y, x, weight, bias, mean, rstd, 8, True, config, offset=channel_offset)
    expected = (
        ["_whole_group_forward_kernel", "_whole_group_backward_kernel"]
        if whole_groups
        else ["_stats_kernel", "_combine_kernel", "_apply_kernel", "_backward_partial_kernel"]
    )
    assert launched == [*expected, "_backward_reduce_kernel"] + ([] if whole_groups else ["_backward_dx_kernel"])


@needs_triton
def test_kernel_launchers_reject_an_offset_of_the_wrong_shape():
    from medsegdiff_monai.networks.kernels.group_norm_triton import group_norm_forward

    x = torch.randn(2, 8, 4, 4)
    with pytest.raises(ValueError, match=r"offset must have shape \(N, C\) = \(2, 8\).*\(8,\)"):
        group_norm_forward(x, torch.ones(8), torch.zeros(8), 4, 1e-5, True, offset=torch.zeros(8))
