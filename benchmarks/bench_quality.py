"""Quality on held-out subjects: segmentation, grade (before / after calibration) and uncertainty, three training plans.

Writes a synthetic BraTS release (``--difficulty hard`` by default) and a subject-level datalist with a held-out
``testing`` split, then for each training plan trains through the bundle's training workflow (MONAI
``ConfigWorkflow`` on ``train.json``, plus ``train_gpu.json`` on a GPU, with overrides) and evaluates the best
network through ``evaluate.json`` on the test split (the grade calibration is the one the training workflow fitted
on the validation split and stored in ``model.pt``):

- ``multitask``: the bundle's staged plan (segmentation, then the grade head, then joint);
- ``segonly``: the same plan with ``use_grade_head false`` (the grade stage drops out, the others train segmentation);
- ``naive``: one joint stage, every loss from the first epoch, as many epochs as the staged plan in total.

Reported on the test split, which is used for nothing else: Dice per region (TC, WT, ET, mean) with 95 % bootstrap
intervals; AUC, accuracy, F1, ECE and Brier score of the grade after the stored calibration and before it (the
network is evaluated with its calibration set to the identity, and the stored one, affine in the log-odds, is
applied to the raw subject log-odds); the paired mean-Dice
difference of each plan against ``segonly`` (and of ``multitask`` against ``naive``) with its 95 % interval; the
uncertainty figures (voxel error-detection AUROC in the tumour neighbourhood and in the brain, Spearman correlation
of the per-subject mean uncertainty with mean Dice). Prints a table and writes ``<out>/quality.json``.

    python benchmarks/bench_quality.py --out /tmp/quality                 # GPU-sized defaults
    python benchmarks/bench_quality.py --tiny --out /tmp/quality_tiny     # CPU smoke check, a few minutes

``--jobs N`` trains and evaluates the plans in N parallel processes (small networks leave a large GPU mostly idle);
each plan's results are written to ``<out>/<plan>/result.json`` as soon as it finishes, and ``--report-only``
rebuilds the table from them. ``--eval-shards N`` evaluates each plan's test subjects in N processes;
``--train-only`` stops after training, and a later run into the same ``--out`` keeps the trained networks
(``<plan>/setup.json`` and ``<plan>/run/model.pt``) instead of training them again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from bench_bundle_training import parse_overrides, write_synthetic_split  # noqa: E402  (a sibling script: benchmarks/ is sys.path[0])
from monai.bundle import ConfigParser, ConfigWorkflow

from medsegdiff_monai.metrics import (
    BRATS_REGIONS,
    bootstrap_interval,
    brier_score,
    calibrated_ece_floor,
    expected_calibration_error,
    grade_metrics,
    mean_uncertainty,
    spearman_correlation,
    tumour_neighbourhood,
    voxel_error_auroc,
    wrong_voxels,
)
from medsegdiff_monai.networks import extract_network_state, logit
from medsegdiff_monai.workflows import run_evaluation

BUNDLE_CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"
PLANS = ("multitask", "segonly", "naive")
DICE_KEYS = [f"dice_{region}" for region in (*BRATS_REGIONS, "mean")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke check: tiny data, network run and sampling")
    parser.add_argument("--subjects", type=int, default=200, help="synthetic subjects (default 200)")
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 64, 48], help="synthetic volume shape")
    parser.add_argument("--difficulty", default="hard", help="synthetic preset (default hard)")
    parser.add_argument("--lgg-fraction", type=float, default=0.4)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--test-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the split and the training")
    parser.add_argument("--epochs", type=int, nargs=3, default=[20, 8, 6], help="epochs of the three stages")
    parser.add_argument("--plans", nargs="+", choices=PLANS, default=list(PLANS))
    parser.add_argument("--jobs", type=int, default=1, help="plans run in this many parallel processes")
    parser.add_argument("--ensemble", type=int, default=5, help="ensemble size of the evaluation sampler")
    parser.add_argument(
        "--steps", type=int, default=10, help="steps of the evaluation sampler (evaluate.json's scheduler)"
    )
    parser.add_argument("--margin", type=int, default=3, help="dilation (voxels) of the tumour neighbourhood")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the intervals")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=JSON", help="training config overrides (values JSON, else text)"
    )
    parser.add_argument(
        "--eval-shards", type=int, default=1, help="each plan evaluates its test subjects in this many processes"
    )
    parser.add_argument(
        "--data-workers", type=int, default=0, help="processes writing the synthetic subjects (0: in this process)"
    )
    parser.add_argument(
        "--train-only", action="store_true", help="train (or keep) each plan's network, then stop before evaluating"
    )
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report from <out>/<plan>/")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one plan of --jobs, no report
    parser.add_argument("--eval-shard", type=int, help=argparse.SUPPRESS)  # one shard of --eval-shards
    args = parser.parse_args(argv)
    if args.eval_shards < 1:
        parser.error(f"--eval-shards must be at least 1, got {args.eval_shards}")
    if args.tiny:
        args.subjects, args.shape, args.epochs = 12, [32, 32, 24], [1, 1, 1]
        args.ensemble, args.steps, args.bootstrap = 2, 1, 200
        args.val_fraction, args.test_fraction = 0.35, 0.25  # 4 validation subjects: enough to fit the calibration
    return args


def prepare_data(args: argparse.Namespace, data_dir: Path) -> Path:
    """Write the synthetic release and its datalist (training / validation / testing) once; returns the datalist."""
    datalist_path = data_dir / "datalist.json"
    if datalist_path.is_file():
        return datalist_path
    return write_synthetic_split(
        data_dir, args.subjects, args.lgg_fraction, args.shape, args.seed, args.val_fraction, args.test_fraction,
        args.difficulty, args.data_workers,
    )  # fmt: skip


def stage_plan(args: argparse.Namespace, plan: str) -> dict[str, Any]:
    """Training overrides of one plan (the stage epochs, the head, the single joint stage of ``naive``)."""
    if plan == "naive":
        joint = {
            "name": "joint",
            "epochs": sum(args.epochs),
            "train": "all",
            "lr_multiplier": 1.0,
            "losses": ["seg", "grade"],
            "uncertainty_weighting": True,
        }
        return {"stages": [joint]}
    overrides: dict[str, Any] = {f"stages#{i}#epochs": epochs for i, epochs in enumerate(args.epochs)}
    if plan == "segonly":
        overrides["use_grade_head"] = False
    return overrides


def training_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Overrides shared by every plan: small network, 64 x 64 slices, eager (compilation would dominate short runs)."""
    overrides: dict[str, Any] = {
        "seed": args.seed,
        "resume": False,
        "preset": "small",
        "roi_size": [64, 64],
        "compile": False,
        "val_interval": 1,
    }
    if torch.cuda.is_available():
        # train_gpu.json's rates are the base preset's: keep train.json's rates, which are the small preset's
        cpu_config = json.loads((BUNDLE_CONFIGS / "train.json").read_text())
        overrides.update(
            {
                "lr": cpu_config["lr"],
                **{f"stages#{i}#lr_multiplier": s["lr_multiplier"] for i, s in enumerate(cpu_config["stages"])},
                "batch_size": 16,
                "num_workers": 4,
                "slices_per_volume": 8,
            }
        )
    if args.tiny:
        overrides.update({"roi_size": [32, 32], "slices_per_volume": 2, "val_sampling_steps": 1, "val_interval": 1})
    overrides.update(parse_overrides(args.set))
    return overrides


def train(args: argparse.Namespace, plan: str, data_dir: Path, datalist: Path, plan_dir: Path) -> dict[str, Any]:
    """Train one plan through the bundle's training workflow; returns the overrides used."""
    configs = [str(BUNDLE_CONFIGS / "train.json")]
    if torch.cuda.is_available():
        configs.append(str(BUNDLE_CONFIGS / "train_gpu.json"))
    overrides = {
        "dataset_dir": str(data_dir),
        "datalist": str(datalist),
        "output_dir": str(plan_dir / "run"),
        **training_overrides(args),
        **stage_plan(args, plan),  # after the shared overrides: naive's "stages" replaces the edited plan
    }
    workflow = ConfigWorkflow(
        config_file=configs,
        meta_file=str(BUNDLE_CONFIGS / "metadata.json"),
        logging_file=str(BUNDLE_CONFIGS / "logging.conf"),
        workflow_type="train",
        **overrides,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return {"configs": [Path(c).name for c in configs], "overrides": overrides}


def shard_folder(plan_dir: Path, shard: int) -> Path:
    """The evaluation output folder of one shard of a plan's test subjects."""
    return plan_dir / f"evaluate_testing_{shard}"


def evaluate_shard(args: argparse.Namespace, plan: str, data_dir: Path, datalist: Path, shard: int) -> None:
    """Run ``evaluate.json`` (read over ``train.json``) on shard ``shard`` of the test split (every
    ``--eval-shards``-th subject) and write, in :func:`shard_folder`, ``rows.json`` (per subject: Dice per region,
    grade, uncalibrated p(HGG) with the network's calibration set to the identity, the uncertainty figures) and
    ``voxels.npz`` (uncertainty and wrongness of the voxels in the tumour neighbourhood and in the brain)."""
    plan_dir = Path(args.out) / plan
    overrides = json.loads((plan_dir / "setup.json").read_text())["overrides"]
    output_dir = shard_folder(plan_dir, shard)
    outputs = output_dir / "outputs"
    output_dir.mkdir(parents=True, exist_ok=True)
    subjects = json.loads(datalist.read_text())["testing"][shard :: args.eval_shards]
    shard_datalist = output_dir / "datalist.json"
    shard_datalist.write_text(json.dumps({"testing": subjects}, indent=2))
    parser = ConfigParser()
    parser.read_config([str(BUNDLE_CONFIGS / "train.json"), str(BUNDLE_CONFIGS / "evaluate.json")])
    parser.update(
        {
            "dataset_dir": str(data_dir),
            "datalist": str(shard_datalist),
            "datalist_key": "testing",
            "checkpoint": str(plan_dir / "run" / "model.pt"),
            "output_dir": str(outputs),
            "use_grade_head": plan != "segonly",
            "preset": overrides["preset"],
            "roi_size": overrides["roi_size"],
            "ensemble_size": args.ensemble,
            "num_inference_steps": args.steps,
            "seed": args.seed,
        }
    )
    parser.get_parsed_content("initialize")  # set_determinism(seed)
    evaluator = parser.get_parsed_content("volume_inferer")
    calibration = getattr(evaluator.network, "grade_calibration", None)
    if calibration is not None:  # score the raw grade; the stored calibration is applied to it in the report
        calibration.set(1.0, 0.0)
    result = run_evaluation(
        evaluator,
        str(shard_datalist),
        outputs,
        datalist_key="testing",
        data_dir=data_dir,
        include_hd95=False,
        print_table=False,
    )
    entries = parser.get_parsed_content("validate#dataset#data")
    rows, voxels = [], {name: ([], []) for name in ("neighbourhood", "brain")}
    for row, entry in zip(result.rows, entries, strict=True):
        subject = row["subject_id"]
        prediction = np.asarray(nib.load(str(outputs / f"{subject}_seg.nii.gz")).dataobj)
        uncertainty = np.asarray(nib.load(str(outputs / f"{subject}_uncertainty.nii.gz")).dataobj, np.float32)
        truth = np.asarray(nib.load(str(entry["label"])).dataobj)
        regions = {
            "neighbourhood": tumour_neighbourhood([prediction, truth], args.margin),
            "brain": np.asarray(nib.load(str(entry["image"][0])).dataobj) > 0,
        }
        wrong = wrong_voxels(prediction, truth)
        selected = {name: (uncertainty[inside], wrong[inside]) for name, inside in regions.items()}
        for name, (region_uncertainty, region_wrong) in selected.items():  # pooled over the split in the report
            voxels[name][0].append(region_uncertainty)
            voxels[name][1].append(region_wrong)
        rows.append(
            {
                "subject_id": subject,
                "grade": row["grade"],
                "p_hgg": row["p_hgg"],
                **{k: row[k] for k in DICE_KEYS},
                "mean_uncertainty": mean_uncertainty(uncertainty, prediction, args.margin),
                "auroc_neighbourhood": voxel_error_auroc(*selected["neighbourhood"]),
            }
        )
    np.savez(
        output_dir / "voxels.npz",
        **{f"{name}_{part}": np.concatenate(arrays[i]) for name, arrays in voxels.items() for i, part in
           enumerate(("uncertainty", "wrong"))},
    )  # fmt: skip
    (output_dir / "rows.json").write_text(json.dumps(rows, indent=2))


def evaluate_test_split(args: argparse.Namespace, plan: str, data_dir: Path, datalist: Path) -> dict[str, Any]:
    """Evaluate a plan's network on the test split in ``--eval-shards`` processes (in this one when 1); returns the
    per-subject rows in the datalist's order and the pooled voxel figures."""
    plan_dir = Path(args.out) / plan
    if args.eval_shards == 1:
        evaluate_shard(args, plan, data_dir, datalist, 0)
    else:
        threads = str(max(1, (os.cpu_count() or 1) // (args.eval_shards * max(1, args.jobs))))
        env = {"OMP_NUM_THREADS": threads, **os.environ}
        own = [a for a in args.argv if a not in ("--worker", "--train-only")]
        workers = [
            subprocess.Popen([sys.executable, __file__, *own, "--plans", plan, "--eval-shard", str(k)], env=env)
            for k in range(args.eval_shards)
        ]
        codes = [worker.wait() for worker in workers]
        if any(codes):
            raise RuntimeError(f"plan {plan}: evaluation processes exited with {codes}")
    testing = json.loads(datalist.read_text())["testing"]
    order = {entry["subject_id"]: i for i, entry in enumerate(testing)}
    rows, pooled = [], {}
    shards = [shard_folder(plan_dir, k) for k in range(args.eval_shards)]
    for folder in shards:
        rows += json.loads((folder / "rows.json").read_text())
    rows.sort(key=lambda row: order[row["subject_id"]])
    archives = [np.load(folder / "voxels.npz") for folder in shards]
    for name in ("neighbourhood", "brain"):
        uncertainty = np.concatenate([a[f"{name}_uncertainty"] for a in archives])
        wrong = np.concatenate([a[f"{name}_wrong"] for a in archives])
        pooled[f"pooled_auroc_{name}"] = voxel_error_auroc(uncertainty, wrong)
        pooled[f"error_share_{name}"] = float(wrong.mean())
    return {"testing": rows, **pooled}


def mean_with_interval(values: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    values = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(np.mean(values)),
        "ci95": list(bootstrap_interval(np.mean, values, num_resamples=args.bootstrap)),
    }


def stored_calibration(checkpoint: Path) -> tuple[float, float]:
    """``(scale, bias)`` of the grade calibration in a ``model.pt`` (identity when the file has none)."""
    state = extract_network_state(torch.load(checkpoint, map_location="cpu", weights_only=True))
    scale, bias = state.get("grade_calibration.scale"), state.get("grade_calibration.bias")
    return (float(scale), float(bias)) if scale is not None and bias is not None else (1.0, 0.0)


def calibrated(p_raw: np.ndarray, scale: float, bias: float) -> np.ndarray:
    """p(HGG) after the calibration ``logit p = scale * raw log-odds + bias``: what ``model.pt`` outputs (the
    calibration is affine in the log-odds, so it commutes with the mean over slices)."""
    return torch.sigmoid(scale * logit(torch.as_tensor(p_raw, dtype=torch.float64)) + bias).numpy()


def grade_report(p: np.ndarray, y: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    """AUC, accuracy, F1, ECE, Brier (with 95 % intervals for AUC, accuracy, ECE, Brier) of subject-level p(HGG), and
    the ECE a perfectly calibrated grader with the same p(HGG) would show on these subjects."""
    metrics = grade_metrics(p, y)
    report = {k: metrics[k] for k in ("auc", "accuracy", "f1", "ece", "confusion_matrix")}
    report["brier"] = brier_score(p, y)
    report["ece_if_calibrated"] = calibrated_ece_floor(p)  # what sampling noise alone gives on these subjects
    statistics = {
        "auc": lambda ps, ys: voxel_error_auroc(ps, ys.astype(bool)),  # the rank AUROC of p(HGG) for HGG
        "accuracy": lambda ps, ys: float(np.mean((ps >= 0.5) == ys)),
        "ece": expected_calibration_error,
        "brier": brier_score,
    }
    for name, statistic in statistics.items():
        report[f"{name}_ci95"] = list(bootstrap_interval(statistic, p, y, num_resamples=args.bootstrap))
    return report


def run_plan(args: argparse.Namespace, plan: str, data_dir: Path, datalist: Path) -> None:
    """Train (or keep the network of an earlier run in the same ``--out``), evaluate on the test split, and write
    ``<out>/<plan>/result.json``."""
    plan_dir = Path(args.out) / plan
    plan_dir.mkdir(parents=True, exist_ok=True)
    setup_path, checkpoint = plan_dir / "setup.json", plan_dir / "run" / "model.pt"
    if setup_path.is_file() and checkpoint.is_file():
        setup = json.loads(setup_path.read_text())
        print(f"[quality] {plan}: keeping the network trained earlier ({checkpoint})", flush=True)
    else:
        start = time.perf_counter()
        setup = {"plan": plan, **train(args, plan, data_dir, datalist, plan_dir)}
        setup["train_seconds"] = time.perf_counter() - start
        if plan != "segonly":
            setup["calibration"] = stored_calibration(checkpoint)
        setup_path.write_text(json.dumps(setup, indent=2))
        print(f"[quality] {plan}: trained in {setup['train_seconds']:.0f} s", flush=True)
    if args.train_only:
        return
    begin = time.perf_counter()
    result = {**setup, **evaluate_test_split(args, plan, data_dir, datalist)}
    result["testing_seconds"] = time.perf_counter() - begin
    (plan_dir / "result.json").write_text(json.dumps(result, indent=2))
    print(f"[quality] {plan}: evaluated {len(result['testing'])} test subjects in {result['testing_seconds']:.0f} s")


def summarise(args: argparse.Namespace, results: dict[str, dict]) -> dict[str, Any]:
    """The report: per plan Dice with intervals, grade before / after calibration, uncertainty; paired differences."""
    summary: dict[str, Any] = {"plans": {}}
    test_ids = None
    for plan, result in results.items():
        rows = result["testing"]
        ids = [r["subject_id"] for r in rows]
        test_ids = test_ids or ids
        if ids != test_ids:
            raise ValueError(f"plan {plan}: its test subjects differ from the other plans'")
        entry: dict[str, Any] = {"num_test_subjects": len(rows), "train_seconds": result["train_seconds"]}
        entry["dice"] = {k: mean_with_interval([r[k] for r in rows], args) for k in DICE_KEYS}
        dice = np.array([r["dice_mean"] for r in rows])
        u = np.array([r["mean_uncertainty"] for r in rows])
        entry["uncertainty"] = {
            "auroc_neighbourhood_pooled": result["pooled_auroc_neighbourhood"],
            "auroc_brain_pooled": result["pooled_auroc_brain"],
            "auroc_neighbourhood_subject_median": float(np.nanmedian([r["auroc_neighbourhood"] for r in rows])),
            "error_share_neighbourhood": result["error_share_neighbourhood"],
            "error_share_brain": result["error_share_brain"],
            "spearman_mean_uncertainty_dice": spearman_correlation(u, dice),
            "spearman_ci95": list(bootstrap_interval(spearman_correlation, u, dice, num_resamples=args.bootstrap)),
        }
        if plan != "segonly":
            y_test = np.array([r["grade"] for r in rows])
            p_test = np.array([r["p_hgg"] for r in rows], dtype=np.float64)
            scale, bias = result["calibration"]
            entry["grade_before_calibration"] = grade_report(p_test, y_test, args)
            entry["grade_after_calibration"] = grade_report(calibrated(p_test, scale, bias), y_test, args)
            entry["calibration"] = {"scale": scale, "bias": bias}
        summary["plans"][plan] = entry
    if "segonly" in results:
        reference = np.array([r["dice_mean"] for r in results["segonly"]["testing"]])
        for plan in results:
            if plan == "segonly":
                continue
            difference = np.array([r["dice_mean"] for r in results[plan]["testing"]]) - reference
            summary["plans"][plan]["mean_dice_minus_segonly"] = mean_with_interval(difference, args)
    if "multitask" in results and "naive" in results:
        staged = np.array([r["dice_mean"] for r in results["multitask"]["testing"]])
        naive = np.array([r["dice_mean"] for r in results["naive"]["testing"]])
        summary["plans"]["multitask"]["mean_dice_minus_naive"] = mean_with_interval(staged - naive, args)
    return summary


def _cell(value: Any, interval: list[float] | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = f"{value:.3f}"
    return text + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def print_table(summary: dict[str, Any]) -> None:
    plans = summary["plans"]
    print(
        f"\nheld-out test split: {next(iter(plans.values()))['num_test_subjects']} subjects; 95 % bootstrap intervals"
    )
    print("| figure | " + " | ".join(plans) + " |")
    print("|---|" + "---|" * len(plans))

    def line(label: str, get) -> None:
        cells = []
        for entry in plans.values():
            try:
                cells.append(get(entry))
            except KeyError:
                cells.append("-")
        print(f"| {label} | " + " | ".join(cells) + " |")

    for key in DICE_KEYS:
        line(f"Dice {key[5:]}", lambda e, k=key: _cell(e["dice"][k]["mean"], e["dice"][k]["ci95"]))
    line("mean Dice - segonly (paired)", lambda e: _cell(e["mean_dice_minus_segonly"]["mean"],
                                                         e["mean_dice_minus_segonly"]["ci95"]))  # fmt: skip
    line("mean Dice - naive (paired)", lambda e: _cell(e["mean_dice_minus_naive"]["mean"],
                                                       e["mean_dice_minus_naive"]["ci95"]))  # fmt: skip
    for when in ("before", "after"):
        grade = f"grade_{when}_calibration"
        for name in ("auc", "accuracy", "f1", "ece", "ece_if_calibrated", "brier"):
            line(f"{name} {when} calibration", lambda e, g=grade, n=name: _cell(e[g][n], e[g].get(f"{n}_ci95")))
    line("voxel error AUROC, tumour neighbourhood", lambda e: _cell(e["uncertainty"]["auroc_neighbourhood_pooled"]))
    line("voxel error AUROC, brain", lambda e: _cell(e["uncertainty"]["auroc_brain_pooled"]))
    line("Spearman(mean uncertainty, Dice)", lambda e: _cell(e["uncertainty"]["spearman_mean_uncertainty_dice"],
                                                             e["uncertainty"]["spearman_ci95"]))  # fmt: skip
    line("training seconds", lambda e: f"{e['train_seconds']:.0f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = out / "data"
    start = time.perf_counter()
    if args.eval_shard is not None:  # one shard of one plan's evaluation (a process of --eval-shards)
        evaluate_shard(args, args.plans[-1], data_dir, data_dir / "datalist.json", args.eval_shard)
        return 0
    if not args.report_only:
        datalist = prepare_data(args, data_dir)
        if args.jobs > 1 and len(args.plans) > 1:
            # one worker process per plan, at most --jobs at a time; the last --plans of a command line wins
            own = args.argv
            pending, running, codes = list(args.plans), [], []
            while pending or running:
                while pending and len(running) < args.jobs:
                    command = [sys.executable, __file__, *own, "--plans", pending.pop(0), "--worker"]
                    running.append(subprocess.Popen(command, env=os.environ.copy()))
                time.sleep(1)
                codes += [p.returncode for p in running if p.poll() is not None]
                running = [p for p in running if p.returncode is None]
            if any(codes):
                print(f"[quality] plan processes exited with {codes}", file=sys.stderr)
        else:
            for plan in args.plans:
                run_plan(args, plan, data_dir, datalist)
        if args.worker or args.train_only:
            return 0
    results = {
        plan: json.loads((out / plan / "result.json").read_text())
        for plan in PLANS
        if (out / plan / "result.json").is_file()
    }
    if not results:
        print("[quality] no plan finished; nothing to report", file=sys.stderr)
        return 1
    summary = summarise(args, results)
    summary["arguments"] = {k: v for k, v in vars(args).items() if k not in ("report_only", "argv", "eval_shard")}
    summary["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    summary["torch"] = torch.__version__
    summary["wall_seconds"] = time.perf_counter() - start
    summary["training"] = {plan: {"configs": r["configs"], "overrides": r["overrides"]} for plan, r in results.items()}
    (out / "quality.json").write_text(json.dumps(summary, indent=2, allow_nan=True))
    print_table(summary)
    print(f"[quality] wrote {out / 'quality.json'} ({summary['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
