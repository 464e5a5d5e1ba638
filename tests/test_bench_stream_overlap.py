"""``benchmarks/bench_stream_overlap.py`` builds the backward kernel lists of the step as autograd sees them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def overlap():
    return load_benchmark("bench_stream_overlap")


@pytest.fixture(scope="module")
def step_args(overlap):
    return overlap.parse_args(
        ["--device", "cpu", "--preset", "small", "--size", "16", "--batch", "2", "--repeats", "1"]
    )


def test_interleave_keeps_each_order_and_mixes_in_proportion(overlap):
    # keys (index + 0.5) / length: a at 0.25 and 0.75, b at 0.125, 0.375, 0.625 and 0.875
    merged = overlap.interleave(["a0", "a1"], ["b0", "b1", "b2", "b3"])
    assert merged == ["b0", "a0", "b1", "b2", "a1", "b3"]


def test_one_gradient_call_per_convolution_call_of_the_step(overlap, step_args):
    conv_shapes = load_benchmark("bench_conv_shapes")
    torch.manual_seed(0)
    recorded = conv_shapes.step_convolutions(step_args)
    lists = overlap.convolution_calls(torch.device("cpu"), recorded)
    assert len(lists["dgrad"]) == sum(count for call, count in recorded.items() if call.input_grad)
    assert len(lists["wgrad"]) == sum(count for call, count in recorded.items() if call.weight_grad)
    # the first convolution's image input needs no gradient, every weight does
    assert len(lists["dgrad"]) < len(lists["wgrad"]) == sum(recorded.values())


def test_gradient_calls_compute_what_autograd_computes(overlap):
    conv_shapes = load_benchmark("bench_conv_shapes")
    call = conv_shapes.ConvCall((2, 3, 9, 7), (4, 3, 3, 3), (2, 1), (1, 0), (1, 1), 1, True, True)
    torch.manual_seed(0)
    lists = overlap.convolution_calls(torch.device("cpu"), {call: 1})
    grad_input, no_weight_grad, _ = lists["dgrad"][0]()
    no_input_grad, grad_weight, _ = lists["wgrad"][0]()
    assert no_weight_grad is None and no_input_grad is None, "each list computes its own gradient only"
    # the same tensors, drawn in the order convolution_calls draws them
    generator = torch.Generator().manual_seed(0)
    x, weight, grad_y = (
        conv_shapes.step_tensor(torch.device("cpu"), generator, shape)
        for shape in (call.input_shape, call.weight_shape, call.output_shape())
    )
    x, weight = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    F.conv2d(x, weight, stride=call.stride, padding=call.padding).backward(grad_y)
    torch.testing.assert_close(grad_input, x.grad)
    torch.testing.assert_close(grad_weight, weight.grad)


def test_one_norm_call_per_group_norm_of_the_step(overlap, step_args):
    norm_kernels = load_benchmark("bench_norm_kernels")
    inputs = norm_kernels.step_norm_inputs(step_args)
    assert len(overlap.norm_calls(torch.device("cpu"), inputs)) == sum(inputs.values()) > 0


def test_time_lists_runs_every_call_once_to_warm_up_then_per_repeat(overlap):
    runs = []
    calls = [lambda: runs.append("a"), lambda: runs.append("b")]
    ms = overlap.time_lists(torch.device("cpu"), calls[:1], calls[1:], repeats=3)
    assert runs == ["a", "b"] * 4 and ms >= 0


def test_rows_on_a_cpu_time_each_list_and_leave_concurrency_unmeasured(overlap, step_args, monkeypatch):
    # the norm closures would run the Triton kernels under the interpreter; a cheap stand-in keeps the count
    monkeypatch.setattr(overlap, "norm_calls", lambda device, inputs: sum(inputs.values()) * [lambda: None])
    rows = {row["row"]: row for row in overlap.measure(step_args)}
    assert rows["serial"]["calls"] == rows["dgrad"]["calls"] + rows["wgrad"]["calls"] + rows["norm"]["calls"]
    assert rows["dgrad+norm"]["calls"] == rows["dgrad"]["calls"] + rows["norm"]["calls"]
    assert all(rows[name]["ms"] > 0 for name in ("dgrad", "wgrad", "serial"))
    assert math.isnan(rows["dgrad+norm || wgrad"]["ms"]) and math.isnan(rows["norm || wgrad"]["hidden_ms"])
