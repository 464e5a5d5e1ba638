"""Seconds per volume of whole-subject diffusion sampling (ensemble as one batch) for several step counts.

Run: ``.venv/bin/python benchmarks/bench_sampling_cpu.py [--steps 10 25 1000] [--scheduler ddim] [--ensemble 5]
[--preset small] [--shape 240 240 155] [--roi 192] [--slice-batch B] [--no-channels-last] [--cpu-amp] [--repeats 3]
[--check-slices 2] [--volume] [--device cpu]``.

A synthetic HGG subject of ``--shape`` (default full size, 240 x 240 x 155; the demo data's is 64 x 64 x 48 at
``--roi 64``) is made in memory, saved as NIfTI and put through the inference transforms (RAS, crop to the brain,
z-score, in-plane pad/crop to ``--roi``); its S axial slices with brain are
what :func:`medsegdiff_monai.inferers.sample_volume` samples. A whole volume at N steps is
``ceil(S / B) * (t_encode + N * t_step)`` for slice batches of B slices: ``t_encode`` (condition network on B slices)
and ``t_step`` (one denoising step on B x K inputs plus the scheduler update) are measured, best of ``--repeats``
after a warm-up (the cores are shared, so the fastest run is the least disturbed), and the volume time is computed
from them, so no row needs the full run (which takes hours on a CPU at 1000 steps). The formula is checked against
one real :class:`DiffusionSampler` call on ``--check-slices`` slices at the smallest N (measured vs predicted). A step
costs the same for every few-step scheduler (``ddim``, ``dpmpp_2m``, ``dpmpp_3m``: one network pass and an
element-wise update).
``--volume`` also times :func:`sample_volume` on the whole volume at the smallest N, end to end.

The defaults are the bundle's on a CPU: ``--slice-batch`` from :func:`default_slice_batch_size`, the network and its
inputs channels-last (``--no-channels-last``: contiguous), float32 (``--cpu-amp``: bf16 autocast, the bundle's
``--cpu_amp true``).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import time

import torch
from bench_gpu import synthetic_volume  # a sibling script: benchmarks/ is sys.path[0]

from medsegdiff_monai.inferers import (
    DiffusionSampler,
    brain_slice_mask,
    default_slice_batch_size,
    repeat_condition,
    sample_volume,
)
from medsegdiff_monai.networks import get_network


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(function, repeats: int, device: torch.device) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 1000])
    parser.add_argument("--ensemble", type=int, default=5)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--scheduler", default="ddim", help="sampling scheduler (ddim, dpmpp_2m, dpmpp_3m)")
    parser.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155], help="synthetic volume shape")
    parser.add_argument("--roi", type=int, default=192)
    parser.add_argument("--slice-batch", type=int, default=None, help="slices per sampler call (B)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--cpu-amp", action="store_true", help="bf16 autocast on the CPU")
    parser.add_argument("--volume", action="store_true", help="also time the whole volume end to end")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check-slices", type=int, default=2, help="slices of the end-to-end check (0: skip)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    network = get_network(args.preset).to(device, memory_format=memory_format).eval()
    volume = synthetic_volume(tuple(args.shape), args.roi)[0].to(device)
    brain = torch.nonzero(brain_slice_mask(volume)).flatten()
    slices = volume.permute(3, 0, 1, 2)[brain]
    slice_batch = args.slice_batch or default_slice_batch_size(device, (args.roi, args.roi))
    batch, members = min(slice_batch, len(brain)), args.ensemble
    amp = {"amp_dtype": "bfloat16", "cpu_amp": True} if args.cpu_amp else {}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.cpu_amp else contextlib.nullcontext()
    threads = (
        f"{torch.get_num_threads()} CPU threads, load average {os.getloadavg()[0]:.1f} at start"
        if device.type == "cpu"
        else torch.cuda.get_device_name(device)
    )
    print(
        f"torch {torch.__version__}, {threads}; preset {args.preset}, roi {args.roi}x{args.roi}, ensemble {members}, "
        f"slice batch {batch}, {'channels-last' if args.channels_last else 'contiguous'}, "
        f"{'bf16 autocast' if args.cpu_amp else 'float32'}"
    )
    shape = "x".join(map(str, args.shape))
    print(f"volume {shape} -> {tuple(volume.shape)}; {len(brain)} of {volume.shape[-1]} slices hold brain")

    image = slices[:batch]
    sampler = DiffusionSampler(num_inference_steps=min(args.steps), scheduler=args.scheduler, ensemble_size=members)
    with torch.no_grad(), autocast:
        t_encode = best_seconds(lambda: network.encode_condition(image), args.repeats, device)
        condition = repeat_condition(network.encode_condition(image), members)
        x_t = torch.randn(batch * members, network.mask_channels, args.roi, args.roi, device=device)
        timestep = sampler.timesteps[0]
        t = torch.full((batch * members,), timestep, device=device, dtype=torch.long)

        def one_step() -> None:
            x0 = torch.tanh(network.denoise(x_t, t, condition) / 2)
            sampler.scheduler.step(x0, timestep, x_t)

        t_step = best_seconds(one_step, args.repeats, device)
    calls = math.ceil(len(brain) / batch)
    print(
        f"measured: condition network {t_encode:.3f} s per {batch} slices; one step {t_step:.3f} s per "
        f"{batch} x {members} inputs ({t_step / batch:.3f} s per slice-step, all members)"
    )
    print(f"\n{'steps':>6}{'s / volume':>14}{'min / volume':>14}  how")
    for steps in args.steps:
        seconds = calls * (t_encode + steps * t_step)
        print(
            f"{steps:>6}{seconds:>14.1f}{seconds / 60:>14.1f}  {calls} calls x ({t_encode:.2f} + {steps} x "
            f"{t_step:.2f}) s, from measured per-step times"
        )

    if args.check_slices > 0:
        steps = min(args.steps)
        check = DiffusionSampler(num_inference_steps=steps, scheduler=args.scheduler, ensemble_size=members, **amp)
        part = slices[: args.check_slices]
        with torch.no_grad():
            measured = best_seconds(lambda: check(network, part), 1, device)
        predicted = (t_encode + steps * t_step) * args.check_slices / batch
        print(
            f"\ncheck: DiffusionSampler on {args.check_slices} slices, {steps} steps: measured {measured:.1f} s, "
            f"per-slice prediction from the batch-{batch} times {predicted:.1f} s"
        )

    if args.volume:
        steps = min(args.steps)
        whole = DiffusionSampler(num_inference_steps=steps, scheduler=args.scheduler, ensemble_size=members, **amp)
        with torch.no_grad():
            sample_volume(network, volume[..., brain[:batch]], whole, slice_batch_size=batch)  # warm-up
            synchronize(device)
            start = time.perf_counter()
            sample_volume(network, volume, whole, slice_batch_size=batch)
            synchronize(device)
            seconds = time.perf_counter() - start
        print(f"\nvolume: sample_volume end to end, {len(brain)} slices, {steps} steps: {seconds:.1f} s")


if __name__ == "__main__":
    main()
