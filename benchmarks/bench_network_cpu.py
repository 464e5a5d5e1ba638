"""CPU figures of the network: parameter counts of the presets and forward+backward times.

Run: ``.venv/bin/python benchmarks/bench_network_cpu.py [--repeats 3] [--skip-base]``.
Prints one table; times are the median of ``--repeats`` timed forward+backward passes after one warm-up pass
(``t`` random, loss = mean of the three outputs), on the threads PyTorch uses by default: wall-clock seconds and the
process's CPU seconds (all threads), with the machine's 1-minute load average before and after, since wall time on
a shared machine grows with the other processes' load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from medsegdiff_monai.networks import DiffusionUNetWithGradeHead, get_network


def parameter_counts(network: DiffusionUNetWithGradeHead) -> dict[str, int]:
    """Total, condition UNet, grade head and diffusion UNet (everything else) parameter counts."""
    total = sum(p.numel() for p in network.parameters())
    condition = sum(p.numel() for n, p in network.named_parameters() if n.startswith("condition_unet."))
    head = sum(p.numel() for n, p in network.named_parameters() if n.startswith("grade_head."))
    return {"total": total, "condition UNet": condition, "diffusion UNet": total - condition - head, "head": head}


def time_forward_backward(
    network: DiffusionUNetWithGradeHead, batch: int, size: int, repeats: int
) -> tuple[float, float]:
    """Median (wall, process CPU) seconds of one forward+backward pass at (batch, size x size)."""
    x_t = torch.randn(batch, network.mask_channels, size, size)
    image = torch.randn(batch, network.in_channels, size, size)
    t = torch.randint(0, 1000, (batch,))
    wall_times, cpu_times = [], []
    for step in range(repeats + 1):
        network.zero_grad(set_to_none=True)
        start, cpu_start = time.perf_counter(), time.process_time()
        seg_logits, grade_logits, calib_map = network(x_t, t, image)
        (seg_logits.mean() + grade_logits.mean() + calib_map.mean()).backward()
        if step > 0:
            wall_times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    return statistics.median(wall_times), statistics.median(cpu_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per row (median reported)")
    parser.add_argument("--skip-base", action="store_true", help="skip the base preset's 256x256 pass")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, load average {os.getloadavg()[0]:.1f}")
    print(f"{'preset':<8}{'total':>14}{'condition UNet':>16}{'diffusion UNet':>16}{'head':>10}")
    networks = {preset: get_network(preset) for preset in ("small", "base")}
    for preset, network in networks.items():
        counts = parameter_counts(network)
        print(f"{preset:<8}" + "".join(f"{counts[k]:>{w},}" for k, w in zip(counts, (14, 16, 16, 10))))
    print(f"\n{'preset':<8}{'batch':>6}{'size':>10}{'fwd+bwd s':>12}{'CPU s':>10}{'slices/s':>10}")
    rows = [("small", 4, 64, args.repeats), ("small", 4, 96, args.repeats), ("small", 4, 192, args.repeats)]
    if not args.skip_base:
        rows.append(("base", 1, 256, 1))
    for preset, batch, size, repeats in rows:
        seconds, cpu_seconds = time_forward_backward(networks[preset], batch, size, repeats)
        print(
            f"{preset:<8}{batch:>6}{f'{size}x{size}':>10}{seconds:>12.3f}{cpu_seconds:>10.3f}{batch / seconds:>10.2f}"
        )
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
