"""Atomic training checkpoints (last and best) on Ignite's ``Checkpoint``, and resuming from the last one."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointLoader

from medsegdiff_monai.handlers.run_state import prune_checkpoints
from medsegdiff_monai.networks.checkpoint import load_network_weights
from medsegdiff_monai.utils import unwrap_module

__all__ = [
    "TrainingCheckpointSaver",
    "ResumeFromCheckpoint",
    "LoadNetworkWeights",
    "latest_checkpoint",
    "validation_score",
]

_LAST_PATTERN = re.compile(r"^checkpoint_epoch=(\d+)\.pt$")


def latest_checkpoint(save_dir: str | Path) -> Path | None:
    """The ``checkpoint_epoch=N.pt`` of the highest N in ``save_dir``, or None."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in save_dir.iterdir() if (m := _LAST_PATTERN.match(p.name))]
    return max(found)[1] if found else None


def validation_score(metrics: Mapping, names: Sequence[str] = ("Dice", "-Brier")) -> float:
    """Checkpoint-selection score: the sum of the figures named in ``names``, a leading ``-`` subtracting one.

    The default ``Dice - Brier`` (mean Dice over subjects and regions minus the grade Brier score, in [-1, 1]) rewards
    segmentation and well-placed grade probabilities alike. Both are means of bounded per-subject terms, so one
    subject moves the score by at most ``1 / n``; the AUC of a few validation subjects jumps between 0.25 and 1 from
    one epoch to the next (one swapped pair of 2 LGG x 4 HGG moves it by 1/8), which made a ``mean(Dice, AUC)``
    selection partly chance. Figures that are NaN or absent are left out (e.g. no Brier without a grade head);
    -inf when none is defined.

    Args:
        metrics: the evaluator's ``state.metrics``.
        names: metric names, each optionally prefixed by ``-`` to subtract it.
    """
    total, defined = 0.0, False
    for name in names:
        sign, key = (-1.0, name[1:]) if name.startswith("-") else (1.0, name)
        if key in metrics and not math.isnan(float(metrics[key])):
            total += sign * float(metrics[key])
            defined = True
    return total if defined else -math.inf


class _ReplacingDiskSaver(DiskSaver):
    """``DiskSaver`` for a file of fixed name: the atomic save replaces the previous file, so it is never removed
    first (a kill between removal and save would lose the best network)."""

    def remove(self, filename: str) -> None:
        pass


class TrainingCheckpointSaver:
    """Save everything needed to resume after every epoch, and the best network by validation score.

    Files (written atomically by Ignite's ``DiskSaver(atomic=True)``: a temporary file renamed into place, so a crash
    never leaves a truncated checkpoint):

    - ``save_dir/checkpoint_epoch=N.pt``: every object of ``save_dict`` (network, optimizer, loss module with the
      log-sigmas, trainer state, random state) and the best-network tracker's state (``best_checkpoint``: the best
      score so far, so a resumed run only replaces the best network by a better one). Only the ``n_saved`` newest
      files are kept, also those an earlier process of the run left behind; one complete file always exists.
    - ``best_dir/best_filename`` (default ``model.pt``): the network's bare state dict (Ignite saves a single object
      unwrapped) of the epoch with the best :func:`validation_score` of ``evaluator`` (by default Dice minus the
      grade Brier score; Dice alone without a grade head). It is saved before the epoch's checkpoint, so a
      checkpoint never records a best network that is not on disk.

    Attach it after the epoch's other handlers that must come before the checkpoint (validation, ``EpochReport``'s
    ``metrics.csv`` row). All files load with ``torch.load(path, weights_only=True)``. Under DDP only rank 0 writes.

    Args:
        save_dir: output folder.
        save_dict: objects with ``state_dict``/``load_state_dict`` keyed by name; must hold ``"network"``.
        evaluator: validation engine for the best checkpoint (None: no best checkpoint).
        best_dir: folder of the best network (default ``save_dir``), e.g. the run's folder.
        best_filename: file name of the best network.
        score_names: the figures of :func:`validation_score`, the same as :class:`GradeCalibrationFit`'s.
        n_saved: number of resume checkpoints kept.
    """

    def __init__(
        self,
        save_dir: str | Path,
        save_dict: Mapping,
        evaluator: Engine | None = None,
        best_dir: str | Path | None = None,
        best_filename: str = "model.pt",
        score_names: Sequence[str] = ("Dice", "-Brier"),
        n_saved: int = 2,
        name: str = "medsegdiff_monai",
    ) -> None:
        if "network" not in save_dict:
            raise ValueError(f"save_dict must hold 'network', got keys {sorted(save_dict)}.")
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.evaluator = evaluator
        self.best_dir = Path(best_dir) if best_dir is not None else self.save_dir
        self.best_filename = best_filename
        self.score_names = tuple(score_names)
        self.n_saved = n_saved
        self.logger = logging.getLogger(name)
        self.best: Checkpoint | None = None
        if evaluator is not None:
            self.best = Checkpoint(
                {"network": self.save_dict["network"]},
                _ReplacingDiskSaver(str(self.best_dir), require_empty=False, atomic=True),
                filename_pattern=self.best_filename,
                n_saved=1,
                score_function=lambda _: validation_score(self.evaluator.state.metrics, self.score_names),
                score_name="val_score",
                include_self=False,
            )

    @property
    def state_objects(self) -> dict:
        """Everything a checkpoint holds (``save_dict`` and the best-network tracker): the resume ``load_dict``."""
        return {**self.save_dict, **({"best_checkpoint": self.best} if self.best is not None else {})}

    def attach(self, engine: Engine) -> None:
        last = Checkpoint(
            self.state_objects,
            DiskSaver(str(self.save_dir), require_empty=False, atomic=True),
            filename_pattern="checkpoint_epoch={global_step}.{ext}",
            n_saved=self.n_saved,
            global_step_transform=lambda eng, _: eng.state.epoch,
        )
        if self.best is not None:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.best)
        engine.add_event_handler(Events.EPOCH_COMPLETED, last)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._prune)

    def _prune(self, engine: Engine) -> None:
        if not _is_main_process():
            return
        for path in prune_checkpoints(self.save_dir, self.n_saved):
            self.logger.info(f"removed {path}")


class ResumeFromCheckpoint:
    """Resume a run from the newest ``checkpoint_epoch=N.pt`` of ``save_dir`` (MONAI's ``CheckpointLoader``).

    The trainer then continues at epoch N + 1, in the stage that epoch belongs to, with the optimizer state and the
    log-sigmas restored. Nothing happens when ``enabled`` is False or no checkpoint exists yet (a first run).

    Args:
        save_dir: folder written by :class:`TrainingCheckpointSaver`.
        load_dict: the same objects as its ``save_dict``.
        optional_keys: entries of ``load_dict`` that a checkpoint written before they were saved lacks; such an
            object keeps its initial state (every other entry must be in the checkpoint).
        enabled: whether to resume.
        map_location: passed to ``torch.load``.
    """

    def __init__(
        self,
        save_dir: str | Path,
        load_dict: Mapping,
        optional_keys: Sequence[str] = (),
        enabled: bool = True,
        map_location: str | None = "cpu",
        name: str = "medsegdiff_monai",
    ) -> None:
        self.save_dir = Path(save_dir)
        self.load_dict = dict(load_dict)
        self.optional_keys = tuple(optional_keys)
        self.enabled = enabled
        self.map_location = map_location
        self.logger = logging.getLogger(name)

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        path = latest_checkpoint(self.save_dir)
        if path is None:
            self.logger.info(f"resume: no checkpoint in {self.save_dir}, starting a new run")
            return
        self.logger.info(f"resume: loading {path}")
        load_dict = self.load_dict
        if self.optional_keys:
            stored = torch.load(path, map_location="cpu", weights_only=True, mmap=True).keys()  # no tensor is read
            absent = [key for key in self.optional_keys if key in load_dict and key not in stored]
            if absent:
                self.logger.info(f"resume: {path.name} holds no {', '.join(absent)}; starting it anew")
                load_dict = {key: value for key, value in load_dict.items() if key not in absent}
        CheckpointLoader(load_path=str(path), load_dict=load_dict, map_location=self.map_location).attach(engine)


class LoadNetworkWeights:
    """Load network weights before training starts, e.g. stage 1's ``model.pt`` for a run of stage 2 alone.

    Accepts a file of :class:`TrainingCheckpointSaver` (``{"network": ...}`` with or without other entries) or a
    plain state dict (:func:`~medsegdiff_monai.networks.load_network_weights` loads it at ``Events.STARTED``). Does
    nothing when ``path`` is None, so a config can always attach it.

    Args:
        path: checkpoint file or None.
        network: the module to load into.
        strict: require every key to match.
    """

    def __init__(self, path: str | Path | None, network: torch.nn.Module, strict: bool = True) -> None:
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"initial checkpoint {path} does not exist.")
        self.path = path
        self.network = network
        self.strict = strict

    def attach(self, engine: Engine) -> None:
        if self.path is not None:
            engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        load_network_weights(unwrap_module(self.network), self.path, strict=self.strict)


def _is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
