"""GPU time and rate of every convolution shape of one training step, each timed alone.

The convolutions are 99 % of the training step's FLOPs and 26 of its 41.5 ms on an H200 (``docs/performance.md``,
section 1). This script finds which of them run below the rest: one forward of the network (``--preset``, channels
last, bf16 autocast, ``--batch`` x ``--size`` x ``--size``, the training step's inputs) under a dispatch mode that
records every ``aten.convolution`` call (input and weight shapes, stride, padding, dilation, groups, and whether
its input needs a gradient). Each distinct call is then timed alone with cuDNN benchmarking on, as in
``train_gpu.json``: the forward, the input gradient (dgrad) and the weight gradient (wgrad), each gradient only where
the step computes it, each ``--repeats`` calls captured in one CUDA graph and timed with CUDA events (GPU time, as in
the graph-captured step). The convolutions run without their bias, as in the compiled step: inductor calls cuDNN without
it ("cudnn is slower with it") and adds the bias, and reduces its gradient, in its own fused kernels. It prints a
table of the shapes, longest step time first, with each pass's microseconds and TFLOP/s, then the step totals per
pass. The totals add up to the convolutions' time in the step where cuDNN picks the same kernels there as here. Rows
go to ``<out>/results.json``.

GPU:
    python benchmarks/bench_conv_shapes.py --out conv_shapes
CPU check of the script (float32, times meaningless):
    python benchmarks/bench_conv_shapes.py --device cpu --preset small --size 32 --batch 2 --repeats 1 \\
        --out /tmp/conv_shapes
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import torch
from bench_norm_kernels import step_network, step_parser, time_call
from torch.utils._python_dispatch import TorchDispatchMode

PASSES = ("forward", "dgrad", "wgrad")
# ``aten.convolution_backward``'s output mask (input, weight, bias gradients) of each gradient pass
GRADIENT_MASKS = {"dgrad": [True, False, False], "wgrad": [False, True, False]}


class ConvCall(NamedTuple):
    """One convolution call of the step: shapes (N, C, H, W) and (C_out, C_in / groups, kH, kW), its arguments (the
    bias left out, see the module docstring), and whether the step computes its input and its weight gradient."""

    input_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    input_grad: bool
    weight_grad: bool

    @property
    def name(self) -> str:
        """``8x128x256x256 -> 128 k3 s1``: input shape, output channels, kernel size and stride."""
        kernel = "x".join(map(str, self.weight_shape[2:]))
        stride = "x".join(map(str, self.stride))
        groups = f" g{self.groups}" if self.groups > 1 else ""
        return f"{'x'.join(map(str, self.input_shape))} -> {self.weight_shape[0]} k{kernel} s{stride}{groups}"

    def output_shape(self) -> tuple[int, ...]:
        spatial = [
            (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
            for size, pad, dilation, kernel, stride in zip(
                self.input_shape[2:], self.padding, self.dilation, self.weight_shape[2:], self.stride
            )
        ]
        return (self.input_shape[0], self.weight_shape[0], *spatial)

    def flops(self) -> int:
        """Multiply-adds x 2 of the forward; the dgrad and the wgrad cost the same."""
        return 2 * math.prod(self.output_shape()) * math.prod(self.weight_shape[1:])

    def aten_arguments(self) -> tuple:
        """The arguments that follow the bias in ``aten.convolution`` and ``aten.convolution_backward``: stride,
        padding, dilation, transposed, output padding, groups."""
        return list(self.stride), list(self.padding), list(self.dilation), False, [0, 0], self.groups


def step_tensor(device: torch.device, generator: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """A standard normal tensor in the training step's dtype (bf16 on CUDA, float32 on CPU), channels-last when 4D."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tensor = torch.randn(shape, device=device, generator=generator, dtype=dtype)
    return tensor.contiguous(memory_format=torch.channels_last) if tensor.dim() == 4 else tensor


class _RecordConvolutions(TorchDispatchMode):
    """Counts the :py:class:`ConvCall` of every ``aten.convolution`` dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            x, weight, _, stride, padding, dilation, transposed, _, groups = args
            if transposed:
                raise NotImplementedError("transposed convolutions are not timed")
            self.calls[
                ConvCall(
                    tuple(x.shape),
                    tuple(weight.shape),
                    tuple(stride),
                    tuple(padding),
                    tuple(dilation),
                    groups,
                    x.requires_grad,
                    weight.requires_grad,
                )
            ] += 1
        return func(*args, **(kwargs or {}))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = step_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per shape and pass")
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds after which no new shape starts")
    parser.add_argument("--out", default="conv_shapes")
    return parser.parse_args(argv)


def step_convolutions(args: argparse.Namespace) -> Counter:
    """The :py:class:`ConvCall` of one training forward (bf16 autocast on CUDA, float32 on CPU), with their counts."""
    device = torch.device(args.device)
    network, inputs = step_network(args)
    recorder = _RecordConvolutions()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"), recorder:
        network(*inputs)
    return recorder.calls


def time_convolution(args: argparse.Namespace, call: ConvCall) -> dict:
    """Microseconds per call and TFLOP/s of the forward, dgrad and wgrad (each gradient NaN where the step needs none)
    of one convolution, in the dtype of the training step (bf16 on CUDA, float32 on CPU) and channels-last."""
    device = torch.device(args.device)
    generator = torch.Generator(device).manual_seed(0)
    x, weight, grad_y = (
        step_tensor(device, generator, shape) for shape in (call.input_shape, call.weight_shape, call.output_shape())
    )
    conv_args = call.aten_arguments()

    def forward() -> None:
        torch.ops.aten.convolution(x, weight, None, *conv_args)

    def backward(output_mask: list[bool]):
        return lambda: torch.ops.aten.convolution_backward(grad_y, x, weight, None, *conv_args, output_mask)

    flops = call.flops()
    row = {"shape": call.name, "flops": flops}
    passes = {"forward": forward}
    if call.input_grad:
        passes["dgrad"] = backward(GRADIENT_MASKS["dgrad"])
    if call.weight_grad:
        passes["wgrad"] = backward(GRADIENT_MASKS["wgrad"])
    for name in PASSES:
        us = time_call(device, passes[name], args.repeats) if name in passes else math.nan
        row[f"{name}_us"] = us
        row[f"{name}_tflops_per_s"] = flops / us / 1e6
    return row


def run_passes(row: dict) -> list[str]:
    """The passes of a :func:`time_convolution` row that the step runs (the others' times are NaN)."""
    return [name for name in PASSES if not math.isnan(row[f"{name}_us"])]


def summarise(rows: list[dict]) -> dict:
    """Prints the shapes (longest step time first) and the step totals per pass; returns the totals. Adds each row's
    ``step_us``, its microseconds per step (every pass the step runs, times its calls)."""
    for row in rows:
        row["step_us"] = row["calls"] * sum(row[f"{name}_us"] for name in run_passes(row))
    rows = sorted(rows, key=lambda row: -row["step_us"])
    print(
        "\n| convolution (input -> out channels, kernel, stride) | calls/step | GFLOP/call | forward us (TFLOP/s) | "
        "dgrad us (TFLOP/s) | wgrad us (TFLOP/s) | ms/step |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        cells = [
            "-" if math.isnan(row[f"{name}_us"]) else f"{row[f'{name}_us']:.1f} ({row[f'{name}_tflops_per_s']:.0f})"
            for name in PASSES
        ]
        print(
            f"| {row['shape']} | {row['calls']} | {row['flops'] / 1e9:.2f} | {' | '.join(cells)} | "
            f"{row['step_us'] / 1000:.3f} |"
        )
    totals = {}
    print("\n| pass | ms/step | TFLOP/step | TFLOP/s |\n|---|---|---|---|")
    for name in (*PASSES, "all"):
        us = flops = 0.0
        for row in rows:
            for part in run_passes(row):
                if name in (part, "all"):
                    us += row["calls"] * row[f"{part}_us"]
                    flops += row["calls"] * row["flops"]
        totals[name] = {"ms_per_step": us / 1000, "tflop_per_step": flops / 1e12}
        print(f"| {name} | {us / 1000:.2f} | {flops / 1e12:.3f} | {flops / us / 1e6 if us else math.nan:.0f} |")
    return totals


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.backends.cudnn.benchmark = True
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calls = step_convolutions(args)
    card = torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda" else "cpu"
    print(f"{card}: {sum(calls.values())} convolution calls per forward, {len(calls)} distinct")
    rows = []
    for call, count in sorted(calls.items(), key=lambda item: -item[0].flops() * item[1]):
        if time.perf_counter() - start > args.deadline:
            print(f"deadline: {len(calls) - len(rows)} shapes not timed")
            break
        rows.append({**time_convolution(args, call), "calls": count})
        print(f"{rows[-1]['shape']}: {rows[-1]['forward_us']:.1f} us forward", flush=True)
        (out / "results.json").write_text(json.dumps({"card": card, "args": vars(args), "rows": rows}, indent=1))
    totals = summarise(rows)
    (out / "results.json").write_text(
        json.dumps({"card": card, "args": vars(args), "rows": rows, "totals": totals}, indent=1)
    )


if __name__ == "__main__":
    main()
