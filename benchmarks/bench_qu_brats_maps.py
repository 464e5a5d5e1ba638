"""QU-BraTS scores of several ways to make the per-region uncertainty maps, on the same samples, against a map of 0.

Samples every subject of a labelled BraTS folder once through ``evaluate.json`` (over ``train.json``) with the
overrides, keeps each region's ensemble-mean probability and std on the input grid and the written segmentation,
then scores each map kind with ``qu_brats_scores`` (brain: the T1's non-zero voxels). Per kind and region it prints
the mean score over subjects and its difference to a map of 0 everywhere (which scores ``(Dice + 2) / 3``), paired by
subject, with a 95 % percentile-bootstrap interval, and writes the same as JSON.

Kinds: ``ensemble_std`` and ``near_miss`` (the package's :data:`~medsegdiff_monai.metrics.QU_BRATS_MAP_KINDS`), and
for comparison ``ensemble_std_inside<w>`` (the std scaled by ``w`` inside the predicted region) and ``margin`` (the
near-miss margin ``1 - |2p - 1|`` on both sides of the border). Choose a kind on subjects that the test subjects do
not include, e.g. ``medsegdiff-monai synth --seed 2`` against the held-out ``--seed 1`` set of ``docs/quality.md``:

    python benchmarks/bench_qu_brats_maps.py --data data/qu_validation --out qu_maps_validation.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.bundle import ConfigParser

from medsegdiff_monai.data import locate_subject_files
from medsegdiff_monai.metrics import bootstrap_interval, qu_brats_map, qu_brats_near_miss_map, qu_brats_scores
from medsegdiff_monai.metrics.evaluation import label_map_regions
from medsegdiff_monai.metrics.segmentation import BRATS_REGIONS

ROOT = Path(__file__).resolve().parents[1]
MapKind = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def map_kinds(inside_weights: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)) -> dict[str, MapKind]:
    """Each kind's map of one region, a function of ``(probability, std, predicted)``; ``zeros`` first."""
    kinds: dict[str, MapKind] = {
        "zeros": lambda probability, std, predicted: np.zeros(probability.shape, dtype=np.uint8),
        "ensemble_std": lambda probability, std, predicted: qu_brats_map(std),
        "near_miss": lambda probability, std, predicted: qu_brats_near_miss_map(probability, predicted),
        # the near-miss margin on both sides of the border: nothing counts as predicted
        "margin": lambda probability, std, predicted: qu_brats_near_miss_map(probability, np.zeros_like(predicted)),
    }
    for weight in inside_weights:
        kinds[f"ensemble_std_inside{weight:g}"] = lambda probability, std, predicted, w=weight: qu_brats_map(
            np.where(predicted, w * std, std)
        )
    return kinds


def sample_subjects(args: argparse.Namespace) -> list[dict[str, np.ndarray]]:
    """Per subject: ``probability`` and ``std`` (3, X, Y, Z) on the input grid, ``predicted`` and ``truth`` regions,
    ``brain``; sampled as ``evaluate.json`` with the overrides samples them."""
    parser = ConfigParser()
    parser.read_config([str(Path(args.bundle_root) / "configs" / name) for name in ("train.json", "evaluate.json")])
    parser.update(
        {
            "bundle_root": str(args.bundle_root),
            "input": str(args.data),
            "dataset_dir": str(args.data),
            "device": args.device,
            "num_inference_steps": args.num_inference_steps,
            "ensemble_size": args.ensemble_size,
            "write_region_uncertainty": True,
            **json.loads(args.overrides),
        }
    )
    inferer = parser.get_parsed_content("volume_inferer")
    inferer.progress = False
    invert, inverted = inferer.inverter, {}

    def keep(data: dict[str, Any]) -> dict[str, Any]:
        inverted.update(invert(data))
        return inverted

    inferer.inverter = keep
    subjects = []
    for entry in parser.get_parsed_content("validate#dataset#data"):
        prediction = inferer.predict(entry)
        label = locate_subject_files(Path(args.data) / entry["subject_id"]).subject.label
        subjects.append(
            {
                "subject_id": entry["subject_id"],
                "probability": inverted["probs"].as_tensor().numpy(),
                "std": inverted["region_uncertainty"].as_tensor().numpy(),
                "predicted": label_map_regions(prediction.labels, prediction.reference).astype(bool),
                "truth": label_map_regions(np.asarray(nib.load(str(label)).dataobj), label).astype(bool),
                "brain": np.asarray(nib.load(entry["image"][0]).dataobj) > 0,
            }
        )
        print(f"sampled {entry['subject_id']}", flush=True)
    return subjects


def score_kinds(subjects: list[dict[str, np.ndarray]], kinds: dict[str, MapKind]) -> dict[str, np.ndarray]:
    """Per kind, (subjects, 4) QU-BraTS scores of TC, WT, ET and their mean."""
    scores = {}
    for name, make in kinds.items():
        rows = []
        for subject in subjects:
            row = [
                qu_brats_scores(
                    subject["predicted"][i],
                    subject["truth"][i],
                    make(subject["probability"][i], subject["std"][i], subject["predicted"][i]),
                    subject["brain"],
                )["score"]
                for i in range(len(BRATS_REGIONS))
            ]
            rows.append([*row, float(np.mean(row))])
        scores[name] = np.asarray(rows)
    return scores


def summarise(scores: dict[str, np.ndarray]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per kind and region: mean score and the paired difference to ``zeros`` with its 95 % interval."""
    columns = [*BRATS_REGIONS, "mean"]
    table = {}
    for name, values in scores.items():
        difference = values - scores["zeros"]
        table[name] = {
            column: {
                "score": float(values[:, j].mean()),
                "difference_to_zeros": float(difference[:, j].mean()),
                "ci95": list(bootstrap_interval(np.mean, difference[:, j])),
            }
            for j, column in enumerate(columns)
        }
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="labelled BraTS folder")
    parser.add_argument("--bundle-root", type=Path, default=ROOT / "bundle")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-inference-steps", type=int, default=5)
    parser.add_argument("--ensemble-size", type=int, default=3)
    parser.add_argument("--overrides", default="{}", help="JSON of further evaluate.json overrides")
    parser.add_argument("--out", type=Path, required=True, help="JSON of the table")
    args = parser.parse_args()
    table = summarise(score_kinds(sample_subjects(args), map_kinds()))
    print(f"{'kind':26s}" + "".join(f"{c:>28s}" for c in [*BRATS_REGIONS, "mean"]))
    for name, row in table.items():
        cells = "".join(
            f"{r['score']:8.3f} {r['difference_to_zeros']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]"
            for r in row.values()
        )
        print(f"{name:26s}{cells}")
    args.out.write_text(json.dumps({"data": str(args.data), "table": table}, indent=1))


if __name__ == "__main__":
    main()
