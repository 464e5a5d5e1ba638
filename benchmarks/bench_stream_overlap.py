"""How much of the backward's memory-bound GroupNorm time a second CUDA stream could hide behind weight gradients.

The training step's GroupNorm kernels are memory-bound and sit on its critical path; the convolutions' weight
gradients (wgrad) are compute-bound and off it: nothing in the backward waits for them but the optimizer. A backward
that ran every wgrad on a second stream could overlap them with the input gradients (dgrad) and the GroupNorm
backward kernels of the layers below. This script bounds that gain without changing the trainer: it records the
convolutions (:py:func:`bench_conv_shapes.step_convolutions`) and GroupNorm inputs
(:py:func:`bench_norm_kernels.step_norm_inputs`) of one training forward, then captures, in CUDA graphs timed with CUDA
events, the step's backward kernels as lists, each call as often as the step makes it:

- ``dgrad``, ``wgrad``: every convolution's input or weight gradient; ``norm``: every GroupNorm backward launcher
  (partial sums, reduce, dx);
- ``dgrad+norm``: the critical path, dgrad and norm calls interleaved in proportion; ``serial``: that path, then
  every wgrad, on one stream (the backward as it runs today, but for pointwise work);
- ``dgrad+norm || wgrad`` and ``norm || wgrad``: the first list on the capturing stream, the second on a side stream
  forked from it and joined at the end, in one graph.

``hidden_ms`` of a concurrent row is the sum of its two lists timed alone minus the row's time: what running them
side by side saves in a step. Rows go to ``<out>/results.json``.

GPU:
    python benchmarks/bench_stream_overlap.py --out stream_overlap
CPU check of the script (float32, one stream, times meaningless):
    python benchmarks/bench_stream_overlap.py --device cpu --preset small --size 32 --batch 2 --repeats 1 \\
        --out /tmp/stream_overlap
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_conv_shapes import GRADIENT_MASKS, ConvCall, step_convolutions, step_tensor
from bench_norm_kernels import step_norm_inputs, step_parser

from medsegdiff_monai.networks.kernels.group_norm_triton import group_norm_backward

Call = Callable[[], object]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = step_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=5, help="timed replays of each list")
    parser.add_argument("--out", default="stream_overlap")
    return parser.parse_args(argv)


def convolution_calls(device: torch.device, calls: dict[ConvCall, int]) -> dict[str, list[Call]]:
    """``{"dgrad": [...], "wgrad": [...]}``: one closure per gradient call the step makes (each convolution's
    count times), on random channels-last tensors of the recorded shapes."""
    generator = torch.Generator(device).manual_seed(0)
    lists: dict[str, list[Call]] = {"dgrad": [], "wgrad": []}
    for call, count in calls.items():
        x, weight, grad_y = (
            step_tensor(device, generator, shape)
            for shape in (call.input_shape, call.weight_shape, call.output_shape())
        )
        conv_args = call.aten_arguments()
        for name, needed in (("dgrad", call.input_grad), ("wgrad", call.weight_grad)):
            if needed:
                lists[name] += count * [
                    lambda mask=GRADIENT_MASKS[name], x=x, weight=weight, grad_y=grad_y, conv_args=conv_args: (
                        torch.ops.aten.convolution_backward(grad_y, x, weight, None, *conv_args, mask)
                    )
                ]
    return lists


def norm_calls(device: torch.device, inputs: dict[tuple, int]) -> list[Call]:
    """One closure per GroupNorm backward of the step (each recorded input its count times)."""
    generator = torch.Generator(device).manual_seed(1)
    calls: list[Call] = []
    for (batch, channels, height, width, groups, silu, _), count in inputs.items():
        shape = (batch, channels, height, width)
        x, grad_y = step_tensor(device, generator, shape), step_tensor(device, generator, shape)
        weight = torch.ones(channels, device=device)
        bias = torch.zeros(channels, device=device)
        mean = torch.zeros(batch, groups, device=device)
        rstd = torch.ones(batch, groups, device=device)
        calls += count * [
            lambda x=x, grad_y=grad_y, weight=weight, bias=bias, mean=mean, rstd=rstd, groups=groups, silu=silu: (
                group_norm_backward(grad_y, x, weight, bias, mean, rstd, groups, silu)
            )
        ]
    return calls


def interleave(first: list[Call], second: list[Call]) -> list[Call]:
    """The calls of both lists, each list's order kept, merged in proportion to their lengths (as the backward
    alternates between a layer's convolution and its norm)."""
    keyed = [((index + 0.5) / len(first), 0, call) for index, call in enumerate(first)]
    keyed += [((index + 0.5) / len(second), 1, call) for index, call in enumerate(second)]
    return [call for *_, call in sorted(keyed, key=lambda item: item[:2])]


def time_lists(device: torch.device, main: list[Call], side: list[Call] | None, repeats: int) -> float:
    """Milliseconds of GPU time to run ``main`` on the current stream and ``side`` (if any) on a second stream
    forked from it, both captured in one CUDA graph, the replays timed with CUDA events. Without CUDA the lists run
    one after the other, timed by the host clock."""
    everything = main + (side or [])
    for call in everything:  # cuDNN's algorithm search and Triton's compilation cannot run inside a capture
        call()
    if device.type != "cuda":
        begin = time.perf_counter()
        for _ in range(repeats):
            for call in everything:
                call()
        return 1000 * (time.perf_counter() - begin) / repeats
    torch.cuda.synchronize(device)
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream(device)
    with torch.cuda.graph(graph):
        if side:
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for call in side:
                    call()
        for call in main:
            call()
        if side:
            torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    end.synchronize()
    del graph
    return start.elapsed_time(end) / repeats


def measure(args: argparse.Namespace) -> list[dict]:
    """The rows of the module docstring: each list alone, the serial backward and the two concurrent pairs."""
    device = torch.device(args.device)
    convolutions = convolution_calls(device, step_convolutions(args))
    norms = norm_calls(device, step_norm_inputs(args))
    dgrad, wgrad = convolutions["dgrad"], convolutions["wgrad"]
    critical = interleave(dgrad, norms)
    lists = {"dgrad": dgrad, "wgrad": wgrad, "norm": norms, "dgrad+norm": critical, "serial": critical + wgrad}
    alone = {name: time_lists(device, calls, None, args.repeats) for name, calls in lists.items()}
    rows = [{"row": name, "calls": len(lists[name]), "ms": ms, "hidden_ms": None} for name, ms in alone.items()]
    for main_name, main in (("dgrad+norm", critical), ("norm", norms)):
        ms = time_lists(device, main, wgrad, args.repeats) if device.type == "cuda" else float("nan")
        rows.append(
            {
                "row": f"{main_name} || wgrad",
                "calls": len(main) + len(wgrad),
                "ms": ms,
                "hidden_ms": alone[main_name] + alone["wgrad"] - ms,
            }
        )
    return rows


def print_rows(card: str, rows: list[dict]) -> None:
    """The rows as a markdown table."""
    print(f"\n{card}\n\n| kernels | calls | ms | hidden ms |\n|---|---|---|---|")
    for row in rows:
        hidden = "-" if row["hidden_ms"] is None else f"{row['hidden_ms']:.2f}"
        print(f"| {row['row']} | {row['calls']} | {row['ms']:.2f} | {hidden} |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.backends.cudnn.benchmark = True
    card = torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda" else "cpu"
    rows = measure(args)
    print_rows(card, rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"card": card, "args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
