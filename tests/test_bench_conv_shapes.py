"""``benchmarks/bench_conv_shapes.py`` records the step's convolutions as the FLOP counter and autograd see them."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from benchmark_scripts import load_benchmark
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode


@pytest.fixture(scope="module")
def conv_shapes():
    return load_benchmark("bench_conv_shapes")


@pytest.fixture(scope="module")
def step_args(conv_shapes) -> argparse.Namespace:
    return conv_shapes.parse_args(["--device", "cpu", "--preset", "small", "--size", "32", "--batch", "2"])


@pytest.fixture(scope="module")
def recorded(conv_shapes, step_args):
    torch.manual_seed(0)
    return conv_shapes.step_convolutions(step_args)


def test_recorded_flops_match_the_flop_counter(conv_shapes, recorded, step_args):
    network, inputs = conv_shapes.step_network(step_args)
    counter = FlopCounterMode(display=False)
    with counter:
        network(*inputs)
    expected = counter.get_flop_counts()["Global"][torch.ops.aten.convolution]
    assert sum(call.flops() * count for call, count in recorded.items()) == expected


class _InputGradients(TorchDispatchMode):
    """How many ``convolution_backward`` calls compute an input and a weight gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.with_input_grad = self.with_weight_grad = self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution_backward.default:
            self.total += 1
            self.with_input_grad += bool(args[-1][0])
            self.with_weight_grad += bool(args[-1][1])
        return func(*args, **(kwargs or {}))


def test_gradient_flags_match_autograd(conv_shapes, recorded, step_args):
    network, inputs = conv_shapes.step_network(step_args)
    seg_logits, grade_logits, calib_map = network(*inputs)
    counter = _InputGradients()
    with counter:
        (seg_logits.mean() + grade_logits.mean() + calib_map.mean()).backward()
    assert counter.total == sum(recorded.values())
    assert counter.with_input_grad == sum(count for call, count in recorded.items() if call.input_grad)
    assert counter.with_input_grad < counter.total  # the convolutions on the inputs need no input gradient
    assert counter.with_weight_grad == sum(count for call, count in recorded.items() if call.weight_grad)


@pytest.mark.parametrize(
    "stride, padding, dilation, kernel",
    [((1, 1), (1, 1), (1, 1), 3), ((2, 2), (1, 1), (1, 1), 3), ((1, 2), (0, 3), (2, 1), 5)],
)
def test_output_shape_and_flops_by_hand(conv_shapes, stride, padding, dilation, kernel):
    x, weight = torch.randn(2, 6, 13, 17), torch.randn(4, 3, kernel, kernel)
    call = conv_shapes.ConvCall(tuple(x.shape), tuple(weight.shape), stride, padding, dilation, 2, True, True)
    output = torch.nn.functional.conv2d(x, weight, None, stride, padding, dilation, groups=2)
    assert call.output_shape() == tuple(output.shape)
    # every output value is a dot product of C_in / groups x kH x kW pairs: one multiply and one add each
    assert call.flops() == 2 * output.numel() * 3 * kernel * kernel


def test_timing_rows_and_totals(conv_shapes, step_args, recorded, capsys):
    args = argparse.Namespace(**{**vars(step_args), "repeats": 1})
    first_layer = next(call for call in recorded if not call.input_grad)
    inner_layer = next(call for call in recorded if call.input_grad)
    frozen_layer = inner_layer._replace(weight_grad=False)  # as a frozen stage's backbone
    calls = (first_layer, inner_layer, frozen_layer)
    rows = [{**conv_shapes.time_convolution(args, call), "calls": 2} for call in calls]
    assert math.isnan(rows[0]["dgrad_us"]) and rows[0]["forward_us"] > 0 and rows[0]["wgrad_us"] > 0
    assert all(rows[1][f"{name}_us"] > 0 for name in ("forward", "dgrad", "wgrad"))
    assert math.isnan(rows[2]["wgrad_us"]) and rows[2]["dgrad_us"] > 0
    totals = conv_shapes.summarise(rows)
    expected_ms = sum(
        2 * sum(r[f"{name}_us"] for name in ("forward", "dgrad", "wgrad") if not math.isnan(r[f"{name}_us"]))
        for r in rows
    )
    assert totals["all"]["ms_per_step"] == pytest.approx(expected_ms / 1000)
    assert totals["dgrad"]["tflop_per_step"] == pytest.approx(2 * 2 * inner_layer.flops() / 1e12)  # two rows
    assert totals["wgrad"]["tflop_per_step"] == pytest.approx(2 * (first_layer.flops() + inner_layer.flops()) / 1e12)
    assert "| all |" in capsys.readouterr().out
