"""Tiling sweep of the channels-last GroupNorm (+ SiLU) Triton kernels on the norm inputs of one training step.

The GroupNorm kernels are the largest block of memory-bound time in the compiled training step
(``docs/performance.md``). This script finds the inputs they see: one forward of the network (``--preset``, channels
last, bf16 autocast, ``--batch`` x ``--size`` x ``--size``) with a hook on every :py:class:`FusedGroupNorm`, counting
each distinct (shape, groups, SiLU). For each such input it times the forward launcher (statistics, combine, apply;
or one kernel for whole groups) and the backward launcher (partial sums, reduce, dx; or the whole-group kernel and
reduce) with the launchers' own tiling (``rule``, :py:meth:`LaunchConfig.for_input`), with ``LaunchConfig()``, with
every config of the grid ``--tiles x --programs x --warps x --stages`` and, where the input's groups fit one
program's tile, with whole groups over each of ``--whole-groups-warps`` (``whole/W``), captured in CUDA graphs and
timed with CUDA events (GPU time, as in the compiled, graph-captured training step; the launchers' host overhead
exceeds the kernels' time on most inputs). It prints per input the rule's and ``LaunchConfig()``'s times, the best
config's and its bandwidth; then the whole step's GroupNorm time (each input times its count) for each of them, for
the best single pixel-chunk config and for the rule with each whole-group config where it runs. With
``--samples-per-launch K ...`` it also times the rule's tiling of the whole input launched on one slab of K samples
after another (config ``rule/slabK``), so that each slab's second pass could read its input from L2.
Rows go to ``<out>/results.json`` and ``results.csv``.

GPU:
    python benchmarks/bench_norm_kernels.py --out norm_sweep
CPU check of the script (the kernels under the Triton interpreter, times meaningless):
    TRITON_INTERPRET=1 python benchmarks/bench_norm_kernels.py --device cpu --preset small --size 16 --batch 2 \\
        --tiles 256 --programs 8 --warps 4 --repeats 1 --out /tmp/norm_sweep
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from medsegdiff_monai.networks import FusedGroupNorm, get_network
from medsegdiff_monai.networks.kernels.group_norm_triton import (
    LaunchConfig,
    group_norm_backward,
    group_norm_forward,
    whole_groups_fit,
)


def step_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the options of the training step whose inputs are timed: ``--device``, ``--preset`` (network
    preset), ``--size`` and ``--batch`` (slices of ``size`` x ``size`` per step)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="base")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = step_parser(__doc__)
    parser.add_argument("--tiles", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--programs", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--stages", type=int, nargs="+", default=[1], help="software-pipelining depths of the loops")
    parser.add_argument(
        "--min-elements", type=int, default=0, help="sweep only the inputs of at least this many elements"
    )
    parser.add_argument(
        "--max-elements", type=int, default=2**62, help="sweep only the inputs of at most this many elements"
    )
    parser.add_argument(
        "--whole-groups-warps",
        type=int,
        nargs="*",
        default=[],
        help="also time whole groups (LaunchConfig(whole_groups=True)) with these warps, where the groups fit (the "
        "rule runs them over 8 warps on inputs of up to 2^22 elements)",
    )
    parser.add_argument(
        "--samples-per-launch",
        type=int,
        nargs="*",
        default=[],
        help="also time the rule's tiling launched on slabs of this many samples, one slab after another",
    )
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per launcher and config")
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds after which no new input starts")
    parser.add_argument("--out", default="norm_sweep")
    return parser.parse_args(argv)


def step_network(args: argparse.Namespace) -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The ``--preset`` network on ``--device``, channels-last, and the inputs of one training step's forward:
    ``x_t`` (B, mask_channels, S, S), the timesteps (B,) and the image (B, 4, S, S), with B ``--batch`` and S
    ``--size``, the tensors channels-last."""
    device = torch.device(args.device)
    network = get_network(args.preset).to(device).to(memory_format=torch.channels_last)
    shape = (args.batch, args.size, args.size)
    image = torch.randn(shape[0], network.in_channels, *shape[1:], device=device)
    x_t = torch.randn(shape[0], network.mask_channels, *shape[1:], device=device)
    timesteps = torch.randint(0, 1000, (args.batch,), device=device)
    channels_last = torch.channels_last
    return network, (
        x_t.contiguous(memory_format=channels_last),
        timesteps,
        image.contiguous(memory_format=channels_last),
    )


def step_norm_inputs(args: argparse.Namespace) -> Counter:
    """(N, C, H, W, groups, silu, eps) of every FusedGroupNorm call in one forward, with their counts."""
    device = torch.device(args.device)
    network, inputs = step_network(args)
    seen: Counter = Counter()

    def record(module: FusedGroupNorm, inputs: tuple[torch.Tensor]) -> None:
        if module.uses_kernel(inputs[0]) or device.type == "cpu":
            seen[(*inputs[0].shape, module.num_groups, module.silu, module.eps)] += 1

    hooks = [m.register_forward_pre_hook(record) for m in network.modules() if isinstance(m, FusedGroupNorm)]
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        network(*inputs)
    for hook in hooks:
        hook.remove()
    return seen


def input_name(key: tuple) -> str:
    """``8x128x256x256/g32/silu``: shape, groups and whether SiLU follows, of a ``step_norm_inputs`` key."""
    return "x".join(map(str, key[:4])) + f"/g{key[4]}" + ("/silu" if key[5] else "")


def time_call(device: torch.device, function: Callable[[], object], repeats: int) -> float:
    """Microseconds of GPU time per call: ``repeats`` calls captured in one CUDA graph, replayed and timed with CUDA
    events. Without CUDA: the host clock (under the Triton interpreter)."""
    for _ in range(2):  # compiles the kernels, which a graph capture cannot
        function()
    if device.type != "cuda":
        begin = time.perf_counter()
        for _ in range(repeats):
            function()
        return 1e6 * (time.perf_counter() - begin) / repeats
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            function()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    del graph
    return 1000 * start.elapsed_time(end) / repeats


def config_name(config: LaunchConfig | None) -> str:
    """``tile/programs/warps/stages``, ``whole/warps`` for whole groups, or ``rule`` for the launchers' own choice
    (:py:meth:`LaunchConfig.for_input`)."""
    if config is None:
        return "rule"
    if config.whole_groups:
        return f"whole/{config.num_warps}"
    return f"{config.tile_elements}/{config.programs}/{config.num_warps}/{config.num_stages}"


def sweep_input(args: argparse.Namespace, key: tuple, configs: list[LaunchConfig | None]) -> list[dict]:
    """Forward and backward launcher microseconds of one norm input for every config."""
    batch, channels, height, width, groups, silu, eps = key
    device = torch.device(args.device)
    generator = torch.Generator(device).manual_seed(0)
    shape = (batch, channels, height, width)
    x = (2 * torch.randn(shape, device=device, generator=generator) + 1).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    grad_y = torch.randn(shape, device=device, generator=generator).to(torch.bfloat16)
    grad_y = grad_y.contiguous(memory_format=torch.channels_last)
    weight = 1 + 0.1 * torch.randn(channels, device=device, generator=generator)
    bias = 0.1 * torch.randn(channels, device=device, generator=generator)
    _, mean, rstd = group_norm_forward(x, weight, bias, groups, eps, silu)
    tensor_bytes = x.numel() * x.element_size()
    if whole_groups_fit(shape, groups):
        configs = configs + [LaunchConfig(whole_groups=True, num_warps=warps) for warps in args.whole_groups_warps]
    launches = [(config_name(config), config, config, batch) for config in configs]
    launches += [
        (
            f"rule/slab{slab}",
            LaunchConfig.for_input(shape, backward=False, num_groups=groups),
            LaunchConfig.for_input(shape, backward=True, num_groups=groups),
            slab,
        )
        for slab in args.samples_per_launch
    ]
    rows = []
    for name, forward_config, backward_config, slab in launches:
        slabs = [slice(start, start + slab) for start in range(0, batch, slab)]

        def forward(slabs=slabs, config=forward_config) -> None:
            for part in slabs:
                group_norm_forward(x[part], weight, bias, groups, eps, silu, config)

        def backward(slabs=slabs, config=backward_config) -> None:
            for part in slabs:
                group_norm_backward(grad_y[part], x[part], weight, bias, mean[part], rstd[part], groups, silu, config)

        forward_us = time_call(device, forward, args.repeats)
        backward_us = time_call(device, backward, args.repeats)
        rows.append(
            {
                "input": input_name(key),
                "config": name,
                "forward_us": forward_us,
                "backward_us": backward_us,
                # forward: x read twice, y written; backward: x and dy read twice, dx written
                "forward_tb_per_s": 3 * tensor_bytes / forward_us / 1e6,
                "backward_tb_per_s": 5 * tensor_bytes / backward_us / 1e6,
            }
        )
    return rows


def summarise(rows: list[dict], counts: dict[str, int]) -> dict:
    """Per input: the rule's, the uniform default's and the best times; then the step totals (each input weighted by
    its calls per step) of the rule, of ``LaunchConfig()`` everywhere, of the best config per input and pass, of the
    best single config, of the rule per slab of samples and of the rule with each whole-group config where it ran."""
    uniform = config_name(LaunchConfig())
    print(
        f"\n| input | calls/step | rule fwd / bwd us | {uniform} fwd / bwd us | best fwd us (config) | "
        "best bwd us (config) | best fwd / bwd TB/s |"
    )
    print("|---|---|---|---|---|---|---|")
    totals: Counter = Counter()
    whole_configs = sorted({row["config"] for row in rows if row["config"].startswith("whole/")})
    for key, count in counts.items():
        mine = {row["config"]: row for row in rows if row["input"] == key}
        if not mine:
            continue
        tilings = [row for name, row in mine.items() if not name.startswith("rule/slab")]
        best_forward = min(tilings, key=lambda r: r["forward_us"])
        best_backward = min(tilings, key=lambda r: r["backward_us"])
        totals["rule"] += count * (mine["rule"]["forward_us"] + mine["rule"]["backward_us"])
        totals[uniform] += count * (mine[uniform]["forward_us"] + mine[uniform]["backward_us"])
        totals["best per input and pass"] += count * (best_forward["forward_us"] + best_backward["backward_us"])
        for name in [name for name in mine if name.startswith("rule/slab")]:
            totals[name] += count * (mine[name]["forward_us"] + mine[name]["backward_us"])
        for whole in whole_configs:
            row = mine.get(whole, mine["rule"])  # the rule where the groups do not fit
            totals[f"rule, but {whole} where groups fit"] += count * (row["forward_us"] + row["backward_us"])
        cells = [f"{mine[name]['forward_us']:.1f} / {mine[name]['backward_us']:.1f}" for name in ("rule", uniform)]
        print(
            f"| {key} | {count} | {' | '.join(cells)} | {best_forward['forward_us']:.1f} ({best_forward['config']}) | "
            f"{best_backward['backward_us']:.1f} ({best_backward['config']}) | "
            f"{best_forward['forward_tb_per_s']:.2f} / {best_backward['backward_tb_per_s']:.2f} |"
        )
    single: Counter = Counter()
    for row in rows:
        if not row["config"].startswith(("rule", "whole/")):
            single[row["config"]] += counts[row["input"]] * (row["forward_us"] + row["backward_us"])
    config, best_single = min(single.items(), key=lambda item: item[1])
    totals[f"best single config ({config})"] = best_single
    print("\nGroupNorm GPU time of one step (forward + backward launchers; configs as tile/programs/warps/stages):")
    for name, micros in totals.items():
        print(f"  {name}: {micros / 1000:.2f} ms")
    return {name: micros / 1000 for name, micros in totals.items()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    begin = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seen = step_norm_inputs(args)
    counts = {input_name(key): count for key, count in seen.items()}
    print(f"{sum(seen.values())} GroupNorm calls per forward, {len(seen)} distinct inputs", flush=True)
    configs = [
        LaunchConfig(tile_elements=tile, programs=programs, num_warps=warps, num_stages=stages)
        for tile, programs, warps, stages in itertools.product(args.tiles, args.programs, args.warps, args.stages)
    ]
    configs = [None, *dict.fromkeys([LaunchConfig(), *configs])]
    rows: list[dict] = []
    for key in sorted(seen, key=lambda k: -k[0] * k[1] * k[2] * k[3] * seen[k]):
        if not args.min_elements <= key[0] * key[1] * key[2] * key[3] <= args.max_elements:
            continue
        if time.perf_counter() - begin > args.deadline:
            print(f"deadline: {key} not swept", flush=True)
            continue
        rows.extend(sweep_input(args, key, configs))
        print(f"{input_name(key)} swept at {time.perf_counter() - begin:.0f} s", flush=True)
        (out / "results.json").write_text(json.dumps({"counts": counts, "rows": rows}, indent=1))
    totals_ms = summarise(rows, counts)
    (out / "results.json").write_text(json.dumps({"counts": counts, "rows": rows, "totals_ms": totals_ms}, indent=1))
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\ndone in {time.perf_counter() - begin:.0f} s; results in {out}", flush=True)


if __name__ == "__main__":
    main()
