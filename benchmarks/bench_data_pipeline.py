"""Throughput of the training data pipeline: synthetic volumes -> cached volumes -> 2D training slices per second.

Writes a synthetic BraTS release to a temporary folder, times the generator, the folder validation, the cache fill
(decode + deterministic volume steps, once per run) and then the slices per second delivered by a
``monai.data.DataLoader`` over a few epochs, for several worker counts and with/without ``copy_cache``.

    python benchmarks/bench_data_pipeline.py                      # full 240 x 240 x 155 volumes
    python benchmarks/bench_data_pipeline.py --shape 96 96 64 --roi 96 96
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from monai.data import DataLoader
from monai.utils import set_determinism

from medsegdiff_monai.data import (
    build_datalist,
    load_brats_datalist,
    make_slice_dataset,
    read_brats_folder,
    write_datalist,
    write_synthetic_brats,
)
from medsegdiff_monai.transforms import get_train_transforms


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155], help="volume shape")
    parser.add_argument("--subjects", type=int, default=4, help="training volumes")
    parser.add_argument("--roi", type=int, nargs=2, default=[192, 192], help="in-plane slice size")
    parser.add_argument("--slices-per-volume", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts to try")
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="main-process torch threads to try")
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--pad-in-cache", action="store_true", help="pad / crop to the roi before caching")
    return parser.parse_args()


def slices_per_second(dataset, batch_size: int, num_workers: int, epochs: int) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers)
    count = 0
    start = time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            count += batch["image"].shape[0]
    return count / (time.perf_counter() - start)


def main() -> None:
    args = parse_args()
    set_determinism(0)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "brats"
        start = time.perf_counter()
        write_synthetic_brats(data_dir, args.subjects, lgg_fraction=0.5, shape=args.shape, seed=0, progress=False)
        synth_s = (time.perf_counter() - start) / args.subjects

        start = time.perf_counter()
        subjects = read_brats_folder(data_dir, progress=False)
        validate_s = (time.perf_counter() - start) / args.subjects
        datalist_path = write_datalist(build_datalist(subjects, data_dir, val_fraction=0.0), data_dir / "datalist.json")
        entries = load_brats_datalist(datalist_path, "training", data_dir)

        chain = get_train_transforms(
            roi_size=args.roi,
            num_slices_per_volume=args.slices_per_volume,
            augment=not args.no_augment,
            pad_in_cache=args.pad_in_cache,
        )
        start = time.perf_counter()
        dataset = make_slice_dataset(entries, chain)
        cache_s = (time.perf_counter() - start) / len(entries)
        cached_mb = sum(v.numel() * v.element_size() for c in dataset._cache for v in c.values() if hasattr(v, "numel"))
        cached_mb /= len(entries) * 2**20

        print(f"shape {tuple(args.shape)}, {args.subjects} volumes, roi {tuple(args.roi)}, "
              f"{args.slices_per_volume} slices/volume, batch {args.batch_size}, augment {not args.no_augment}, "
              f"pad_in_cache {args.pad_in_cache}, "
              f"{os.cpu_count()} CPU cores")  # fmt: skip
        print()
        print("| step | figure |")
        print("|---|---|")
        print(f"| synthetic generator (write) | {synth_s:.2f} s/subject |")
        print(f"| folder validation (headers + voxels) | {validate_s:.2f} s/subject |")
        print(f"| cache fill (decode + volume transforms) | {cache_s:.2f} s/volume |")
        print(f"| cached data per volume (image, label, slice centres) | {cached_mb:.1f} MB |")
        for copy_cache in (True, False):
            dataset.copy_cache = copy_cache
            for workers in args.workers:
                # DataLoader workers run with one torch thread each; the main process uses torch's setting
                for threads in args.threads if workers == 0 else [1]:
                    torch.set_num_threads(threads)
                    rate = slices_per_second(dataset, args.batch_size, workers, args.epochs)
                    print(
                        f"| training slices, num_workers={workers}, torch threads={threads}, copy_cache={copy_cache} "
                        f"| {rate:.0f} slices/s |"
                    )


if __name__ == "__main__":
    main()
