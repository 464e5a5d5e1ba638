"""GPU figures: training throughput, memory, FLOPs and MFU; whole-volume sampling time; a long bf16 training check.

Sections (``--sections``, in this order; each result is appended to ``<out>/results.json`` and ``results.csv`` as
soon as it exists, so a run cut short keeps what it measured):

- ``flops``: model FLOPs of one training step (forward + backward of the network, ``FlopCounterMode``) per size,
  and of one denoising pass / one condition pass per slice at the volume roi.
- ``kernels``: the fused channels-last GroupNorm (+ SiLU) Triton kernels (:py:class:`FusedGroupNorm`) on the
  ``base`` preset's largest norm shapes, forward + backward: error against a float64 reference, and time against
  ``nn.GroupNorm`` + SiLU in eager NCHW and ``torch.compile`` NCHW (inductor's fused kernels), with
  the bytes each must move and the achieved bandwidth.
- ``train``: ``DiffusionTrainer._iteration`` (noise, forward, losses, backward, clipping, fused AdamW, the finite
  check) timed with CUDA events after a warm-up, for each variant (``fp32``, ``bf16``, ``+cl`` channels-last,
  ``+compile`` torch.compile of the network, ``+graphs`` the same with CUDA graphs (``mode="reduce-overhead"``),
  ``+forcecl`` the same with inductor's channels-last layout forced for all convolutions, ``+autotune`` the same
  with inductor's ``max_autotune`` (each matrix product and forward convolution timed against Triton templates, the
  pointwise and reduction kernels' tilings tuned by coordinate descent), ``+nobench``
  cudnn.benchmark off, ``+determ`` deterministic cuDNN (what ``monai.utils.set_determinism`` selects and the
  bundle's ``cudnn_benchmark: false`` keeps; CUDA-graph variants of one run share one cuDNN mode), ``+blocking``
  blocking host-to-device copies, ``+nofuse`` plain ``nn.GroupNorm`` + SiLU instead of :py:class:`FusedGroupNorm`,
  ``+fftout`` the SS-Former's FFT core outside the compiled graphs); peak
  memory, slices/s and MFU against ``--peak-tflops``; the first variant at ``--extra-batches``; then the largest
  batch that fits.
- ``profile``: GPU busy share, GPU time per step split into matrix kernels (convolutions, GEMMs, attention), cuDNN
  layout conversions and the rest, and top kernels of the fastest training variant (``torch.profiler``); the number
  of host synchronisations in one iteration (``torch.cuda.set_sync_debug_mode``).
- ``numerics``: up to ``--numerics-steps`` bf16 training steps of the fastest variant on fresh synthetic batches,
  counting non-finite (skipped) steps, until the deadline.
- ``loader``: the bundle's training data path on a synthetic full-size release (``make_slice_dataset`` +
  ``get_train_transforms`` + a pinned-memory ``DataLoader``): slices/s the loader delivers alone per worker count,
  then the fastest variant's step fed by it (``--loader-workers[0]`` workers), slices/s and GPU busy share.
- ``sampling``: condition pass and one reverse step (denoise of B x K inputs + DDIM update) per variant.
- ``volume``: :func:`sample_volume` of a synthetic full-size subject (inference transforms at ``--volume-roi``),
  grade included, timed end to end for each ``--volume-variants`` (eager and compiled), ``--volume-slice-batches``
  and ``--volume-samplers`` (``scheduler:steps[:eta]``, e.g. ``ddim:10``, ``dpmpp_2m:6``, ``dpmpp_2m:20:1``), each
  with every ``--volume-shared-steps`` below its step count (the sampler's ``shared_steps``), after a
  1-step warm-up run that holds any compilation; 1000-step DDPM is extrapolated from two DDIM runs
  (``T(N) = a + N b``).

GPU (defaults: base preset, 256 and 192, batch 8):
    python benchmarks/bench_gpu.py --out gpu_results
CPU tiny mode (the script's own check):
    python benchmarks/bench_gpu.py --device cpu --preset small --size 64 --batch 2 --warmup 1 --steps 2 \\
        --train-variants fp32 --other-size-variants --max-batch-variant "" --sampling-variants fp32 \\
        --sampling-slices 2 --volume-shape 64 64 24 --volume-roi 64 --volume-samplers ddim:2 ddim:3 dpmpp_2m:2 \\
        --volume-variants fp32 --numerics-steps 3 \\
        --loader-subjects 2 --loader-workers 0 --loader-seconds 3
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import torch
from monai.data import DataLoader
from monai.networks.schedulers import DDPMScheduler
from torch.utils.data import RandomSampler
from torch.utils.flop_counter import FlopCounterMode

from medsegdiff_monai.data import (
    MODALITIES,
    build_datalist,
    load_brats_datalist,
    make_slice_dataset,
    make_synthetic_subject,
    read_brats_folder,
    write_datalist,
    write_synthetic_brats,
)
from medsegdiff_monai.engines import DiffusionTrainer, build_optimizer
from medsegdiff_monai.inferers import DiffusionSampler, brain_slice_mask, repeat_condition, sample_volume
from medsegdiff_monai.losses import GradeFocalLoss, SegmentationLoss, UncertaintyWeightedLoss
from medsegdiff_monai.networks import FusedGroupNorm, SpectralCrossAttention, get_network
from medsegdiff_monai.transforms import get_inference_transforms, get_train_transforms

VARIANT_FLAGS = {
    "fp32", "bf16", "cl", "compile", "graphs", "forcecl", "autotune", "nobench", "determ", "blocking", "nofuse",
    "fftout"
}  # fmt: skip
# cuDNN's mode per flag, as (deterministic, benchmark); without either flag (deterministic False, benchmark True)
CUDNN_MODES = {"nobench": (False, False), "determ": (True, False)}
# kernel-name fragments of the matrix (convolution / GEMM / attention) kernels and of cuDNN's layout conversions
MATRIX_KERNELS = ("gemm", "xmma", "conv", "dgrad", "wgrad", "fprop", "cutlass", "flash", "fmha", "sm90_")
LAYOUT_KERNELS = ("nchwToNhwc", "nhwcToNchw")


def time_calls(device: torch.device, function: Callable[[], object], warmup: int, steps: int) -> tuple[float, float]:
    """(milliseconds per call, seconds of the warm-up): ``warmup`` calls, then ``steps`` calls timed with CUDA events
    (GPU time, the calls launched one after another), or with the host clock off CUDA."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda _: None
    synchronize(device)
    begin = time.perf_counter()
    for _ in range(warmup):
        function()
    synchronize(device)
    warmup_s = time.perf_counter() - begin
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            function()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / steps, warmup_s
    begin = time.perf_counter()
    for _ in range(steps):
        function()
    return 1000 * (time.perf_counter() - begin) / steps, warmup_s


class Bench:
    """Shared state: arguments, device, deadline, the result rows and their files."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.start = time.perf_counter()
        self.rows: list[dict] = []
        self.flops: dict[str, float] = {}
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.best_train: tuple[float, str, DiffusionTrainer | None] = (math.inf, "", None)
        self.profile_trainers: dict[str, DiffusionTrainer] = {}

    def time_left(self) -> float:
        return self.args.deadline - (time.perf_counter() - self.start)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float:
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else math.nan

    def time_calls(self, function: Callable[[], object], warmup: int, steps: int) -> tuple[float, float]:
        """:func:`time_calls` on this run's device."""
        return time_calls(self.device, function, warmup, steps)

    def record(self, **row: object) -> None:
        row = {"card": self.card, "elapsed_s": round(time.perf_counter() - self.start, 1), **row}
        self.rows.append(row)
        print(" | ".join(f"{k}={_short(v)}" for k, v in row.items() if k != "card"), flush=True)
        (self.out / "results.json").write_text(json.dumps({"flops": self.flops, "rows": self.rows}, indent=1))
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        with open(self.out / "results.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.rows)

    @property
    def card(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"


def print_tables(rows: list[dict]) -> None:
    """One markdown table per section, in the order the sections ran (the run's last output)."""
    for section in dict.fromkeys(row["section"] for row in rows):
        section_rows = [row for row in rows if row["section"] == section]
        keys = [k for k in dict.fromkeys(k for row in section_rows for k in row) if k not in ("card", "section")]
        print(f"\n{section} ({section_rows[0]['card']})\n")
        print("| " + " | ".join(keys) + " |")
        print("|" + "---|" * len(keys))
        for row in section_rows:
            print("| " + " | ".join(_short(row.get(k, "")) for k in keys) + " |")


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def parse_variant(variant: str) -> set[str]:
    flags = set(variant.split("+"))
    if not flags <= VARIANT_FLAGS or len(flags & {"fp32", "bf16"}) != 1:
        raise ValueError(f"variant {variant!r}: expected fp32 or bf16 joined by '+' with {sorted(VARIANT_FLAGS)}.")
    return flags


def cudnn_mode(flags: set[str]) -> tuple[bool, bool]:
    """``(cudnn.deterministic, cudnn.benchmark)`` of a variant's flags."""
    modes = [CUDNN_MODES[flag] for flag in flags & CUDNN_MODES.keys()]
    if len(modes) > 1:
        raise ValueError(f"variant flags {sorted(flags & CUDNN_MODES.keys())}: at most one cuDNN mode.")
    return modes[0] if modes else (False, True)


def set_cudnn_mode(mode: tuple[bool, bool]) -> None:
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = mode


def synthetic_batch(batch: int, size: int, generator: torch.Generator) -> dict:
    """A training batch on the generator's device whose regions are learnable from the image (TC in WT, ET in TC)."""
    image = torch.randn(batch, 4, size, size, generator=generator, device=generator.device)
    smooth = torch.nn.functional.avg_pool2d(image, 9, stride=1, padding=4)
    whole = smooth[:, 3:4] > 0.1
    core = whole & (smooth[:, 1:2] > 0.1)
    enhancing = core & (smooth[:, 2:3] > 0.1)
    label = torch.cat([core, whole, enhancing], dim=1).float()
    grade = (smooth[:, 1].mean(dim=(1, 2)) > 0).long()
    return {"image": image, "label": label, "grade": grade}


def make_trainer(bench: Bench, batch: dict, flags: set[str], lr: float = 1e-4) -> DiffusionTrainer:
    torch.manual_seed(0)
    channels_last = "cl" in flags
    compile_network = bool(flags & {"compile", "graphs", "forcecl", "autotune"})
    compile_kwargs = {"dynamic": False, "options": compile_options(flags)}
    network = get_network(bench.args.preset, fused_norm="nofuse" not in flags).to(bench.device)
    if "fftout" in flags:
        for module in network.modules():
            if isinstance(module, SpectralCrossAttention):
                module.attend = torch.compiler.disable(module.attend)
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
    weighting = UncertaintyWeightedLoss(tasks=("seg", "grade")).to(bench.device)
    return DiffusionTrainer(
        device=bench.device,
        max_epochs=1,
        train_data_loader=[batch],
        network=network,
        optimizer=build_optimizer(network, weighting, lr=lr, weight_decay=1e-4),
        loss_function=weighting,
        seg_loss=SegmentationLoss(),
        grade_loss=GradeFocalLoss(alpha=(2.428, 0.630)),
        noise_scheduler=DDPMScheduler(num_train_timesteps=1000, prediction_type="sample"),
        amp_dtype="bfloat16" if "bf16" in flags else None,
        channels_last=channels_last,
        compile=compile_network,
        compile_kwargs=compile_kwargs if compile_network else None,
        non_blocking="blocking" not in flags,
    )


def compile_options(flags: set[str]) -> dict[str, bool]:
    """Inductor options of a variant: ``graphs`` CUDA graphs (what ``mode="reduce-overhead"`` sets), ``forcecl``
    channels-last layout for every convolution of the compiled graphs (inductor's heuristic otherwise skips it for
    UNets, whose decoder convolutions have more input than output channels), ``autotune`` Triton templates for
    matrix products and forward convolutions where they beat aten's, and kernel tilings tuned by coordinate descent
    (what ``mode="max-autotune"`` adds)."""
    return {
        "triton.cudagraphs": "graphs" in flags,
        "force_layout_optimization": "forcecl" in flags,
        "max_autotune": "autotune" in flags,
        "coordinate_descent_tuning": "autotune" in flags,
    }


def kernels(bench: Bench) -> None:
    """Fused GroupNorm + SiLU kernels: float64-referenced error and forward + backward time per implementation."""
    generator = torch.Generator(bench.device).manual_seed(0)
    for shape_name in bench.args.kernel_shapes:
        batch, channels, size = map(int, shape_name.split("x"))
        norm = FusedGroupNorm(32, channels, eps=1e-6, silu=True).to(bench.device)
        with torch.no_grad():
            norm.weight.copy_(1 + 0.1 * torch.randn(channels, device=bench.device, generator=generator))
            norm.bias.copy_(0.1 * torch.randn(channels, device=bench.device, generator=generator))
        shape = (batch, channels, size, size)
        x = (2 * torch.randn(shape, device=bench.device, generator=generator) + 1).to(torch.bfloat16)
        grad = torch.randn(shape, device=bench.device, generator=generator).to(torch.bfloat16)
        x_last, grad_last = (
            x.contiguous(memory_format=torch.channels_last),
            grad.contiguous(memory_format=torch.channels_last),
        )
        errors = _kernel_errors(norm, x_last, grad_last)

        def plain(inputs: torch.Tensor, norm: FusedGroupNorm = norm) -> torch.Tensor:
            return torch.nn.functional.silu(
                torch.nn.functional.group_norm(inputs, 32, norm.weight, norm.bias, norm.eps).to(inputs.dtype)
            )

        compiled = torch.compile(plain, dynamic=False)
        implementations = {
            "fused kernel, channels-last": (norm, x_last, grad_last),
            "eager, NCHW": (plain, x, grad),
            "torch.compile, NCHW": (compiled, x, grad),
        }
        # fewest bytes: forward reads x twice (statistics, then normalisation) and writes y; backward reads x and dy
        # twice and writes dx (bf16), 8 passes over the tensor in all
        floor_bytes = 8 * x.numel() * x.element_size()
        for name, (function, inputs, output_grad) in implementations.items():
            leaf = inputs.detach().requires_grad_()

            def step(function=function, leaf=leaf, output_grad=output_grad) -> None:
                with torch.autocast(bench.device.type, dtype=torch.bfloat16):
                    output = function(leaf)
                output.backward(output_grad)

            ms, _ = bench.time_calls(step, 3, 20)
            if name.startswith("fused") and bench.device.type == "cuda":
                _, launched, _, _ = profile_steps(bench, step, 3)
                per_kernel: dict[str, float] = {}
                for event in launched:
                    per_kernel[event.name] = per_kernel.get(event.name, 0.0) + event.time_range.elapsed_us() / 3
                print("  kernel us per call: " + ", ".join(f"{k[:40]} {v:.0f}" for k, v in per_kernel.items()))
            bench.record(
                section="kernels",
                shape="x".join(map(str, shape)),
                implementation=name,
                fwd_bwd_ms=ms,
                bytes_floor_gb=floor_bytes / 1e9,
                effective_tb_per_s=floor_bytes / ms / 1e9,
                **(errors if name.startswith("fused") else {}),
            )


def _kernel_errors(norm: FusedGroupNorm, x: torch.Tensor, grad: torch.Tensor) -> dict[str, float]:
    """Relative L2 error of the fused kernel's y, dx, dweight, dbias against float64 autograd on the same inputs."""
    if not norm.uses_kernel(x):
        return {"error": "kernel path not taken (no CUDA or Triton)"}
    leaf = x.detach().requires_grad_()
    norm.zero_grad(set_to_none=True)
    y = norm(leaf)
    y.backward(grad)
    reference_input = x.detach().double().requires_grad_()
    weight = norm.weight.detach().double().requires_grad_()
    bias = norm.bias.detach().double().requires_grad_()
    reference = torch.nn.functional.silu(
        torch.nn.functional.group_norm(reference_input, norm.num_groups, weight, bias, norm.eps)
    )
    reference.backward(grad.double())

    def relative(value: torch.Tensor, target: torch.Tensor) -> float:
        return float((value.double() - target).norm() / target.norm())

    return {
        "rel_err_y": relative(y, reference.detach()),
        "rel_err_dx": relative(leaf.grad, reference_input.grad),
        "rel_err_dweight": relative(norm.weight.grad, weight.grad),
        "rel_err_dbias": relative(norm.bias.grad, bias.grad),
        "y_strides_kept": y.stride() == x.stride(),
        "all_finite": bool(torch.isfinite(y).all() and torch.isfinite(leaf.grad).all()),
    }


def count_flops(bench: Bench) -> None:
    """Training-step FLOPs (network forward + backward) per size at ``--batch``; sampling FLOPs per slice."""
    args = bench.args
    network = get_network(args.preset).to(bench.device)
    generator = torch.Generator(bench.device).manual_seed(0)
    for size in args.size:
        batch = synthetic_batch(args.batch, size, generator)
        x_t = torch.randn(args.batch, network.mask_channels, size, size, device=bench.device)
        t = torch.randint(0, 1000, (args.batch,), device=bench.device)
        counter = FlopCounterMode(display=False)
        with counter:
            seg_logits, grade_logits, calib_map = network(x_t, t, batch["image"])
            (seg_logits.mean() + grade_logits.mean() + calib_map.mean()).backward()
        bench.flops[f"train_step_{size}_batch{args.batch}"] = counter.get_total_flops()
    network.eval()
    roi = args.volume_roi
    image = torch.randn(1, 4, roi, roi, device=bench.device)
    with torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            condition = network.encode_condition(image)
        bench.flops[f"condition_per_slice_{roi}"] = counter.get_total_flops()
        counter = FlopCounterMode(display=False)
        with counter:
            network.denoise(torch.randn(1, network.mask_channels, roi, roi, device=bench.device), t[:1], condition)
        bench.flops[f"denoise_per_input_{roi}"] = counter.get_total_flops()
    parameters = sum(p.numel() for p in network.parameters())
    bench.record(section="flops", parameters_M=parameters / 1e6, **{k: v / 1e12 for k, v in bench.flops.items()})


def train_step_flops(bench: Bench, size: int, batch_size: int) -> float:
    """Counted FLOPs of one training step at ``size`` and ``batch_size``, scaled from a count at ``size`` and any batch
    (the step's FLOPs are linear in the batch); NaN without one."""
    prefix = f"train_step_{size}_batch"
    counted = {int(key[len(prefix) :]): flops for key, flops in bench.flops.items() if key.startswith(prefix)}
    if not counted:
        return math.nan
    batch, flops = min(counted.items(), key=lambda item: abs(item[0] - batch_size))
    return flops * batch_size / batch


def train_row(bench: Bench, size: int, batch_size: int, variant: str, warmup: int, steps: int) -> float:
    """Time one training variant; returns ms per step (inf on out-of-memory)."""
    flags = parse_variant(variant)
    set_cudnn_mode(cudnn_mode(flags))
    bench.reset_memory()
    batch = synthetic_batch(batch_size, size, torch.Generator().manual_seed(0))  # on the host, like a loader's
    if bench.device.type == "cuda" and "blocking" not in flags:
        batch = {key: value.pin_memory() for key, value in batch.items()}
    try:
        trainer = make_trainer(bench, batch, flags)
        ms, warmup_s = bench.time_calls(lambda: trainer._iteration(trainer, batch), warmup, steps)
    except Exception as error:  # out of memory, or a variant that fails: recorded, the run goes on
        trainer = None
        result = "out of memory" if isinstance(error, torch.cuda.OutOfMemoryError) else f"failed: {error!r}"[:300]
        bench.record(section="train", size=size, batch=batch_size, variant=variant, result=result)
        bench.reset_memory()
        return math.inf
    flops = train_step_flops(bench, size, batch_size)
    tflops = flops / ms / 1e9
    bench.record(
        section="train",
        size=size,
        batch=batch_size,
        variant=variant,
        ms_per_step=ms,
        slices_per_s=1000 * batch_size / ms,
        peak_gib=bench.peak_gib(),
        warmup_s=warmup_s,
        tflops_per_s=tflops,
        mfu=tflops / bench.args.peak_tflops,
        cudnn_benchmark_limit=torch.backends.cudnn.benchmark_limit,
        skipped=_resolved_skips(trainer),
    )
    if size == bench.args.size[0] and batch_size == bench.args.batch:
        if ms < bench.best_train[0]:
            bench.best_train = (ms, variant, trainer)
        if variant in bench.args.profile_variants:
            bench.profile_trainers[variant] = trainer
    set_cudnn_mode(cudnn_mode(set()))
    return ms


def _resolved_skips(trainer: DiffusionTrainer) -> int:
    trainer.resolve_skipped_steps()
    return trainer.state.skipped_steps


def largest_batch(bench: Bench, variant: str) -> None:
    """Fit peak memory = a + b * batch on two batches, try the predicted largest multiple of 8, step down on OOM."""
    args, size = bench.args, bench.args.size[0]

    def peaks() -> dict[int, float]:
        rows = [r for r in bench.rows if r.get("variant") == variant and r.get("size") == size and "peak_gib" in r]
        return {r["batch"]: r["peak_gib"] for r in rows}

    if args.batch not in peaks():
        train_row(bench, size, args.batch, variant, 2, 3)
    train_row(bench, size, 2 * args.batch, variant, 2, 3)
    peaks = peaks()
    if bench.device.type != "cuda" or len(peaks) < 2:
        return
    (b0, p0), (b1, p1) = sorted(peaks.items())[:2]
    per_slice = (p1 - p0) / (b1 - b0)
    total = torch.cuda.get_device_properties(bench.device).total_memory / 2**30
    batch = int((0.92 * total - (p0 - per_slice * b0)) / per_slice) // 8 * 8
    print(f"peak memory {p0 - per_slice * b0:.2f} + {per_slice:.3f} GiB x batch: predicted largest batch {batch}")
    for _ in range(3):
        if batch <= b1 or bench.time_left() < 60 or train_row(bench, size, batch, variant, 2, 5) < math.inf:
            return
        batch -= 8


def profile_train(bench: Bench) -> None:
    """Host syncs of one iteration and the GPU busy share / top kernels of three, for the fastest variant and those of
    ``--profile-variants``."""
    _, best, trainer = bench.best_train
    trainers = {best: trainer} if trainer is not None else {}
    trainers.update(bench.profile_trainers)
    for variant, trainer in trainers.items():
        if bench.time_left() > 20:
            profile_variant(bench, variant, trainer)
    bench.profile_trainers.clear()


def host_syncs(bench: Bench, step: Callable[[], object]) -> list[str]:
    """The first line of every host synchronisation warning that one call of ``step`` raises."""
    if bench.device.type == "cuda":
        torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step()
    if bench.device.type == "cuda":
        torch.cuda.set_sync_debug_mode("default")
    return [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]


def profile_variant(bench: Bench, variant: str, trainer: DiffusionTrainer) -> None:
    batch = trainer.data_loader[0]
    syncs = host_syncs(bench, lambda: trainer._iteration(trainer, batch))
    profiler, kernels, wall_us, busy_us = profile_steps(bench, lambda: trainer._iteration(trainer, batch), 3)
    table = profiler.key_averages().table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=90)
    with open(bench.out / "profile_train.txt", "a") as handle:
        handle.write(f"variant {variant}\nsyncs: {syncs}\n\n{table}\n\n{kernel_table(profiler, kernels, 3)}\n\n")
    matrix_us = sum(e.time_range.elapsed_us() for e in kernels if _is_kernel(e.name, MATRIX_KERNELS))
    layout_us = sum(e.time_range.elapsed_us() for e in kernels if _is_kernel(e.name, LAYOUT_KERNELS))
    kernel_us = sum(e.time_range.elapsed_us() for e in kernels)
    size, batch_size = bench.args.size[0], trainer.data_loader[0]["image"].shape[0]
    flops = train_step_flops(bench, size, batch_size)
    bench.record(
        section="profile",
        variant=variant,
        host_syncs_per_iteration=len(syncs),
        gpu_busy_share=busy_us / wall_us if kernels else math.nan,
        wall_ms_per_step=wall_us / 3000,
        kernels_per_iteration=len(kernels) / 3,
        kernel_ms_per_step=kernel_us / 3000,
        matrix_ms_per_step=matrix_us / 3000,
        layout_conversion_ms_per_step=layout_us / 3000,
        other_ms_per_step=(kernel_us - matrix_us - layout_us) / 3000,
        matrix_kernel_tflops_per_s=flops / (matrix_us / 3) / 1e6 if matrix_us else math.nan,
    )


def kernel_table(profiler: torch.profiler.profile, kernels: list, steps: int, limit: int = 25) -> str:
    """The ``limit`` longest GPU kernels other than matrix kernels, by full (untruncated) name: ms and launches per
    step, and the host operators that launched them (empty for kernels replayed from a CUDA graph)."""
    time_us, launches = defaultdict(float), Counter()
    for event in kernels:
        time_us[event.name] += event.time_range.elapsed_us()
        launches[event.name] += 1
    launchers = defaultdict(Counter)
    for event in profiler.events():
        for kernel in getattr(event, "kernels", ()):
            launchers[kernel.name][event.name] += 1
    lines = ["kernels other than matrix kernels, longest first: ms/step, launches/step, name <- launching operators"]
    others = sorted((name for name in time_us if not _is_kernel(name, MATRIX_KERNELS)), key=lambda n: -time_us[n])
    for name in others[:limit]:
        by = ", ".join(f"{op} x{count / steps:g}" for op, count in launchers[name].most_common(3))
        lines.append(
            f"{time_us[name] / steps / 1000:8.3f} {launches[name] / steps:7.1f}  {name}" + (f"  <- {by}" if by else "")
        )
    return "\n".join(lines)


def _is_kernel(name: str, fragments: tuple[str, ...]) -> bool:
    lowered = name.lower()
    return any(fragment.lower() in lowered for fragment in fragments)


def profile_steps(
    bench: Bench, step: Callable[[], object], count: int
) -> tuple[torch.profiler.profile, list, float, float]:
    """Run ``step`` ``count`` times under ``torch.profiler``: (profiler, GPU kernel events, wall us, GPU busy us)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if bench.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    bench.sync()
    with torch.profiler.profile(activities=activities) as profiler:
        begin = time.perf_counter()
        for _ in range(count):
            step()
        bench.sync()
        wall_us = 1e6 * (time.perf_counter() - begin)
    kernels = [e for e in profiler.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = _union_length([(e.time_range.start, e.time_range.end) for e in kernels])
    return profiler, kernels, wall_us, busy_us


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def training_loader(bench: Bench, folder: Path, num_workers: int) -> DataLoader:
    """The bundle's training data path over the synthetic release in ``folder``, ``--batch`` slices per batch."""
    args = bench.args
    slices = args.loader_slices_per_volume
    if not (folder / "datalist.json").exists():
        write_synthetic_brats(folder, args.loader_subjects, lgg_fraction=0.5, seed=0, progress=False)
        subjects = read_brats_folder(folder, progress=False)
        write_datalist(build_datalist(subjects, folder, val_fraction=0.0), folder / "datalist.json")
    if not hasattr(bench, "slice_dataset"):
        entries = load_brats_datalist(folder / "datalist.json", "training", folder)
        chain = get_train_transforms(roi_size=(args.size[0], args.size[0]), num_slices_per_volume=slices)
        bench.slice_dataset = make_slice_dataset(entries, chain, num_workers=8, copy_cache=False)
    # volumes drawn with replacement, so that an epoch is as long as a real release's (~150 batches) and every
    # worker stays busy: with 8 volumes an epoch has 4 batches, and at most 4 workers ever work at once
    batch_volumes = max(1, args.batch // slices)
    sampler = RandomSampler(bench.slice_dataset, replacement=True, num_samples=150 * batch_volumes)
    return DataLoader(
        bench.slice_dataset,
        batch_size=batch_volumes,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=bench.device.type == "cuda",
        persistent_workers=num_workers > 0,
        drop_last=True,
    )


def loader(bench: Bench) -> None:
    """Slices/s of the training loader alone per worker count, then the fastest training step fed by it."""
    args = bench.args
    _, variant, trainer = bench.best_train
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "brats"
        begin = time.perf_counter()
        training_loader(bench, folder, 0)
        print(f"loader: synthetic release + cache of {args.loader_subjects} volumes in "
              f"{time.perf_counter() - begin:.0f} s", flush=True)  # fmt: skip
        for workers in args.loader_workers:
            if bench.time_left() < 30:
                return
            batches = iter(_endless(training_loader(bench, folder, workers)))
            next(batches)
            count, begin = 0, time.perf_counter()
            while time.perf_counter() - begin < args.loader_seconds:
                count += next(batches)["image"].shape[0]
            bench.record(
                section="loader",
                size=args.size[0],
                workers=workers,
                slices_per_s=count / (time.perf_counter() - begin),
                how="loader alone",
            )
        if trainer is None or bench.time_left() < 60:
            return
        workers = args.loader_workers[0]
        batches = iter(_endless(training_loader(bench, folder, workers)))
        for _ in range(3):
            trainer._iteration(trainer, next(batches))
        # a pageable (unpinned) batch makes the "non-blocking" copy wait for the queued GPU work, draining the queue
        first = next(batches)
        pinned = all(value.is_pinned() for value in first.values() if isinstance(value, torch.Tensor))
        fed_syncs = host_syncs(bench, lambda: trainer._iteration(trainer, first))
        bench.sync()
        steps, wait_s, begin = 0, 0.0, time.perf_counter()
        while time.perf_counter() - begin < args.loader_seconds:
            asked = time.perf_counter()
            batch = next(batches)
            wait_s += time.perf_counter() - asked
            trainer._iteration(trainer, batch)
            steps += 1
        bench.sync()
        step_s = (time.perf_counter() - begin) / steps
        _, _, wall_us, busy_us = profile_steps(bench, lambda: trainer._iteration(trainer, next(batches)), 10)
        bench.record(
            section="loader",
            size=args.size[0],
            workers=workers,
            variant=variant,
            ms_per_step=1000 * step_s,
            slices_per_s=args.batch / step_s,
            gpu_busy_share=busy_us / wall_us,
            loader_wait_share=wait_s / (step_s * steps),
            how="training step fed by the loader",
            skipped=_resolved_skips(trainer),
            batch_pinned=pinned,
            host_syncs_per_iteration=len(fed_syncs),
        )


def _endless(data_loader: DataLoader):
    while True:
        yield from data_loader


def numerics(bench: Bench) -> None:
    """Training steps of the fastest variant's trainer (already warm; lr raised to 1e-3) on a fresh synthetic batch
    each step, until ``--numerics-steps`` or the deadline."""
    _, variant, trainer = bench.best_train
    if trainer is None:
        return
    args = bench.args
    for group in trainer.optimizer.param_groups:
        group["lr"] = 1e-3
    generator = torch.Generator(bench.device).manual_seed(1)
    losses, grad_norm_max = [], 0.0
    trainer.resolve_skipped_steps()
    skipped_before = trainer.state.skipped_steps
    begin = time.perf_counter()
    for step in range(args.numerics_steps):
        if bench.time_left() < 15:
            break
        output = trainer._iteration(trainer, synthetic_batch(args.batch, args.size[0], generator))
        losses.append(output["loss"])
        grad_norm_max = max(grad_norm_max, float(output["grad_norm"])) if step % 50 == 0 else grad_norm_max
    if not losses:
        print("numerics: no time left before the deadline, no step run", flush=True)
        return
    trainer.resolve_skipped_steps()
    skipped = trainer.state.skipped_steps - skipped_before
    values = torch.stack(losses).float().cpu()
    window = min(50, len(values))
    bench.record(
        section="numerics",
        variant=variant,
        steps=len(values),
        seconds=time.perf_counter() - begin,
        skipped_steps=skipped,
        nonfinite_losses=int((~torch.isfinite(values)).sum()),
        loss_first=float(values[:window].mean()),
        loss_last=float(values[-window:].mean()),
        grad_norm_max_sampled=grad_norm_max,
    )


def sampling(bench: Bench) -> None:
    """Condition pass and reverse step times per variant at the volume roi."""
    for variant in bench.args.sampling_variants:
        if "compile" in variant and bench.time_left() < 120:
            continue
        bench.reset_memory()
        sampling_row(bench, variant)


def sampling_row(bench: Bench, variant: str) -> None:
    """Time the condition pass on B slices and one reverse step on B x K inputs."""
    args, flags = bench.args, parse_variant(variant)
    roi, slices, members = args.volume_roi, args.sampling_slices, args.ensemble
    inputs = slices * members
    network, image = _sampling_network(bench, flags, slices, roi)
    sampler = DiffusionSampler(ensemble_size=members, compile="compile" in flags)
    denoise = sampler._denoise_function(network)
    use_bf16 = "bf16" in flags and bench.device.type == "cuda"
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
        encode_ms, _ = bench.time_calls(lambda: network.encode_condition(image), 2, args.steps)
        condition = repeat_condition(network.encode_condition(image), members)
        x_t = torch.randn(inputs, network.mask_channels, roi, roi, device=bench.device)
        t = torch.full((inputs,), 500, device=bench.device, dtype=torch.long)

        def reverse_step() -> None:
            x0 = torch.tanh(denoise(x_t, t, condition).float() / 2)
            sampler.scheduler.step(x0, 500, x_t)

        step_ms, warmup_s = bench.time_calls(reverse_step, 3, args.steps)
    flops = bench.flops.get(f"denoise_per_input_{roi}", math.nan) * inputs
    bench.record(
        section="sampling",
        size=roi,
        variant=variant,
        slices=slices,
        ensemble=members,
        condition_ms=encode_ms,
        step_ms=step_ms,
        ms_per_input_step=step_ms / inputs,
        peak_gib=bench.peak_gib(),
        warmup_s=warmup_s,
        mfu=flops / step_ms / 1e9 / args.peak_tflops,
    )


def _sampling_network(bench: Bench, flags: set[str], slices: int, roi: int) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    network = get_network(bench.args.preset, fused_norm="nofuse" not in flags).to(bench.device).eval()
    image = torch.randn(slices, 4, roi, roi, device=bench.device)
    if "cl" in flags:
        network = network.to(memory_format=torch.channels_last)
        image = image.to(memory_format=torch.channels_last)
    return network, image


def synthetic_volume(shape: tuple[int, int, int], roi: int) -> tuple[torch.Tensor, float]:
    """A synthetic HGG subject through the inference transforms: ((4, roi, roi, D) image, seconds of the chain)."""
    subject = make_synthetic_subject(grade=1, shape=shape, seed=0)
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for modality, volume in zip(MODALITIES, subject.images, strict=True):
            path = Path(folder) / f"BraTS20_Training_999_{modality}.nii"
            nib.save(nib.Nifti1Image(volume, subject.affine), str(path))
            paths.append(str(path))
        begin = time.perf_counter()
        image = get_inference_transforms((roi, roi))({"image": paths})["image"].as_tensor()
        return image, time.perf_counter() - begin


def parse_sampler(sampler: str) -> tuple[str, int, float]:
    """``"dpmpp_2m:6"`` -> ``("dpmpp_2m", 6, 0.0)``; ``"dpmpp_2m:20:1"`` -> ``("dpmpp_2m", 20, 1.0)`` (the ``eta``)."""
    fields = sampler.split(":")
    if len(fields) not in (2, 3):
        raise ValueError(f"sampler {sampler!r}: expected scheduler:steps or scheduler:steps:eta, e.g. dpmpp_2m:20:1.")
    return fields[0], int(fields[1]), float(fields[2]) if len(fields) == 3 else 0.0


def volume_seconds(
    bench: Bench,
    network: torch.nn.Module,
    image: torch.Tensor,
    flags: set[str],
    slice_batch: int,
    name: str,
    steps: int,
    eta: float = 0.0,
    shared_steps: int = 0,
) -> float:
    """Seconds of one :func:`sample_volume` call (grade included) with the sampler ``name`` at ``steps`` steps, the
    first ``shared_steps`` of them shared by the ensemble members."""
    sampler = DiffusionSampler(
        num_inference_steps=steps,
        scheduler=name,
        eta=eta,
        ensemble_size=bench.args.ensemble,
        amp_dtype="bfloat16" if "bf16" in flags else None,
        compile="compile" in flags,
        shared_steps=shared_steps,
    )
    bench.sync()
    begin = time.perf_counter()
    output = sample_volume(network, image, sampler, slice_batch_size=slice_batch)
    bench.sync()
    assert output.p_hgg is not None and torch.isfinite(output.probs).all()
    return time.perf_counter() - begin


def volume(bench: Bench) -> None:
    """Whole-volume sampling + grade per variant, slice batch and sampler (``--volume-samplers``), end to end.

    Per variant and slice batch: one network, a 1-step warm-up run (compilation included: ``warmup_s``), then each
    sampler once, timed. With two DDIM rows of a variant, 1000-step DDPM is extrapolated (``T(N) = a + N b``).
    """
    args = bench.args
    image, transform_s = synthetic_volume(tuple(args.volume_shape), args.volume_roi)
    image = image.to(bench.device)
    brain_slices = int(brain_slice_mask(image).sum())
    for variant in args.volume_variants:
        flags = parse_variant(variant)
        for slice_batch in args.volume_slice_batches:
            if bench.time_left() < (60 if "compile" in flags else 30):  # compiling the base preset: ~30 s
                return
            bench.reset_memory()
            network, _ = _sampling_network(bench, flags, 1, args.volume_roi)

            run = functools.partial(volume_seconds, bench, network, image, flags, slice_batch)
            warmup_s = run("ddim", 1)
            if any(args.volume_shared_steps):  # the shared passes' batch shape (slices alone) compiles apart
                warmup_s += run("ddim", 2, shared_steps=1)
            one_step_s = run("ddim", 1)  # without the start-up costs: bounds the seconds per step from above
            measured: dict[tuple[str, int, float, int], float] = {}
            runs = [(*sampler, shared) for sampler in args.volume_samplers for shared in args.volume_shared_steps]
            for name, steps, eta, shared_steps in runs:
                if shared_steps >= steps:
                    continue
                if bench.time_left() < 10 + one_step_s * steps:
                    break
                measured[name, steps, eta, shared_steps] = run(name, steps, eta, shared_steps)
                bench.record(
                    section="volume",
                    size=args.volume_roi,
                    variant=variant,
                    scheduler=name,
                    steps=steps,
                    eta=eta,
                    shared_steps=shared_steps,
                    seconds=measured[name, steps, eta, shared_steps],
                    how="measured end to end (sample_volume, grade included)",
                    depth=image.shape[-1],
                    brain_slices=brain_slices,
                    ensemble=args.ensemble,
                    slice_batch=slice_batch,
                    transform_s=transform_s,
                    warmup_s=warmup_s,
                    peak_gib=bench.peak_gib(),
                )
            ddim = sorted(
                (n, seconds)
                for (scheduler, n, stochasticity, shared_steps), seconds in measured.items()
                if scheduler == "ddim" and not stochasticity and not shared_steps
            )
            if len(ddim) >= 2:
                (n0, t0), (n1, t1) = ddim[:2]
                bench.record(
                    section="volume",
                    size=args.volume_roi,
                    variant=variant,
                    scheduler="ddpm",
                    steps=1000,
                    seconds=t0 + (1000 - n0) * (t1 - t0) / (n1 - n0),
                    how=f"extrapolated T = a + N b from the measured DDIM {n0}- and {n1}-step runs",
                    depth=image.shape[-1],
                    brain_slices=brain_slices,
                    ensemble=args.ensemble,
                    slice_batch=slice_batch,
                )
            del network, run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sections = ["flops", "kernels", "train", "profile", "numerics", "loader", "sampling", "volume"]
    parser.add_argument("--sections", nargs="+", default=sections, choices=sections)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="base")
    parser.add_argument("--size", type=int, nargs="+", default=[256, 192], help="training sizes (first: all variants)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="timed calls per row")
    parser.add_argument(
        "--kernel-shapes",
        nargs="+",
        default=["8x128x256", "8x256x128", "8x512x32"],
        help="BxCxS GroupNorm inputs of the kernels section (the base preset's at 256 x 256, batch 8)",
    )
    parser.add_argument("--train-variants", nargs="+", default=["fp32", "bf16", "bf16+compile", "bf16+graphs"])
    parser.add_argument("--other-size-variants", nargs="*", default=["bf16+graphs"])
    parser.add_argument("--extra-variants", nargs="*", default=[], help="further variants at the first size")
    parser.add_argument(
        "--extra-batches", type=int, nargs="*", default=[], help="further batch sizes of the first variant, first size"
    )
    parser.add_argument(
        "--fallback-variants", nargs="*", default=[], help="tried in turn until one runs, if a variant failed"
    )
    parser.add_argument("--profile-variants", nargs="*", default=[], help="profiled besides the fastest")
    parser.add_argument("--max-batch-variant", default="bf16", help="'' skips the largest-batch search")
    parser.add_argument("--loader-subjects", type=int, default=8, help="synthetic 240 x 240 x 155 volumes")
    parser.add_argument("--loader-slices-per-volume", type=int, default=4)
    parser.add_argument("--loader-workers", type=int, nargs="+", default=[8, 4, 12], help="first: feeds the step")
    parser.add_argument("--loader-seconds", type=float, default=15.0, help="seconds per loader measurement")
    parser.add_argument("--numerics-steps", type=int, default=2000)
    parser.add_argument("--sampling-variants", nargs="+", default=["fp32", "bf16", "bf16+cl", "bf16+cl+compile"])
    parser.add_argument("--sampling-slices", type=int, default=32, help="slices per sampler call (B)")
    parser.add_argument("--ensemble", type=int, default=5)
    parser.add_argument("--volume-shape", type=int, nargs=3, default=[240, 240, 155])
    parser.add_argument("--volume-roi", type=int, default=192)
    parser.add_argument(
        "--volume-samplers",
        nargs="+",
        default=["ddim:10", "ddim:25", "dpmpp_2m:5", "dpmpp_2m:8", "dpmpp_2m:10"],
        help="scheduler:steps[:eta] of the whole-volume runs (eta: 1 for the SDE steps, default 0)",
    )
    parser.add_argument("--volume-variants", nargs="+", default=["bf16+cl", "bf16+cl+compile"])
    parser.add_argument("--volume-slice-batches", type=int, nargs="+", default=[32], help="slices per sampler call")
    parser.add_argument(
        "--volume-shared-steps",
        type=int,
        nargs="+",
        default=[0],
        help="first steps whose network pass the ensemble members share (DiffusionSampler's shared_steps)",
    )
    parser.add_argument("--flops-from", help="results.json of an earlier run whose FLOP counts to reuse")
    parser.add_argument(
        "--cudnn-benchmark-limit",
        type=int,
        default=None,
        help="cuDNN algorithms timed per convolution shape when benchmarking (torch's default 10; 0: every one)",
    )
    parser.add_argument("--peak-tflops", type=float, default=989.4, help="H100 SXM dense bf16 peak")
    parser.add_argument("--deadline", type=float, default=540.0, help="seconds after which no new work starts")
    parser.add_argument("--out", default="gpu_results")
    args = parser.parse_args(argv)
    check_graph_cudnn_modes(parser, args)
    try:
        args.volume_samplers = [parse_sampler(sampler) for sampler in args.volume_samplers]
    except ValueError as error:
        parser.error(f"--volume-samplers: {error}")
    return args


def check_graph_cudnn_modes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse CUDA-graph train variants of more than one cuDNN mode in one run: once one mode's step is captured, the
    process can fail to capture the same step in another (run each mode in its own process)."""
    variants = [
        *args.train_variants, *args.other_size_variants, *args.extra_variants, *args.fallback_variants,
        *args.profile_variants, *([args.max_batch_variant] if args.max_batch_variant else []),
    ]  # fmt: skip
    modes = defaultdict(set)
    for variant in variants:
        try:
            flags = parse_variant(variant)
            mode = cudnn_mode(flags)
        except ValueError as error:
            parser.error(str(error))
        if "graphs" in flags:
            modes[mode].add(variant)
    if len(modes) > 1:
        named = "; ".join(", ".join(sorted(group)) for group in modes.values())
        parser.error(f"CUDA-graph variants of different cuDNN modes ({named}) must run in separate processes.")


def main(argv: list[str] | None = None) -> None:
    bench = Bench(parse_args(argv))
    args = bench.args
    set_cudnn_mode(cudnn_mode(set()))
    if args.cudnn_benchmark_limit is not None:
        torch.backends.cudnn.benchmark_limit = args.cudnn_benchmark_limit
    print(f"torch {torch.__version__}, {bench.card}, preset {args.preset}, sections {args.sections}", flush=True)
    if args.flops_from:
        bench.flops.update(json.loads(Path(args.flops_from).read_text())["flops"])
    elif "flops" in args.sections:
        count_flops(bench)
    if "kernels" in args.sections:
        kernels(bench)
    if "train" in args.sections:
        failed = False
        for variant in args.train_variants + args.extra_variants:
            if bench.time_left() > (150 if "compile" in variant else 30):
                failed |= train_row(bench, args.size[0], args.batch, variant, args.warmup, args.steps) == math.inf
        for variant in args.fallback_variants:
            if failed and bench.time_left() > 150:
                failed = train_row(bench, args.size[0], args.batch, variant, args.warmup, args.steps) == math.inf
        for size in args.size[1:]:
            for variant in args.other_size_variants:
                if bench.time_left() > (150 if "compile" in variant else 30):
                    train_row(bench, size, args.batch, variant, args.warmup, args.steps)
        variant = args.train_variants[0]
        for batch_size in args.extra_batches:
            if bench.time_left() > (150 if "compile" in variant else 30):
                train_row(bench, args.size[0], batch_size, variant, args.warmup, args.steps)
    if "profile" in args.sections:
        profile_train(bench)
    if "numerics" in args.sections:
        numerics(bench)
    if "loader" in args.sections:
        loader(bench)
    if "train" in args.sections and args.max_batch_variant and bench.time_left() > 90:
        largest_batch(bench, args.max_batch_variant)
    bench.best_train = (math.inf, "", None)
    if "sampling" in args.sections:
        sampling(bench)
    if "volume" in args.sections and bench.time_left() > 30:
        volume(bench)
    print_tables(bench.rows)
    print(f"\ndone in {time.perf_counter() - bench.start:.0f} s; results in {bench.out}", flush=True)


if __name__ == "__main__":
    main()
