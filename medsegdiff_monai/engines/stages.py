"""The staged training plan: which parts train, at which learning rate, with which losses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "TRAINABLE_PARTS",
    "LOSS_NAMES",
    "TrainingStage",
    "parse_stages",
    "stage_at_epoch",
    "total_epochs",
    "trained_log_sigmas",
]

TRAINABLE_PARTS = ("backbone", "cls_head", "all")
LOSS_NAMES = ("seg", "cls")


@dataclass(frozen=True)
class TrainingStage:
    """One stage of the plan (`docs/design.md`, section 1).

    Args:
        name: a label printed and saved with the metrics (e.g. ``"segmentation"``).
        epochs: number of epochs of this stage (>= 0; a stage of 0 epochs is skipped).
        train: which parameters are optimised: ``"backbone"`` (both UNets and the calibration map, the grade head
            frozen), ``"cls_head"`` (only the grade head; the backbone frozen and its norm/dropout in eval mode) or
            ``"all"``.
        lr_multiplier: the stage's learning rate is the base learning rate times this.
        losses: the loss terms of the stage, a subset of ``("seg", "cls")``.
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


def parse_stages(
    stages: Sequence[Mapping], use_cls_head: bool = True, only_stage: int | None = None
) -> list[TrainingStage]:
    """Validate a stage plan given as a list of dicts (as written in ``train.json``).

    Args:
        stages: the plan, one dict per stage with the fields of :class:`TrainingStage`.
        use_cls_head: when False, stages that need the classification head (a ``"cls"``-only loss or
            ``train="cls_head"``) are dropped and ``"cls"`` is removed from the others, so the same plan trains a
            segmentation-only network.
        only_stage: 1-based number of the single stage to run (e.g. stage 2 resuming from stage 1's checkpoint);
            None runs the whole plan.

    Raises:
        ValueError: naming the stage and the field at fault.
    """
    if only_stage is not None:
        if not 1 <= only_stage <= len(stages):
            raise ValueError(f"only_stage={only_stage} is out of range: the plan has {len(stages)} stage(s).")
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
        if raw["train"] not in TRAINABLE_PARTS:
            raise ValueError(f"{where}: train={raw['train']!r}, expected one of {TRAINABLE_PARTS}.")
        if int(raw["epochs"]) < 0:
            raise ValueError(f"{where}: epochs={raw['epochs']} must be >= 0.")
        if float(raw.get("lr_multiplier", 1.0)) <= 0:
            raise ValueError(f"{where}: lr_multiplier={raw['lr_multiplier']} must be > 0.")
        losses = tuple(raw.get("losses", ("seg",)))
        if not losses or set(losses) - set(LOSS_NAMES):
            raise ValueError(f"{where}: losses={list(losses)} must be a non-empty subset of {list(LOSS_NAMES)}.")
        stage = TrainingStage(
            name=str(raw["name"]),
            epochs=int(raw["epochs"]),
            train=raw["train"],
            lr_multiplier=float(raw.get("lr_multiplier", 1.0)),
            losses=losses,
            uncertainty_weighting=bool(raw.get("uncertainty_weighting", True)),
        )
        if not use_cls_head:
            if stage.train == "cls_head" or losses == ("cls",):
                continue
            stage = TrainingStage(**{**stage.__dict__, "losses": tuple(n for n in losses if n != "cls")})
        if stage.epochs > 0:
            parsed.append(stage)
    if not parsed:
        raise ValueError("The stage plan has no stage with epochs > 0 (after dropping classification-only stages).")
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
