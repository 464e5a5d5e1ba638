"""The staged training plan: which parts train, at which learning rate, with which losses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from medsegdiff_monai.utils import as_bool, renamed_args, warn_renamed

__all__ = [
    "TRAINABLE_PARTS",
    "LOSS_NAMES",
    "TrainingStage",
    "current_stage_spelling",
    "parse_stages",
    "stage_at_epoch",
    "total_epochs",
    "trained_log_sigmas",
]

TRAINABLE_PARTS = ("backbone", "grade_head", "all")
LOSS_NAMES = ("seg", "grade")
_RENAMED = {"cls_head": "grade_head", "cls": "grade"}
"""Old spellings of a stage's ``train`` and ``losses`` values, read (with a warning) for one release."""


@dataclass(frozen=True)
class TrainingStage:
    """One stage of the plan (`docs/design.md`, section 1).

    Args:
        name: a label printed and saved with the metrics (e.g. ``"segmentation"``).
        epochs: number of epochs of this stage (>= 0; a stage of 0 epochs is skipped).
        train: which parameters are optimised: ``"backbone"`` (both UNets and the calibration map, the grade head
            frozen), ``"grade_head"`` (only the grade head; the backbone frozen and its norm/dropout in eval mode) or
            ``"all"``.
        lr_multiplier: the stage's learning rate is the base learning rate times this.
        losses: the loss terms of the stage, a subset of ``("seg", "grade")``.
        uncertainty_weighting: combine the losses with the learnable Kendall weighting, whose log-sigma of each of
            the stage's losses then trains (also in a single-loss stage, where it follows ``sqrt(L_t)`` and leaves
            Adam's steps of the network unchanged); False sums the losses and freezes the log-sigmas.
    """

    name: str
    epochs: int
    train: str
    lr_multiplier: float = 1.0
    losses: tuple[str, ...] = ("seg",)
    uncertainty_weighting: bool = True


def current_stage_spelling(stage: Mapping) -> dict:
    """``stage`` (one dict of a plan) with the old spellings of its ``train`` (``"cls_head"``) and ``losses``
    (``"cls"``) values replaced by ``"grade_head"`` and ``"grade"``, without a warning (e.g. to compare a plan
    recorded before the renames with today's)."""
    renamed = dict(stage)
    if "train" in renamed:
        renamed["train"] = _RENAMED.get(renamed["train"], renamed["train"])
    if "losses" in renamed:
        renamed["losses"] = [_RENAMED.get(name, name) for name in renamed["losses"]]
    return renamed


def _current_spelling(value: str, where: str) -> str:
    """``value``, or its new spelling (with a warning) when it is an old one (``"cls_head"``, ``"cls"``)."""
    if value not in _RENAMED:
        return value
    warn_renamed(f"{where}: {value!r}", repr(_RENAMED[value]))
    return _RENAMED[value]


@renamed_args(use_cls_head="use_grade_head")
def parse_stages(
    stages: Sequence[Mapping], use_grade_head: bool = True, only_stage: int | None = None
) -> list[TrainingStage]:
    """Validate a stage plan given as a list of dicts (as written in ``train.json``).

    The old spellings ``train="cls_head"`` and the loss name ``"cls"`` are read as ``"grade_head"`` and ``"grade"``,
    with a ``DeprecationWarning``, for one release.

    Args:
        stages: the plan, one dict per stage with the fields of :class:`TrainingStage`.
        use_grade_head: when False, stages that need the grade head (a ``"grade"``-only loss or
            ``train="grade_head"``) are dropped and ``"grade"`` is removed from the others, so the same plan trains a
            segmentation-only network.
        only_stage: 1-based number of the single stage to run (e.g. stage 2 resuming from stage 1's checkpoint);
            None runs the whole plan.

    Raises:
        ValueError: naming the stage and the field at fault.
    """
    if only_stage is not None:
        if not 1 <= only_stage <= len(stages):
            raise ValueError(
                f"run_stage={only_stage} is out of range: the plan has {len(stages)} stage(s), numbered from 1."
            )
        stages = [stages[only_stage - 1]]
    parsed = []
    for index, raw in enumerate(stages):
        where = f"stages[{index}] ({raw.get('name', 'unnamed')!r})"
        unknown = set(raw) - set(TrainingStage.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"{where}: unknown field(s) {sorted(unknown)}; expected {list(TrainingStage.__dataclass_fields__)}."
            )
        for required in ("name", "epochs", "train"):
            if required not in raw:
                raise ValueError(f"{where}: missing field {required!r}.")
        train = _current_spelling(raw["train"], f"{where} train")
        if train not in TRAINABLE_PARTS:
            raise ValueError(f"{where}: train={raw['train']!r}, expected one of {TRAINABLE_PARTS}.")
        if int(raw["epochs"]) < 0:
            raise ValueError(f"{where}: epochs={raw['epochs']} must be >= 0.")
        if float(raw.get("lr_multiplier", 1.0)) <= 0:
            raise ValueError(f"{where}: lr_multiplier={raw['lr_multiplier']} must be > 0.")
        losses = tuple(_current_spelling(name, f"{where} losses") for name in raw.get("losses", ("seg",)))
        if not losses or set(losses) - set(LOSS_NAMES):
            raise ValueError(f"{where}: losses={list(losses)} must be a non-empty subset of {list(LOSS_NAMES)}.")
        stage = TrainingStage(
            name=str(raw["name"]),
            epochs=int(raw["epochs"]),
            train=train,
            lr_multiplier=float(raw.get("lr_multiplier", 1.0)),
            losses=losses,
            uncertainty_weighting=as_bool(raw.get("uncertainty_weighting", True), f"{where} uncertainty_weighting"),
        )
        if not use_grade_head:
            if stage.train == "grade_head" or losses == ("grade",):
                continue
            stage = TrainingStage(**{**stage.__dict__, "losses": tuple(n for n in losses if n != "grade")})
        if stage.epochs > 0:
            parsed.append(stage)
    if not parsed:
        raise ValueError("The stage plan has no stage with epochs > 0 (after dropping grade-only stages).")
    return parsed


def trained_log_sigmas(stage: TrainingStage) -> tuple[str, ...]:
    """The tasks whose log-sigma trains in ``stage``: those of its losses, when it uses uncertainty weighting."""
    return stage.losses if stage.uncertainty_weighting else ()


def total_epochs(stages: Sequence[TrainingStage]) -> int:
    """Number of epochs of the whole plan."""
    return sum(stage.epochs for stage in stages)


def stage_at_epoch(stages: Sequence[TrainingStage], epoch: int) -> tuple[int, TrainingStage]:
    """Index and stage that a 1-based ``epoch`` belongs to; epochs past the plan stay in the last stage."""
    end = 0
    for index, stage in enumerate(stages):
        end += stage.epochs
        if epoch <= end:
            return index, stage
    return len(stages) - 1, stages[-1]
