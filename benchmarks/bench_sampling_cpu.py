"""Seconds per volume of whole-subject diffusion sampling (ensemble as one batch) for several step counts.

Run: ``.venv/bin/python benchmarks/bench_sampling_cpu.py [--steps 10 25 1000] [--scheduler ddim] [--ensemble 5]
[--preset small] [--shape 240 240 155] [--roi 192] [--slice-batch 4] [--repeats 3] [--check-slices 2] [--device cpu]``.

A synthetic HGG subject of ``--shape`` (default full size, 240 x 240 x 155; the demo data's is 64 x 64 x 48 at
``--roi 64``) is made in memory, saved as NIfTI and put through the inference transforms (RAS, crop to the brain,
z-score, in-plane pad/crop to ``--roi``); its S axial slices with brain are
what :func:`medsegdiff_monai.inferers.sample_volume` samples. A whole volume at N steps is
``ceil(S / B) * (t_encode + N * t_step)`` for slice batches of B slices: ``t_encode`` (condition network on B slices)
and ``t_step`` (one denoising step on B x K inputs plus the scheduler update) are measured, best of ``--repeats``
after a warm-up (the cores are shared, so the fastest run is the least disturbed), and the volume time is computed
from them, so no row needs the full run (which takes hours on a CPU at 1000 steps). The formula is checked against
one real :class:`DiffusionSampler` call on ``--check-slices`` slices at the smallest N (measured vs predicted). A step
costs the same for every few-step scheduler (``ddim``, ``dpmpp_2m``: one network pass and an element-wise update).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import nibabel as nib
import torch

from medsegdiff_monai.data import MODALITIES, make_synthetic_subject
from medsegdiff_monai.inferers import DiffusionSampler, brain_slice_mask, repeat_condition
from medsegdiff_monai.networks import get_network
from medsegdiff_monai.transforms import get_inference_transforms


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_volume(shape: tuple[int, int, int], roi: int) -> torch.Tensor:
    """The transformed (4, roi, roi, D) image of a synthetic HGG subject of ``shape``."""
    subject = make_synthetic_subject(grade=1, shape=shape, seed=0)
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for modality, volume in zip(MODALITIES, subject.images, strict=True):
            path = Path(folder) / f"BraTS20_Training_999_{modality}.nii"
            nib.save(nib.Nifti1Image(volume, subject.affine), str(path))
            paths.append(str(path))
        return get_inference_transforms((roi, roi))({"image": paths})["image"].as_tensor()


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
    parser.add_argument("--scheduler", default="ddim", help="sampling scheduler (ddim, dpmpp_2m)")
    parser.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155], help="synthetic volume shape")
    parser.add_argument("--roi", type=int, default=192)
    parser.add_argument("--slice-batch", type=int, default=4, help="slices per sampler call (B)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check-slices", type=int, default=2, help="slices of the end-to-end check (0: skip)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    network = get_network(args.preset).to(device).eval()
    volume = synthetic_volume(tuple(args.shape), args.roi).to(device)
    brain = torch.nonzero(brain_slice_mask(volume)).flatten()
    slices = volume.permute(3, 0, 1, 2)[brain]
    batch, members = min(args.slice_batch, len(brain)), args.ensemble
    threads = (
        f"{torch.get_num_threads()} CPU threads, load average {os.getloadavg()[0]:.1f} at start"
        if device.type == "cpu"
        else torch.cuda.get_device_name(device)
    )
    print(f"torch {torch.__version__}, {threads}; preset {args.preset}, roi {args.roi}x{args.roi}, ensemble {members}")
    shape = "x".join(map(str, args.shape))
    print(f"volume {shape} -> {tuple(volume.shape)}; {len(brain)} of {volume.shape[-1]} slices hold brain")

    image = slices[:batch]
    sampler = DiffusionSampler(num_inference_steps=min(args.steps), scheduler=args.scheduler, ensemble_size=members)
    with torch.no_grad():
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
        check = DiffusionSampler(num_inference_steps=steps, scheduler=args.scheduler, ensemble_size=members)
        part = slices[: args.check_slices]
        with torch.no_grad():
            measured = best_seconds(lambda: check(network, part), 1, device)
        predicted = (t_encode + steps * t_step) * args.check_slices / batch
        print(
            f"\ncheck: DiffusionSampler on {args.check_slices} slices, {steps} steps: measured {measured:.1f} s, "
            f"per-slice prediction from the batch-{batch} times {predicted:.1f} s"
        )


if __name__ == "__main__":
    main()
