"""Evaluation metrics on one synthetic subject: agreement of the BraTS HD95 with medpy, and seconds per subject.

A synthetic HGG subject's regions (TC, WT, ET) are the reference; the prediction shifts WT by 2 voxels and adds a
stray 100-voxel WT component far from the tumour. Prints, per region, the HD95 in the BraTS convention (this
library), medpy's ``hd95`` (needs ``pip install medpy``) and MONAI's one-way-maximum variant, the lesion-wise Dice
and HD95, and the seconds each part takes.

    python benchmarks/bench_metrics.py                    # 240 x 240 x 155, 1 mm
    python benchmarks/bench_metrics.py --shape 96 96 64 --spacing 1 1 2.5
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses

from medsegdiff_monai.data import make_synthetic_subject
from medsegdiff_monai.metrics import BRATS_REGIONS, hd95, lesion_wise_metrics, segmentation_metrics


def _timed(function, *args, **kwargs):
    start = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155])
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 1.0])
    args = parser.parse_args()
    subject = make_synthetic_subject(1, shape=tuple(args.shape), seed=0)
    truth = np.asarray(ConvertToMultiChannelBasedOnBratsClasses()(subject.label[None]), dtype=np.uint8)
    pred = truth.copy()
    pred[1] = np.roll(truth[1], 2, axis=0)
    x, y, z = (int(0.85 * n) for n in args.shape)
    pred[1, x - 5 : x, y - 5 : y, 2:6] = 1
    try:
        from medpy.metric.binary import hd95 as medpy_hd95
    except ImportError:
        medpy_hd95 = None
    print(f"shape {tuple(args.shape)}, spacing {tuple(args.spacing)}")
    print(f"{'region':>6} {'brats':>9} {'medpy':>9} {'monai':>9} {'s brats':>8} {'s medpy':>8}")
    for channel, region in enumerate(BRATS_REGIONS):
        ours, t_ours = _timed(hd95, pred[channel], truth[channel], args.spacing)
        monai = hd95(pred[channel], truth[channel], args.spacing, convention="monai")
        if medpy_hd95 is not None:
            reference, t_reference = _timed(medpy_hd95, pred[channel], truth[channel], voxelspacing=args.spacing)
        else:
            reference, t_reference = float("nan"), float("nan")
        print(f"{region:>6} {ours:9.3f} {reference:9.3f} {monai:9.3f} {t_ours:8.2f} {t_reference:8.2f}")
    _, t_all = _timed(segmentation_metrics, pred, truth, include_hd95=True, spacing=args.spacing)
    lesions, t_lesions = _timed(lesion_wise_metrics, pred, truth, spacing=args.spacing)
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in lesions.items()))
    print(f"seconds per subject: segmentation_metrics with HD95 {t_all:.2f}, lesion_wise_metrics {t_lesions:.2f}")


if __name__ == "__main__":
    main()
