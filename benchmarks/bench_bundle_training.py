"""The bundle's training workflow end to end: ``train.json`` (+ ``train_gpu.json``) through MONAI's ConfigWorkflow.

Optionally writes a synthetic BraTS release and its datalist first, then builds the workflow exactly as
``python -m monai.bundle run training`` does, times every epoch's training iterations (Ignite's epoch time, without
the validation that runs after it) and every validation run, and prints a table of seconds, steps and slices per
second per epoch. On a failure the whole traceback (with its chained causes) goes to stderr and the epochs that
finished are still written.

    python benchmarks/bench_bundle_training.py --synth-subjects 24 --shape 64 64 48 \
        --set run_stage=1 roi_size=[64,64] num_workers=4 'stages#0#epochs=3' --out /tmp/bundle_run
    python benchmarks/bench_bundle_training.py --configs bundle/configs/train.json --set compile=false ...

Writes ``<out>/bundle_training.json`` (arguments, card, epochs, the error if any) beside the run's own
``metrics.csv`` and checkpoints (``output_dir`` and ``model_dir`` point into ``<out>``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch
from ignite.engine import Events
from ignite.handlers import BasicTimeProfiler
from monai.bundle import ConfigWorkflow

from medsegdiff_monai.data import build_datalist, read_brats_folder, write_datalist, write_synthetic_brats

BUNDLE_CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--configs",
        nargs="+",
        default=[str(BUNDLE_CONFIGS / "train.json"), str(BUNDLE_CONFIGS / "train_gpu.json")],
        help="bundle config files, merged in order",
    )
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=JSON", help="config overrides; values are JSON (else strings)"
    )
    parser.add_argument("--data-dir", default=None, help="dataset folder (default: <out>/data)")
    parser.add_argument("--synth-subjects", type=int, default=0, help="write this many synthetic subjects first")
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 64, 48], help="synthetic volume shape")
    parser.add_argument("--lgg-fraction", type=float, default=0.35)
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--profile", action="store_true", help="split each epoch's time into loader wait, step and handlers (Ignite)"
    )
    parser.add_argument("--out", required=True, help="output folder")
    return parser.parse_args()


def parse_overrides(items: list[str]) -> dict:
    """``["a#b=3", "name=text"]`` -> ``{"a#b": 3, "name": "text"}`` (values JSON where they parse)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def write_synthetic_split(
    data_dir: Path,
    num_subjects: int,
    lgg_fraction: float,
    shape: list[int],
    seed: int,
    val_fraction: float,
    test_fraction: float = 0.0,
    difficulty: str = "standard",
    num_workers: int = 0,
) -> Path:
    """Write synthetic subjects and their subject-level datalist (``training`` / ``validation`` [/ ``testing``]) into
    ``data_dir``; returns the datalist's path."""
    start = time.perf_counter()
    write_synthetic_brats(
        data_dir,
        num_subjects=num_subjects,
        lgg_fraction=lgg_fraction,
        shape=shape,
        seed=seed,
        progress=False,
        difficulty=difficulty,
        num_workers=num_workers,
    )
    datalist = build_datalist(
        read_brats_folder(data_dir, progress=False),
        data_dir,
        val_fraction=val_fraction,
        seed=seed,
        test_fraction=test_fraction,
    )
    datalist_path = data_dir / "datalist.json"
    write_datalist(datalist, datalist_path)
    sizes = {key: len(datalist[key]) for key in ("training", "validation", "testing") if key in datalist}
    print(f"wrote {num_subjects} {difficulty} synthetic subjects {list(shape)}, split {sizes} "
          f"in {time.perf_counter() - start:.1f} s", flush=True)  # fmt: skip
    return datalist_path


class EpochTimes:
    """Records per epoch the training seconds (Ignite's epoch time), steps, slices and the validation seconds.

    With ``profiler`` (an Ignite :class:`~ignite.handlers.BasicTimeProfiler` attached to the trainer) each epoch also
    gets where its iterations' time went: ``data_seconds`` waiting for the loader, ``step_seconds`` in the trainer's
    iteration (which waits for the previous step's GPU work: the GPU-bound share), ``handler_seconds`` in the
    iteration and batch event handlers.
    """

    def __init__(self, trainer, evaluator, profiler: BasicTimeProfiler | None = None) -> None:
        self.epochs: list[dict] = []
        self.profiler = profiler
        self._first_iteration = 0
        self._slices = 0
        self._validation_seconds = 0.0
        trainer.add_event_handler(Events.EPOCH_STARTED, self._start_epoch)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._count_slices)
        # registered after the workflow's handlers: runs once the epoch's validation finished
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._finish_epoch)
        if evaluator is not None:
            evaluator.add_event_handler(Events.COMPLETED, self._finish_validation)

    def _start_epoch(self, engine) -> None:
        self._first_iteration = engine.state.iteration
        self._slices = 0
        self._validation_seconds = 0.0

    def _count_slices(self, engine) -> None:
        self._slices += int(engine.state.batch["image"].shape[0])

    def _finish_validation(self, engine) -> None:
        self._validation_seconds += engine.state.times[Events.COMPLETED.name]

    def _finish_epoch(self, engine) -> None:
        train_seconds = engine.state.times[Events.EPOCH_COMPLETED.name]
        self.epochs.append(
            {
                "epoch": engine.state.epoch,
                "steps": engine.state.iteration - self._first_iteration,
                "slices": self._slices,
                "train_seconds": train_seconds,
                "slices_per_second": self._slices / train_seconds if train_seconds else float("nan"),
                "validation_seconds": self._validation_seconds,
                "skipped_steps": getattr(engine.state, "epoch_skipped_steps", 0),
            }
        )
        row = self.epochs[-1]
        if self.profiler is not None:
            row.update(self._profile(engine.state.iteration))
        print(
            f"[bench] epoch {row['epoch']}: {row['steps']} steps, {row['slices']} slices in "
            f"{train_seconds:.2f} s ({row['slices_per_second']:.1f} slices/s), validation "
            f"{row['validation_seconds']:.2f} s",
            flush=True,
        )

    def _profile(self, last_iteration: int) -> dict:
        """Seconds of the epoch's iterations ``(self._first_iteration, last_iteration]`` by where they went."""
        window = slice(self._first_iteration, last_iteration)
        handlers = self.profiler.event_handlers_times
        per_iteration = (
            Events.ITERATION_STARTED,
            Events.ITERATION_COMPLETED,
            Events.GET_BATCH_STARTED,
            Events.GET_BATCH_COMPLETED,
        )
        return {
            "data_seconds": float(self.profiler.dataflow_times[window].sum()),
            "step_seconds": float(self.profiler.processing_times[window].sum()),
            "handler_seconds": float(sum(handlers[event][window].sum() for event in per_iteration)),
        }


def print_table(epochs: list[dict]) -> None:
    profiled = ("data_seconds", "step_seconds", "handler_seconds")
    header = f"{'epoch':>5} {'steps':>6} {'slices':>7} {'train s':>9} {'slices/s':>9} {'val s':>8} {'skipped':>8}"
    print(header + ("   data s   step s handler s" if epochs and "data_seconds" in epochs[0] else ""))
    for row in epochs:
        line = (
            f"{row['epoch']:>5} {row['steps']:>6} {row['slices']:>7} {row['train_seconds']:>9.2f} "
            f"{row['slices_per_second']:>9.1f} {row['validation_seconds']:>8.2f} {row['skipped_steps']:>8}"
        )
        print(line + "".join(f" {row[key]:>8.2f}" for key in profiled if key in row))


def main() -> int:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data_dir) if args.data_dir else out / "data"
    if args.synth_subjects:
        write_synthetic_split(
            data_dir, args.synth_subjects, args.lgg_fraction, args.shape, args.seed, args.val_fraction
        )
    overrides = {
        "dataset_dir": str(data_dir),
        "output_dir": str(out / "run"),
        "model_dir": str(out / "models"),
        **parse_overrides(args.set),
    }
    report: dict = {
        "configs": args.configs,
        "overrides": overrides,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "epochs": [],
        "error": None,
    }
    start = time.perf_counter()
    times = None
    try:
        workflow = ConfigWorkflow(
            config_file=args.configs,
            meta_file=str(BUNDLE_CONFIGS / "metadata.json"),
            logging_file=str(BUNDLE_CONFIGS / "logging.conf"),
            workflow_type="train",
            **overrides,
        )
        workflow.initialize()
        trainer = workflow.parser.get_parsed_content("train#trainer")
        profiler = None
        if args.profile:
            profiler = BasicTimeProfiler()
            profiler.attach(trainer)
        times = EpochTimes(trainer, workflow.parser.get_parsed_content("validate#evaluator"), profiler)
        workflow.run()
        workflow.finalize()
    except Exception as error:  # noqa: BLE001 - the benchmark reports any failure with its full traceback
        traceback.print_exc()
        report["error"] = "".join(traceback.format_exception_only(error)).strip()
    report["wall_seconds"] = time.perf_counter() - start
    if times is not None:
        report["epochs"] = times.epochs
        print_table(times.epochs)
    (out / "bundle_training.json").write_text(json.dumps(report, indent=2))
    print(f"wall {report['wall_seconds']:.1f} s; {'failed: ' + report['error'] if report['error'] else 'completed'}")
    return 1 if report["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
