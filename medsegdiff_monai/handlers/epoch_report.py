"""Ignite handler printing and saving the per-epoch figures (console line, metrics.csv, TensorBoard)."""

from __future__ import annotations

import csv
import logging
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events

from medsegdiff_monai.utils import unwrap_module

__all__ = ["EpochReport", "REPORT_COLUMNS"]

REPORT_COLUMNS = (
    "epoch", "stage", "lr", "Dice", "IoU", "AUC", "F1", "Acc", "L_seg", "L_grade", "L_total",
    "sigma_seg", "sigma_grade", "alpha_LGG", "alpha_HGG", "skipped_steps", "seconds",
)  # fmt: skip
_RENAMED_COLUMNS = {"L_cls": "L_grade", "sigma_cls": "sigma_grade"}
"""Columns of a ``metrics.csv`` written before the grade figures were named ``*_grade``; renamed on resume."""


class EpochReport:
    """Print one line per epoch and append it to ``metrics.csv`` (and TensorBoard scalars).

    At the start of the run it prints ``n_LGG=.. n_HGG=.. alpha_LGG=.. alpha_HGG=..`` and the parameter count.
    After each epoch (attach it after the validation handler) it reports the validation figures of ``evaluator``
    (``Dice``, ``IoU`` and per-region ``Dice_<r>``/``IoU_<r>``, ``AUC``, ``F1``, ``Acc``), the training means of
    ``L_seg``, ``L_grade``, ``L_total`` over the epoch's applied steps, ``sigma_seg``/``sigma_grade`` of the
    uncertainty weighting, the class weights, the stage, the learning rate, the skipped steps and the seconds.
    A figure that is undefined (e.g. AUC with one grade in the validation split, L_grade in a segmentation stage) is
    NaN, with a warning for validation figures. On a resumed run, rows of epochs after the restored one are dropped,
    so no epoch appears twice, and the columns ``L_cls``/``sigma_cls`` of a ``metrics.csv`` written before the grade
    figures were renamed become ``L_grade``/``sigma_grade``.

    The row is written to ``metrics.csv`` (and TensorBoard) when the epoch completes, and the line is printed after
    every other handler of the epoch's end, the checkpoint saver included: a printed epoch is always in a checkpoint,
    and an epoch whose checkpoint a kill prevented is run again and its row rewritten.

    Under DistributedDataParallel attach it on every rank: the loss means are then over the applied steps of all
    ranks (one all-reduce per epoch), the validation figures are those the MONAI metric handlers gathered from all
    ranks, and only rank 0 prints, writes ``metrics.csv`` and TensorBoard.

    Args:
        output_dir: folder of ``metrics.csv`` and the TensorBoard events.
        evaluator: the validation engine (None: no validation figures).
        class_counts: ``(n_LGG, n_HGG)`` of the training split.
        alpha: ``(alpha_LGG, alpha_HGG)`` used by the grade loss.
        num_parameters: parameter count printed at start.
        tensorboard: also write TensorBoard scalars (turned off, with a warning, when TensorBoard cannot be
            imported or cannot write; ``metrics.csv`` is always written).
        name: logger name.
    """

    def __init__(
        self,
        output_dir: str | Path,
        evaluator: Engine | None = None,
        class_counts: Sequence[int] | None = None,
        alpha: Sequence[float] | None = None,
        num_parameters: int | None = None,
        tensorboard: bool = True,
        name: str = "medsegdiff_monai",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.csv_path = self.output_dir / "metrics.csv"
        self.evaluator = evaluator
        self.class_counts = class_counts
        if alpha is not None and len(alpha) != 2:
            raise ValueError(f"class_weights must be two weights, [alpha_LGG, alpha_HGG], got {list(alpha)}.")
        self.alpha = tuple(alpha) if alpha is not None else (math.nan, math.nan)
        self.num_parameters = num_parameters
        self.tensorboard = tensorboard
        self.logger = logging.getLogger(name)
        self._writer = None
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._epoch_start = 0.0
        self._trimmed = False
        self._pending: dict | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self._close)

    def _started(self, engine: Engine) -> None:
        if not engine.has_event_handler(self._print_pending, Events.EPOCH_COMPLETED):
            # registered now, after every handler attached before the run (checkpoints), so it runs last
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._print_pending)
        if not _is_main_process():
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.class_counts is not None:
            self.logger.info(
                f"n_LGG={self.class_counts[0]} n_HGG={self.class_counts[1]} "
                f"alpha_LGG={self.alpha[0]:.3f} alpha_HGG={self.alpha[1]:.3f}"
            )
        if self.num_parameters is not None:
            self.logger.info(f"parameters: {self.num_parameters:,}")

    def _epoch_started(self, engine: Engine) -> None:
        if not self._trimmed and _is_main_process():  # after any checkpoint loader has restored the epoch counter
            self._trim_rows(engine.state.epoch - 1)
            self._trimmed = True
        self._sums, self._count = {}, 0
        self._epoch_start = time.perf_counter()

    def _iteration_completed(self, engine: Engine) -> None:
        # on the device, without a host synchronisation: skipped (non-finite) steps add nothing
        output = engine.state.output
        applied = torch.as_tensor(output.get("finite", True), device=output["L_total"].device)
        for key in ("L_seg", "L_grade", "L_total"):
            value = output[key].detach().float()
            value = torch.where(applied, value, torch.zeros_like(value))
            self._sums[key] = self._sums[key] + value if key in self._sums else value
        self._count = self._count + applied.float()

    def _epoch_completed(self, engine: Engine) -> None:
        row = self._collect(engine)
        if not _is_main_process():
            return
        self._append_row(row)
        if self.tensorboard:
            self._write_tensorboard(row, engine.state.epoch)
        self._pending = row

    def _print_pending(self, engine: Engine) -> None:
        if self._pending is not None:
            self._log_line(self._pending)
            self._pending = None

    def _collect(self, engine: Engine) -> dict:
        loss_function = unwrap_module(engine.loss_function)
        sigmas = loss_function.sigmas() if hasattr(loss_function, "sigmas") else {}
        row: dict = {
            "epoch": engine.state.epoch,
            "stage": getattr(getattr(engine, "stage", None), "name", ""),
            # the network's rate: the log-sigmas' own group (follows_stage_lr False) is not the stage's lr
            "lr": max(g["lr"] for g in engine.optimizer.param_groups if g.get("follows_stage_lr", True)),
        }
        metrics = dict(self.evaluator.state.metrics) if self.evaluator is not None else {}
        for key in ("Dice", "IoU", "AUC", "F1", "Acc"):
            row[key] = _as_float(metrics.get(key, math.nan))
        for key in sorted(k for k in metrics if k.startswith(("Dice_", "IoU_"))):
            row[key] = _as_float(metrics[key])
        undefined = [k for k in ("Dice", "IoU", "AUC", "F1", "Acc") if k in metrics and math.isnan(row[k])]
        if undefined and _is_main_process():
            warnings.warn(
                f"epoch {engine.state.epoch}: undefined validation figure(s) {undefined} reported as NaN.", stacklevel=2
            )
        row.update(self._loss_means(engine))
        row["sigma_seg"] = sigmas.get("seg", math.nan)
        row["sigma_grade"] = sigmas.get("grade", math.nan)
        row["alpha_LGG"], row["alpha_HGG"] = self.alpha
        row["skipped_steps"] = getattr(engine.state, "epoch_skipped_steps", 0)
        row["seconds"] = time.perf_counter() - self._epoch_start
        return row

    def _loss_means(self, engine: Engine) -> dict[str, float]:
        """Means of ``L_seg``, ``L_grade``, ``L_total`` over the epoch's applied steps (of all ranks under DDP)."""
        keys = ("L_seg", "L_grade", "L_total")
        device = getattr(engine.state, "device", None) or "cpu"
        zero = torch.zeros((), device=device)
        count = torch.as_tensor(self._count, dtype=torch.float32, device=device)
        totals = torch.stack([self._sums.get(k, zero).to(device) for k in keys] + [zero + count])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals)
        count = float(totals[-1])
        return {k: float(totals[i] / count) if count else math.nan for i, k in enumerate(keys)}

    def _columns(self, row: dict) -> list[str]:
        extra = [k for k in row if k not in REPORT_COLUMNS]
        return list(REPORT_COLUMNS) + extra

    def _trim_rows(self, last_epoch: int) -> None:
        if not self.csv_path.exists():
            return
        with open(self.csv_path, newline="") as handle:
            reader = csv.DictReader(handle)
            fieldnames = [_RENAMED_COLUMNS.get(name, name) for name in reader.fieldnames or []]
            rows = [
                {_RENAMED_COLUMNS.get(k, k): v for k, v in r.items()} for r in reader if int(r["epoch"]) <= last_epoch
            ]
        self._rewrite(fieldnames, rows)

    def _rewrite(self, fieldnames: list[str], rows: list[dict]) -> None:
        temp = self.csv_path.with_suffix(".csv.tmp")
        with open(temp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
        temp.replace(self.csv_path)

    def _append_row(self, row: dict) -> None:
        columns = self._columns(row)
        if self.csv_path.exists():
            with open(self.csv_path, newline="") as handle:
                reader = csv.DictReader(handle)
                existing = reader.fieldnames or []
                rows = list(reader)
            if existing != columns:
                columns = existing + [c for c in columns if c not in existing]
                self._rewrite(columns, rows)
        else:
            self._rewrite(columns, [])
        with open(self.csv_path, "a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=columns).writerow(row)

    def _log_line(self, row: dict) -> None:
        parts = [f"epoch {row['epoch']}", f"stage={row['stage']}", f"lr={row['lr']:.2e}"]
        for key in ("Dice", "IoU", "AUC", "F1", "Acc", "L_seg", "L_grade", "L_total", "sigma_seg", "sigma_grade"):
            parts.append(f"{key}={row[key]:.4f}")
        parts.append(f"alpha_LGG={row['alpha_LGG']:.3f}")
        parts.append(f"alpha_HGG={row['alpha_HGG']:.3f}")
        parts.append(f"skipped={row['skipped_steps']}")
        parts.append(f"{row['seconds']:.1f}s")
        self.logger.info(" ".join(parts))

    def _write_tensorboard(self, row: dict, epoch: int) -> None:
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"))
            except Exception as error:  # an optional sink: a missing or broken TensorBoard must not end the run
                warnings.warn(
                    f"TensorBoard scalars are off for this run ({type(error).__name__}: {error}); "
                    f"{self.csv_path} has every figure.",
                    stacklevel=2,
                )
                self.tensorboard = False
                return
        for key, value in row.items():
            if key not in ("epoch", "stage") and isinstance(value, int | float):
                self._writer.add_scalar(key, value, epoch)
        self._writer.flush()

    def _close(self, engine: Engine) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _as_float(value) -> float:
    if isinstance(value, torch.Tensor):
        value = value.float().mean().item() if value.numel() else math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _is_main_process() -> bool:
    """True unless this process is a rank other than 0 of an initialised process group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
