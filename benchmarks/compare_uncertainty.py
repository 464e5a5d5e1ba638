"""Uncertainty maps of several sampler runs on the same subjects, against the first run.

Each run is an evaluation output folder (``<subject>_seg.nii.gz`` and ``<subject>_uncertainty.nii.gz``, as
``bench_sampler_agreement.py`` writes one per sampler); the truth is the label file of ``<dataset>/<subject>``,
found as the data readers find it (``locate_subject_files``). Per run it prints the uncertainty's voxel
error-detection AUROC in the tumour neighbourhood (predicted and true tumour dilated by 3 voxels, voxels of all
subjects pooled: ``voxel_error_auroc``), the mean over subjects of ``mean_uncertainty`` (predicted tumour dilated by
3 voxels), and that mean's ratio to the first run's, per subject: their mean and lowest value. E.g. the shared
first passes against 12 unshared SDE steps:

    python benchmarks/compare_uncertainty.py /tmp/sde12/dpmpp_2m_12_1_0 /tmp/s4/dpmpp_2m_12_1_0_shared4 \\
        --dataset data/agreement_brats
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np

from medsegdiff_monai.data import locate_subject_files
from medsegdiff_monai.metrics.uncertainty import (
    mean_uncertainty,
    tumour_neighbourhood,
    voxel_error_auroc,
    wrong_voxels,
)

SEG_SUFFIX = "_seg.nii.gz"


def _volume(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _truth(dataset: Path, subject: str) -> np.ndarray:
    """The subject's label map, found as the data readers find it (either BraTS naming)."""
    found = locate_subject_files(dataset / subject)
    if found.subject is None:
        raise FileNotFoundError("; ".join(found.problems))
    return _volume(found.subject.label)


def run_summary(run: Path, dataset: Path) -> tuple[float, dict[str, float]]:
    """(pooled tumour-neighbourhood AUROC, {subject: mean_uncertainty}) of one run folder."""
    segs = sorted(run.glob(f"*{SEG_SUFFIX}"))
    if not segs:
        raise FileNotFoundError(f"{run} holds no *{SEG_SUFFIX}: pass an evaluation output folder.")
    scores, wrong, means = [], [], {}
    for seg in segs:
        subject = seg.name[: -len(SEG_SUFFIX)]
        prediction, truth = _volume(seg), _truth(dataset, subject)
        uncertainty = _volume(run / f"{subject}_uncertainty.nii.gz")
        neighbourhood = tumour_neighbourhood([prediction, truth])
        scores.append(uncertainty[neighbourhood])
        wrong.append(wrong_voxels(prediction, truth)[neighbourhood])
        means[subject] = mean_uncertainty(uncertainty, prediction)
    return voxel_error_auroc(np.concatenate(scores), np.concatenate(wrong)), means


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="evaluation output folders; the first is the baseline")
    parser.add_argument("--dataset", type=Path, required=True, help="the subjects' folder (label maps)")
    args = parser.parse_args(argv)
    summaries = [run_summary(run, args.dataset) for run in args.runs]
    baseline = summaries[0][1]
    rows = []
    print("| run | AUROC near the tumour | mean uncertainty | ratio to the first: mean | lowest |")
    print("|---|---|---|---|---|")
    for run, (auroc, means) in zip(args.runs, summaries, strict=True):
        ratios = [means[s] / baseline[s] for s in baseline if s in means and baseline[s] > 0]
        row = {
            "run": str(run),
            "auroc": auroc,
            "mean_uncertainty": float(np.nanmean(list(means.values()))),
            "ratio_mean": float(np.nanmean(ratios)),
            "ratio_lowest": float(np.nanmin(ratios)),
        }
        rows.append(row)
        print(
            f"| {run} | {auroc:.4f} | {row['mean_uncertainty']:.4f} | {row['ratio_mean']:.3f} | "
            f"{row['ratio_lowest']:.3f} |"
        )
    return rows


if __name__ == "__main__":
    main()
