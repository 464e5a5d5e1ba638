"""Dice of fast samplers against 1000-step DDPM on a trained checkpoint, through the bundle's ``evaluate.json``.

Runs the evaluation workflow once per sampler (same checkpoint, subjects, ensemble and seed), then prints each
sampler's seconds and mean Dice per region, and the difference to the reference sampler (the last one given).
With the defaults it evaluates the committed demo checkpoint ``bundle/models/model.pt`` on the validation split of
the README's synthetic data set (write it first with README command 1's ``synth`` and ``datalist`` steps):

    python benchmarks/bench_sampler_agreement.py --samplers dpmpp_2m:8 ddim:10 ddpm:1000 --out agreement

A sampler is ``scheduler:steps[:eta[:seed[:option...]]]`` (scheduler: ``ddim``, ``dpmpp_2m``, ``dpmpp_3m`` or
``ddpm``; eta: the stochasticity of the DDIM and DPM-Solver++ steps, 1 for the SDE; seed: the sampler's noise
seed, default 0; options: ``cpu_amp`` runs it with the bundle's ``cpu_amp: true``, bf16 autocast on a CPU, so
``dpmpp_2m:8:0:0:cpu_amp`` pairs with the float32 ``dpmpp_2m:8:0:0``; ``sharedK`` sets the sampler's
``shared_steps`` to K, the first K network passes shared by the ensemble members, e.g.
``dpmpp_2m:12:1:0:shared5``). ``--reference`` reuses every sampler stored in earlier runs' ``agreement.json``
files instead of running it again (a 1000-step DDPM run is the slow one); a sampler stored by several of them,
e.g. runs on disjoint subsets of the subjects (``--part K/N``, or a ``"datalist"`` override), is merged subject
by subject. Every sampled run stores the SHA-256 of the checkpoint it sampled; a stored sampler of another
checkpoint is refused (its pairing would compare two networks), one stored without a digest is reused with a
printed warning.

Samplers that differ only in their seed form one *family* (the last family is the reference). A second table pairs
each family with the reference subject by subject: per subject, the Dice averaged over the family's seeds minus the
reference's, then the mean of those differences over the subjects with a 95 % bootstrap interval (subjects
resampled). A family agrees within ``--tolerance`` when the whole interval lies inside +-tolerance; averaging over
seeds removes most of the sampler's own noise, which on the demo checkpoint's 6 subjects is larger than 0.01 in ET.
Each row also names the subject of the largest difference: a subject without enhancing tumour scores ET Dice 1 or
0 as a sample predicts none or some, and one such flip moves the mean of 12 subjects by up to 0.08. Such
all-or-nothing subjects are listed after the table with each family's runs scoring 1 (``paired.json``:
``all_or_nothing``), and the table is printed again without them (``rows_without_all_or_nothing``), a reading
that shows the other subjects' agreement, not the test.
For more subjects, evaluate a separate synthetic set (12 subjects: one 1000-step DDPM pass took 38 s per subject
on an H100), e.g.

    medsegdiff-monai synth --out data/agreement_brats --subjects 12 --lgg-fraction 0.35 --shape 64 64 48 --seed 7
    medsegdiff-monai datalist --data-dir data/agreement_brats --val-fraction 0 --out data/agreement_brats/datalist.json
    python benchmarks/bench_sampler_agreement.py --samplers ddim:10:0:0 ddim:10:0:1 ddim:10:0:2 ddpm:1000:0:1 \
        ddpm:1000:0:0 --overrides '{"dataset_dir": "data/agreement_brats", "datalist_key": "training"}'
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
import pandas as pd
from monai.bundle import ConfigParser, run

from medsegdiff_monai.metrics import evaluate_subjects
from medsegdiff_monai.transforms import suppress_small_enhancing

REGIONS = ("TC", "WT", "ET", "mean")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config",
        nargs="+",
        default=["bundle/configs/train.json", "bundle/configs/evaluate.json"],
        help="the evaluation configs (evaluate.json read on top of train.json)",
    )
    parser.add_argument("--bundle-root", default="bundle", help="the bundle folder (its models/model.pt is evaluated)")
    parser.add_argument(
        "--samplers", nargs="+", default=["dpmpp_2m:8", "ddpm:1000"], help="see above; last = reference"
    )
    parser.add_argument(
        "--reference", nargs="*", default=[], help="agreement.json files of earlier runs: samplers reused, not run"
    )
    parser.add_argument("--ensemble", type=int, default=5)
    parser.add_argument("--out", default="sampler_agreement")
    parser.add_argument("--overrides", default="{}", help="JSON dict of further evaluate.json overrides")
    parser.add_argument("--tolerance", type=float, default=0.01, help="agreement margin on the mean Dice difference")
    parser.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples of the subjects")
    parser.add_argument(
        "--min-enhancing-voxels", type=int, default=0, help="ET predictions of fewer voxels become core (label 1)"
    )
    parser.add_argument(
        "--rescore-from", help="score the label maps an earlier run wrote under this folder instead of sampling again"
    )
    parser.add_argument(
        "--part",
        help="K/N: only every N-th subject from the K-th (1 <= K <= N), so that N processes share a slow sampler; "
        "--reference merges their runs",
    )
    args = parser.parse_args()
    for sampler in args.samplers:
        try:
            parse_sampler(sampler)
        except ValueError as error:
            parser.error(f"--samplers: {error}")
    if args.part is not None:  # read once, kept as (K, N)
        match = re.fullmatch(r"(\d+)/(\d+)", args.part)
        if match is None or not 1 <= int(match[1]) <= int(match[2]):
            parser.error(f"--part {args.part}: expected K/N with 1 <= K <= N, e.g. 2/6.")
        args.part = (int(match[1]), int(match[2]))
    return args


def sampler_folder(sampler: str) -> str:
    """The output folder of one sampler's evaluation: ``ddim:10:0:2`` -> ``ddim_10_0_2``."""
    return sampler.replace(":", "_")


class SamplerSpec(NamedTuple):
    """One ``--samplers`` entry, ``scheduler:steps[:eta[:seed[:option...]]]``, read field by field."""

    scheduler: str
    steps: int
    eta: float
    seed: int
    cpu_amp: bool
    shared_steps: int


def parse_sampler(sampler: str) -> SamplerSpec:
    """The fields of a sampler spec (eta 0 and seed 0 when left out; options ``cpu_amp`` and ``sharedK`` after the
    seed, each at most once); ``ValueError`` naming the sampler when a field does not read."""
    fields = sampler.split(":")
    if len(fields) < 2:
        raise ValueError(f"sampler {sampler!r}: expected scheduler:steps[:eta[:seed[:option...]]], e.g. ddim:10.")
    scheduler, steps, *rest = fields
    options = rest[2:]
    shared = [int(option[6:]) for option in options if re.fullmatch(r"shared\d+", option)]
    cpu_amp = options.count("cpu_amp")
    if len(shared) + cpu_amp != len(options) or len(shared) > 1 or cpu_amp > 1:
        raise ValueError(
            f"sampler {sampler!r}: the fields after the seed are 'cpu_amp' and 'sharedK' (K an integer), each at "
            f"most once; got {options}."
        )
    try:
        eta, seed = (float(rest[0]) if rest else 0.0), (int(rest[1]) if len(rest) > 1 else 0)
        return SamplerSpec(scheduler, int(steps), eta, seed, cpu_amp == 1, shared[0] if shared else 0)
    except ValueError as error:
        raise ValueError(f"sampler {sampler!r}: steps and seed are integers, eta a number ({error}).") from None


def evaluate(args: argparse.Namespace, sampler: str, checkpoint_digest: str) -> dict:
    """Run ``evaluate.json`` with one sampler; returns its summary plus the seconds it took and
    ``checkpoint_digest``, the SHA-256 of the checkpoint it sampled."""
    spec = parse_sampler(sampler)
    output_dir = Path(args.out) / sampler_folder(sampler)
    begin = time.perf_counter()
    run(
        run_id="run",
        config_file=args.config,
        bundle_root=args.bundle_root,
        scheduler=spec.scheduler,
        num_inference_steps=spec.steps,
        eta=spec.eta,
        seed=spec.seed,
        ensemble_size=args.ensemble,
        include_hd95=False,
        min_enhancing_voxels=args.min_enhancing_voxels,
        cpu_amp=spec.cpu_amp,
        shared_steps=spec.shared_steps,
        output_dir=str(output_dir),
        **json.loads(args.overrides),
    )
    summary = json.loads((output_dir / "summary.json").read_text())
    metrics = pd.read_csv(output_dir / "metrics_per_subject.csv").set_index("subject_id")
    per_subject = {region: metrics[f"dice_{region}"].astype(float).to_dict() for region in REGIONS}
    return {
        **summary,
        "per_subject_dice": per_subject,
        "seconds": time.perf_counter() - begin,
        "checkpoint_sha256": checkpoint_digest,
    }


def evaluation_config(args: argparse.Namespace) -> ConfigParser:
    """``evaluate.json`` (over ``train.json``) with ``--bundle-root`` and the overrides, as the runs read it."""
    parser = ConfigParser()
    parser.read_config(args.config)
    parser.update({"bundle_root": args.bundle_root, **json.loads(args.overrides)})
    return parser


def write_part_datalist(args: argparse.Namespace) -> Path:
    """Write ``<out>/datalist_part<K>of<N>.json``: every N-th entry, from the K-th, of the evaluation's datalist under
    its ``datalist_key`` (``--part K/N``, ``args.part`` the pair ``(K, N)``); paths stay relative to ``dataset_dir``.
    Returns the file's path."""
    parser = evaluation_config(args)
    key = parser.get_parsed_content("datalist_key")
    entries = json.loads(Path(parser.get_parsed_content("datalist")).read_text())[key]
    part, parts = args.part
    chosen = entries[part - 1 :: parts]
    if not chosen:
        raise ValueError(
            f"--part {part}/{parts}: the datalist's {key!r} list has {len(entries)} subjects, none for it."
        )
    path = Path(args.out) / f"datalist_part{part}of{parts}.json"
    path.write_text(json.dumps({key: chosen}, indent=1))
    return path


def checkpoint_sha256(args: argparse.Namespace) -> str:
    """SHA-256 of the checkpoint the evaluation config samples."""
    return hashlib.sha256(Path(evaluation_config(args).get_parsed_content("checkpoint")).read_bytes()).hexdigest()


def check_stored_checkpoints(stored: dict, names: list[str], digest: str) -> None:
    """Refuse a reused sampler of ``names`` that sampled another checkpoint than the one of ``digest``; warn for one
    stored without a digest (its checkpoint cannot be checked)."""
    for name in names:
        if name not in stored:
            continue
        stored_digest = stored[name].get("checkpoint_sha256")
        if stored_digest is None:
            print(f"warning: {name} (--reference) stores no checkpoint digest: check that it sampled this checkpoint.")
        elif stored_digest != digest:
            raise ValueError(
                f"{name} (--reference) sampled the checkpoint of SHA-256 {stored_digest[:12]}..., this run's "
                f"checkpoint is {digest[:12]}...: pairing them would compare two networks. Pass the checkpoint the "
                "reference sampled (--overrides '{\"checkpoint\": ...}') or leave the sampler out of --reference."
            )


def merge_stored(paths: list[str]) -> dict:
    """Samplers of several ``agreement.json`` files; one stored by several is merged subject by subject, its mean Dice
    per region recomputed over the union of the subjects and its seconds summed. A stored run whose subjects are a
    subset or a superset of those merged so far (a later run's file carries the reference it reused) is the same run
    copied: it must have the same Dice, and the larger of the two is kept. Any other overlap is refused, since the
    seconds of the shared subjects cannot be split."""
    merged: dict = {}
    for path in paths:
        for name, result in json.loads(Path(path).read_text()).items():
            if name not in merged:
                merged[name] = result
                continue
            if "per_subject_dice" not in result or "per_subject_dice" not in merged[name]:
                raise ValueError(f"{path}: {name} is stored twice, once without per-subject Dice: cannot merge")
            digests = {merged[name].get("checkpoint_sha256"), result.get("checkpoint_sha256")}
            if len(digests) > 1:
                raise ValueError(f"{path}: {name} is stored for two checkpoints (or once without a digest)")
            known, dice = merged[name]["per_subject_dice"], result["per_subject_dice"]
            shared = known["mean"].keys() & dice["mean"].keys()
            for region in REGIONS:
                for subject in sorted(shared):
                    if not np.isclose(known[region][subject], dice[region][subject], rtol=0, atol=1e-9, equal_nan=True):
                        raise ValueError(
                            f"{path}: {name} stores {region} Dice {dice[region][subject]:.4f} for {subject}, another "
                            f"file {known[region][subject]:.4f}: two different runs of one sampler; keep one of them"
                        )
            if shared == dice["mean"].keys():
                continue
            if shared == known["mean"].keys():
                merged[name] = result
                continue
            if shared:
                raise ValueError(
                    f"{path}: {name} covers {len(shared)} subjects merged from another file and "
                    f"{len(dice['mean']) - len(shared)} new ones; pass runs of disjoint subjects or whole copies"
                )
            combined = {region: {**known[region], **dice[region]} for region in REGIONS}
            merged[name] = {
                "checkpoint_sha256": digests.pop(),
                "num_subjects": len(combined["mean"]),
                **{
                    f"dice_{region}": {"mean": float(np.nanmean(list(combined[region].values())))} for region in REGIONS
                },
                "per_subject_dice": combined,
                "seconds": merged[name]["seconds"] + result["seconds"],
            }
    return merged


def rescore(args: argparse.Namespace, sampler: str) -> dict:
    """Score again the label maps of ``sampler`` that an earlier run wrote (``<subject_id>_seg.nii.gz`` in a folder
    named after the sampler, anywhere under ``--rescore-from``), after ``--min-enhancing-voxels``; the subjects are
    those of ``evaluate.json`` with the overrides, those without a stored map are left out."""
    parser = evaluation_config(args)
    folder = sampler_folder(sampler)
    stored = {}  # subject id -> label map; the first found in path order
    for path in sorted(Path(args.rescore_from).glob(f"**/{folder}/*_seg.nii.gz")):
        stored.setdefault(path.name.removesuffix("_seg.nii.gz"), path)
    predictions = []
    for entry in parser.get_parsed_content("validate#dataset#data"):
        if entry["subject_id"] in stored:
            labels = np.asarray(nib.load(str(stored[entry["subject_id"]])).dataobj)
            predictions.append(
                {
                    "subject_id": entry["subject_id"],
                    "label_file": entry["label"],
                    "pred_labels": suppress_small_enhancing(labels, args.min_enhancing_voxels),
                    "grade": entry.get("grade"),
                }
            )
    if not predictions:
        raise FileNotFoundError(f"no label maps of {sampler} under {args.rescore_from}/**/{folder}/")
    result = evaluate_subjects(predictions, include_hd95=False)
    per_subject = {region: {row["subject_id"]: row[f"dice_{region}"] for row in result.rows} for region in REGIONS}
    return {**result.summary, "per_subject_dice": per_subject, "seconds": 0.0, "rescored_from": args.rescore_from}


def mean_dice_difference(result: dict, reference: dict, region: str) -> float:
    """Mean over the subjects both evaluated of ``result``'s Dice minus ``reference``'s in one region (the stored
    means' difference where either has no per-subject Dice)."""
    if "per_subject_dice" not in result or "per_subject_dice" not in reference:
        return result[f"dice_{region}"]["mean"] - reference[f"dice_{region}"]["mean"]
    ours, theirs = result["per_subject_dice"][region], reference["per_subject_dice"][region]
    shared = sorted(ours.keys() & theirs.keys())
    return float(np.nanmean([ours[subject] - theirs[subject] for subject in shared]))


def family(sampler: str) -> str:
    """The sampler without its seed, eta spelt out: ``ddim:10:0:2`` and ``ddim:10`` are both ``ddim:10:0``,
    ``dpmpp_2m:8:0:1:cpu_amp`` is ``dpmpp_2m:8:0:cpu_amp``, ``dpmpp_2m:12:1:2:shared5`` is
    ``dpmpp_2m:12:1:shared5``."""
    scheduler, steps, *rest = sampler.split(":")
    return ":".join([scheduler, steps, f"{float(rest[0]) if rest else 0.0:g}", *rest[2:]])


def family_dice(results: dict, members: list[str], region: str) -> pd.Series:
    """Per-subject Dice of one region averaged over a family's seeds (subjects every member evaluated)."""
    return pd.concat([pd.Series(results[name]["per_subject_dice"][region]) for name in members], axis=1).mean(axis=1)


def paired_difference(difference: np.ndarray, resamples: int) -> tuple[float, float, float]:
    """Mean of per-subject differences and its 95 % bootstrap interval over the subjects (fixed seed)."""
    rng = np.random.default_rng(0)
    means = difference[rng.integers(0, len(difference), size=(resamples, len(difference)))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(difference.mean()), float(low), float(high)


def all_or_nothing_subjects(results: dict, families: dict[str, list[str]], region: str) -> dict[str, dict]:
    """Subjects whose Dice in ``region`` is exactly 0 or 1 in every run and not the same in all: an empty region in
    the truth (BraTS convention: 1 when the prediction is empty too, 0 when it is not), where each run keeps the
    region or not. Per subject: per family, ``[runs scoring 1, runs]``. One such subject moves a family's mean over N
    subjects by up to 1 / N, so no interval closes while the families keep it at different rates."""
    runs = defaultdict(dict)  # subject -> family -> the runs' Dice
    for name, members in families.items():
        for member in members:
            for subject, dice in results[member]["per_subject_dice"][region].items():
                runs[subject].setdefault(name, []).append(dice)
    found = {}
    for subject, by_family in sorted(runs.items()):
        scores = [dice for values in by_family.values() for dice in values]
        if set(scores) == {0.0, 1.0}:
            found[subject] = {name: [int(sum(values)), len(values)] for name, values in by_family.items()}
    return found


def paired_rows(
    args: argparse.Namespace,
    results: dict,
    families: dict[str, list[str]],
    reference_family: str,
    left_out: Sequence[str] = (),
) -> dict:
    """Each family against the reference family, subject by subject (``left_out`` subjects dropped); prints and
    returns the rows."""
    print("| family | seeds | region | mean difference | 95 % interval | agrees | largest subject difference |")
    print("|---|---|---|---|---|---|---|")
    rows = {}
    reference_dice = {region: family_dice(results, families[reference_family], region) for region in REGIONS}
    for name, members in families.items():
        if name == reference_family:
            continue
        for region in REGIONS:
            ours, reference = family_dice(results, members, region), reference_dice[region]
            common = ours.index.intersection(reference.index).difference(left_out)
            difference = ours[common] - reference[common]
            mean, low, high = paired_difference(difference.to_numpy(), args.bootstrap)
            agrees = -args.tolerance <= low and high <= args.tolerance
            largest = difference.abs().idxmax()  # the subject that moves the interval most, e.g. an ET flip 0 <-> 1
            rows[f"{name}/{region}"] = {
                "seeds": len(members),
                "subjects": len(common),
                "mean_difference": mean,
                "interval_95": [low, high],
                "agrees": agrees,
                "largest_subject_difference": {"subject": largest, "difference": float(difference[largest])},
            }
            print(
                f"| {name} | {len(members)} | {region} | {mean:+.4f} | [{low:+.4f}, {high:+.4f}] | "
                f"{'yes' if agrees else 'no'} | {difference[largest]:+.4f} ({largest}) |"
            )
    return rows


def print_paired_table(args: argparse.Namespace, results: dict) -> dict:
    """Each family against the reference family, subject by subject; then the all-or-nothing subjects of each region
    (:func:`all_or_nothing_subjects`) and, when there are some, the table again without them (a reading, not the
    test). Returns the rows, those subjects and the second table."""
    families = defaultdict(list)
    for name in args.samplers:
        if "per_subject_dice" in results[name]:
            families[family(name)].append(name)
    reference_family = family(args.samplers[-1])
    if reference_family not in families:
        print("\nno per-subject Dice for the reference (stored by an older run): no paired table")
        return {}
    print(
        f"\npaired by subject against {reference_family} ({len(families[reference_family])} seed(s)); agreement: "
        f"the 95 % interval of the mean difference inside +-{args.tolerance}\n"
    )
    paired = {"rows": paired_rows(args, results, families, reference_family)}
    all_or_nothing = {region: all_or_nothing_subjects(results, families, region) for region in REGIONS}
    paired["all_or_nothing"] = {region: found for region, found in all_or_nothing.items() if found}
    for region, found in paired["all_or_nothing"].items():
        for subject, counts in found.items():
            seeds = ", ".join(f"{name} {ones}/{total}" for name, (ones, total) in counts.items())
            print(f"\n{region} of {subject} is all or nothing (Dice 0 or 1 in every run); runs scoring 1: {seeds}")
    left_out = sorted({subject for found in paired["all_or_nothing"].values() for subject in found})
    if left_out:
        print(f"\nthe same without {', '.join(left_out)} (a reading, not the test)\n")
        paired["rows_without_all_or_nothing"] = paired_rows(args, results, families, reference_family, left_out)
    return paired


def main() -> None:
    args = parse_args()
    reference_name = args.samplers[-1]
    stored = merge_stored(args.reference)
    digest = None if args.rescore_from else checkpoint_sha256(args)
    if digest is not None:
        check_stored_checkpoints(stored, args.samplers, digest)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.part is not None:
        args.overrides = json.dumps({**json.loads(args.overrides), "datalist": str(write_part_datalist(args))})
    results = {}
    for name in args.samplers:  # saved after each sampler: a run cut short keeps what it finished
        if name in stored:
            results[name] = stored[name]
        else:
            results[name] = rescore(args, name) if args.rescore_from else evaluate(args, name, digest)
        (Path(args.out) / "agreement.json").write_text(json.dumps(results, indent=1))
    reference = results[reference_name]
    print(f"\nensemble {args.ensemble}, {reference['num_subjects']} subjects, reference {reference_name}\n")
    header = " | ".join(f"Dice {r}" for r in REGIONS)
    print(f"| sampler | subjects | seconds | {header} | max abs Dice difference (shared subjects) |")
    print("|---|---|---|" + "---|" * len(REGIONS) + "---|")
    for name, summary in results.items():
        difference = max(abs(mean_dice_difference(summary, reference, region)) for region in REGIONS)
        cells = " | ".join(f"{summary[f'dice_{r}']['mean']:.4f}" for r in REGIONS)
        print(f"| {name} | {summary['num_subjects']} | {summary['seconds']:.1f} | {cells} | {difference:.4f} |")
    paired = print_paired_table(args, results)
    (Path(args.out) / "paired.json").write_text(json.dumps(paired, indent=1))


if __name__ == "__main__":
    main()
