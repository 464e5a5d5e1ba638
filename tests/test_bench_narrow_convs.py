"""``benchmarks/bench_narrow_convs.py``: every formulation of a narrow convolution computes the convolution."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def narrow():
    return load_benchmark("bench_narrow_convs")


@pytest.fixture(scope="module")
def conv_shapes():
    return load_benchmark("bench_conv_shapes")


def _call(conv_shapes, in_channels, out_channels, kernel, stride=1, groups=1):
    return conv_shapes.ConvCall(
        input_shape=(2, in_channels, 9, 7),
        weight_shape=(out_channels, in_channels // groups, *kernel),
        stride=(stride, stride),
        padding=(kernel[0] // 2, kernel[1] // 2),
        dilation=(1, 1),
        groups=groups,
        input_grad=True,
        weight_grad=True,
    )


@pytest.mark.parametrize(
    ("in_channels", "out_channels", "kernel"),
    [(3, 20, (3, 3)), (20, 3, (3, 3)), (4, 9, (3, 5)), (9, 2, (5, 3)), (3, 20, (1, 1)), (20, 3, (1, 1))],
)
def test_every_formulation_is_the_convolution_and_its_gradients(narrow, conv_shapes, in_channels, out_channels, kernel):
    call = _call(conv_shapes, in_channels, out_channels, kernel)
    assert narrow.is_narrow(call)
    torch.manual_seed(0)
    x = torch.randn(call.input_shape, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(call.weight_shape, dtype=torch.float64)
    grad_y = torch.randn(call.output_shape(), dtype=torch.float64)
    x.requires_grad_()
    weight.requires_grad_()
    # the independent reference: torch's convolution, differentiated by autograd
    reference = F.conv2d(x, weight, padding=call.padding)
    reference_grads = torch.autograd.grad(reference, (x, weight), grad_y)
    forms = narrow.formulations(call)
    assert set(forms) == {"cudnn", "pad8", "pad16", "gemm"}
    for name, formulation in forms.items():
        y = formulation(x, weight)
        assert y.shape == reference.shape, name
        torch.testing.assert_close(y, reference, msg=name)
        for grad, expected in zip(torch.autograd.grad(y, (x, weight), grad_y), reference_grads):
            torch.testing.assert_close(grad, expected, msg=name)


def test_narrow_means_dense_same_and_under_eight_channels(narrow, conv_shapes):
    assert narrow.is_narrow(_call(conv_shapes, 3, 128, (3, 3)))
    assert narrow.is_narrow(_call(conv_shapes, 128, 7, (1, 1)))
    assert not narrow.is_narrow(_call(conv_shapes, 8, 128, (3, 3)))
    assert not narrow.is_narrow(_call(conv_shapes, 3, 128, (3, 3), stride=2))
    assert not narrow.is_narrow(_call(conv_shapes, 3, 3, (7, 1), groups=3))


def test_the_small_preset_step_narrow_convolutions_are_timed_and_agree(narrow, conv_shapes, tmp_path):
    argv = ["--device", "cpu", "--preset", "small", "--size", "16", "--batch", "2", "--repeats", "1"]
    recorded = conv_shapes.step_convolutions(narrow.parse_args(argv))
    narrow.main([*argv, "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    # the narrow sides are the 3 mask channels (diffusion input, anchor gate, calibration map, denoiser output) and
    # the 4 modalities (condition input)
    expected = {
        call.name: count for call, count in recorded.items() if min(call.input_shape[1], call.weight_shape[0]) < 8
    }
    assert results["counts"] == expected
    assert {min(call.input_shape[1], call.weight_shape[0]) for call in recorded if call.name in expected} == {3, 4}
    assert [row["shape"] for row in results["rows"]] == [name for name in expected for _ in range(4)]
    assert all(row["max_relative_difference"] < 1e-5 for row in results["rows"])
