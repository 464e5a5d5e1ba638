"""The training step's narrow convolutions (fewer than 8 channels on one side) against other ways to compute them.

cuDNN's NHWC kernels work on channels in multiples of 8: a convolution from the 3-channel noisy mask or the 4
modalities, or to the 3 mask channels, runs as a padded or generic kernel far below the rate of its neighbours
(``bench_conv_shapes.py``). This script records the step's convolutions
(:py:func:`bench_conv_shapes.step_convolutions`), keeps those with fewer than 8 input or output channels, and
times each as the compiled step runs it, forward and backward, in every formulation below (all stride 1, "same"
padding, no bias, as the step calls cuDNN):

- ``cudnn``: ``F.conv2d``, the network's formulation;
- ``pad8``, ``pad16``: the narrow side zero-padded to 8 or 16 channels (the output sliced back);
- ``gemm``: one matrix product over channels-last pixels. A narrow input is unfolded first into its k x k
  neighbourhoods (k^2 C_in channels, padded to a multiple of 8); a narrow output is computed as k^2 C_out "tap"
  channels and summed over their k x k shifts; a 1 x 1 convolution is the product alone.

Each formulation is compiled (``torch.compile``, as the step) and checked against ``cudnn`` (forward and the
gradients the step takes); the time is GPU time from CUDA events over ``--repeats`` calls after warm-up calls,
launched one after another. Autograd's backward cannot be captured in a CUDA graph here, so use a batch large enough
that the GPU, not the launches, sets the pace (``--batch 32``). It prints a table per convolution and the step total of
the fastest formulation against ``cudnn``; rows go to ``<out>/results.json``.

GPU:
    python benchmarks/bench_narrow_convs.py --batch 32 --out narrow_convs
CPU check of the script (float32, times meaningless):
    python benchmarks/bench_narrow_convs.py --device cpu --preset small --size 16 --batch 2 --repeats 1 \\
        --out /tmp/narrow_convs
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_conv_shapes import ConvCall, step_convolutions, step_tensor
from bench_gpu import time_calls
from bench_norm_kernels import step_parser

NARROW = 8  # cuDNN's NHWC kernels take channels in multiples of this


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = step_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per formulation")
    parser.add_argument("--out", default="narrow_convs")
    return parser.parse_args(argv)


def is_narrow(call: ConvCall) -> bool:
    """A dense stride-1 "same" convolution with fewer than :data:`NARROW` input or output channels."""
    kernel = call.weight_shape[2:]
    same = all(pad == size // 2 and size % 2 == 1 for pad, size in zip(call.padding, kernel))
    dense = call.groups == 1 and set(call.stride) == {1} and set(call.dilation) == {1}
    return dense and same and min(call.input_shape[1], call.weight_shape[0]) < NARROW


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _as_channels_last(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous(memory_format=torch.channels_last)


def _pad_channels(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``tensor`` zero-padded along ``dim`` (0 or 1 of a 4D tensor) to ``size``."""
    padding = [0, 0] * (tensor.dim() - dim - 1) + [0, size - tensor.shape[dim]]
    return F.pad(tensor, padding)


def pointwise_product(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """A 1 x 1 convolution as one matrix product over channels-last pixels: (N, C, H, W) x (O, C) -> (N, O, H, W)."""
    batch, channels, height, width = x.shape
    product = x.permute(0, 2, 3, 1).reshape(-1, channels) @ matrix.t()
    return product.reshape(batch, height, width, -1).permute(0, 3, 1, 2)


def neighbourhoods(x: torch.Tensor, kernel: tuple[int, int], channels: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, ``channels``, H, W): the kH x kW zero-padded neighbourhood of every pixel, tap-major
    (channel ``(i kW + j) C + c`` holds ``x[c]`` shifted by tap (i, j)), then zero channels up to ``channels``."""
    height, width = x.shape[2:]
    padded = F.pad(x, (kernel[1] // 2, kernel[1] // 2, kernel[0] // 2, kernel[0] // 2))
    taps = [padded[:, :, i : i + height, j : j + width] for i in range(kernel[0]) for j in range(kernel[1])]
    return _pad_channels(torch.cat(taps, 1), 1, channels)


def sum_of_shifted_taps(taps: torch.Tensor, kernel: tuple[int, int], channels: int) -> torch.Tensor:
    """The inverse arrangement of :func:`neighbourhoods`: (N, kH kW ``channels`` (or more), H, W), tap-major ->
    (N, ``channels``, H, W), each tap's channels shifted by the tap and summed, zero outside the image."""
    height, width = taps.shape[2:]
    padded = F.pad(taps, (kernel[1] // 2, kernel[1] // 2, kernel[0] // 2, kernel[0] // 2))
    total = 0
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            start = (i * kernel[1] + j) * channels
            total = total + padded[:, start : start + channels, i : i + height, j : j + width]
    return total


def formulations(call: ConvCall) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """The ways to compute ``call`` (without bias), each ``(x, weight) -> y`` with the shapes of the call."""
    out_channels, in_channels = call.weight_shape[:2]
    kernel = tuple(call.weight_shape[2:])
    padding = list(call.padding)

    def cudnn(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight, padding=padding)

    def padded(multiple: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        def run(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            if in_channels < NARROW:
                x = _as_channels_last(_pad_channels(x, 1, multiple))
                weight = _pad_channels(weight, 1, multiple)
            if out_channels < NARROW:
                weight = _pad_channels(weight, 0, multiple)
            return F.conv2d(x, _as_channels_last(weight), padding=padding)[:, :out_channels]

        return run

    def gemm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # weight (O, C, kH, kW) as tap-major matrices: columns (i kW + j) C + c, or rows (i kW + j) O + o
        taps = kernel[0] * kernel[1]
        if in_channels < NARROW or taps == 1:
            columns = _round_up(taps * in_channels, NARROW)
            matrix = _pad_channels(weight.permute(0, 2, 3, 1).reshape(out_channels, -1), 1, columns)
            return pointwise_product(neighbourhoods(x, kernel, columns), matrix)
        rows = _round_up(taps * out_channels, NARROW)
        matrix = _pad_channels(weight.permute(2, 3, 0, 1).reshape(-1, in_channels), 0, rows)
        return sum_of_shifted_taps(pointwise_product(x, matrix), kernel, out_channels)

    return {"cudnn": cudnn, "pad8": padded(8), "pad16": padded(16), "gemm": gemm}


def _gradients(
    forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor], grad_y: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(forward(), leaves, grad_y)


def time_formulations(args: argparse.Namespace, call: ConvCall) -> list[dict]:
    """One row per formulation of ``call``: forward and forward + backward microseconds, and the largest difference
    to ``cudnn`` over the output and the gradients the step takes, relative to the largest magnitude of each."""
    device = torch.device(args.device)
    generator = torch.Generator(device).manual_seed(0)
    x, weight, grad_y = (
        step_tensor(device, generator, shape) for shape in (call.input_shape, call.weight_shape, call.output_shape())
    )
    needs_grad = ((x, call.input_grad), (weight, call.weight_grad))
    leaves = [tensor.requires_grad_() for tensor, needed in needs_grad if needed]
    rows, reference = [], None
    for name, formulation in formulations(call).items():
        forward = partial(torch.compile(formulation), x, weight)
        forward_backward = partial(_gradients, forward, leaves, grad_y)
        results = [forward().detach().float(), *(grad.float() for grad in forward_backward())]
        reference = reference or results
        difference = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(results, reference))
        rows.append(
            {
                "shape": call.name,
                "formulation": name,
                "forward_us": 1000 * time_calls(device, forward, 3, args.repeats)[0],
                "forward_backward_us": 1000 * time_calls(device, forward_backward, 3, args.repeats)[0],
                "max_relative_difference": difference,
            }
        )
        print(f"{call.name} {name}: {rows[-1]['forward_backward_us']:.1f} us forward + backward", flush=True)
    return rows


def summarise(rows: list[dict], counts: dict[str, int]) -> dict:
    """Prints each convolution's formulations and the step totals (each call's ``cudnn`` time against its fastest
    formulation); returns the totals in microseconds per step."""
    print("\n| convolution | formulation | forward us | forward + backward us | max relative difference |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['shape']} | {row['formulation']} | {row['forward_us']:.1f} | {row['forward_backward_us']:.1f} | "
            f"{row['max_relative_difference']:.1e} |"
        )
    totals = {"cudnn_us": 0.0, "fastest_us": 0.0}
    for shape, count in counts.items():
        own = [row for row in rows if row["shape"] == shape]
        totals["cudnn_us"] += count * next(row["forward_backward_us"] for row in own if row["formulation"] == "cudnn")
        totals["fastest_us"] += count * min(row["forward_backward_us"] for row in own)
    print(f"\nper step: cudnn {totals['cudnn_us']:.1f} us, fastest formulations {totals['fastest_us']:.1f} us")
    return totals


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.backends.cudnn.benchmark = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calls = {call: count for call, count in step_convolutions(args).items() if is_narrow(call)}
    counts = {call.name: count for call, count in calls.items()}
    card = torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda" else "cpu"
    print(f"{card}: {len(calls)} narrow convolutions")
    rows = [row for call in calls for row in time_formulations(args, call)]
    totals = summarise(rows, counts)
    (out / "results.json").write_text(
        json.dumps({"card": card, "args": vars(args), "counts": counts, "rows": rows, "totals": totals}, indent=1)
    )


if __name__ == "__main__":
    main()
