"""Ignite handler applying the staged training plan (freezing, learning rate, losses) epoch by epoch."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from ignite.engine import Engine, Events

from medsegdiff_monai.engines.stages import TrainingStage, parse_stages, stage_at_epoch, trained_log_sigmas
from medsegdiff_monai.utils import unwrap_module

__all__ = ["StagedTraining"]


class StagedTraining:
    """Switch the trainer to the stage of the plan that each epoch belongs to (`docs/design.md`, section 1).

    At the start of every epoch, when the stage changes (and at the first epoch of a run or a resume):

    - parameters the stage does not train get ``requires_grad=False`` (their gradients stay ``None`` because the
      trainer zero-grads with ``set_to_none=True``, so AdamW, weight decay included, leaves them bit-identical);
      the trainer keeps their norm/dropout layers in eval mode;
    - the loss module's log-sigma of a task trains in every stage whose losses include that task and that uses
      uncertainty weighting (:func:`~medsegdiff_monai.engines.stages.trained_log_sigmas`);
    - every optimizer group's learning rate becomes its ``base_lr`` (the lr it had when attached) times the stage's
      ``lr_multiplier``, except groups marked ``"follows_stage_lr": False`` (the log-sigmas' own rate), which keep
      their ``base_lr``;
    - ``engine.stage`` is set, which selects the losses of the step.

    Training data without grades (BraTS 2021 and 2023 ship no grade table) is segmentation-only: at the start of
    the run the stages that train only the grade head are skipped, ``"grade"`` is dropped from the other stages'
    losses, the run is shortened by the skipped epochs, and one message says so.

    Args:
        stages: the plan, as :class:`TrainingStage` objects or as dicts (validated by :func:`parse_stages`).
        name: logger name.
        graded: whether the training data has grades; ``None`` (default) looks at the entries of the trainer's
            dataset (``engine.state.dataloader.dataset.data``, a MONAI ``Dataset``): graded unless none has a ``grade``.
    """

    def __init__(
        self, stages: Sequence[TrainingStage | Mapping], name: str = "medsegdiff_monai", graded: bool | None = None
    ) -> None:
        self.stages = [s if isinstance(s, TrainingStage) else parse_stages([s])[0] for s in stages]
        self.logger = logging.getLogger(name)
        self.stage_index: int | None = None
        self.graded = graded

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._skip_grade_stages_without_grades)
        engine.add_event_handler(Events.STARTED, self._record_base_lr)
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def _skip_grade_stages_without_grades(self, engine: Engine) -> None:
        graded = self.graded
        if graded is None:
            entries = getattr(getattr(engine.state.dataloader, "dataset", None), "data", None)
            graded = not (entries and all(isinstance(e, Mapping) and "grade" not in e for e in entries))
        if graded or not any("grade" in stage.losses for stage in self.stages):
            return
        kept = parse_stages([stage.__dict__ for stage in self.stages], use_grade_head=False)
        skipped = [stage.name for stage in self.stages if stage.train == "grade_head" or stage.losses == ("grade",)]
        skipped_epochs = sum(stage.epochs for stage in self.stages) - sum(stage.epochs for stage in kept)
        engine.state.max_epochs = max(engine.state.max_epochs - skipped_epochs, 1)
        self.logger.warning(
            f"the training data has no grades: segmentation only. Grade stage(s) {skipped} skipped and the 'grade' "
            f"loss dropped, {engine.state.max_epochs} epoch(s) in all; the grade head is not trained. Give a grade "
            "table (datalist --grades CSV with subject_id,grade) to train it."
        )
        self.stages = kept

    @staticmethod
    def _record_base_lr(engine: Engine) -> None:
        # a resumed optimizer state brings its own base_lr (loaded after this handler runs)
        for group in engine.optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])

    def __call__(self, engine: Engine) -> None:
        index, stage = stage_at_epoch(self.stages, engine.state.epoch)
        if index == self.stage_index:
            return
        self.stage_index = index
        self.apply(engine, stage)
        self.logger.info(
            f"stage {index + 1}/{len(self.stages)} '{stage.name}' from epoch {engine.state.epoch}: "
            f"trains {stage.train}, "
            f"losses {'+'.join(stage.losses)}{' (uncertainty-weighted)' if stage.uncertainty_weighting else ''}, "
            f"lr x {stage.lr_multiplier:g}"
        )

    @staticmethod
    def apply(engine: Engine, stage: TrainingStage) -> None:
        """Freeze/unfreeze, set learning rates and the stage on ``engine`` (a :class:`DiffusionTrainer`)."""
        network = engine.unwrapped_network
        for name, parameter in network.named_parameters():
            in_head = name.startswith("grade_head.")
            parameter.requires_grad_(stage.train == "all" or (stage.train == "grade_head") == in_head)
        trained = trained_log_sigmas(stage)
        # a loss without uncertainty weighting has no log-sigmas
        log_sigmas = getattr(unwrap_module(engine.loss_function), "log_sigmas", {})
        for task_name, parameter in log_sigmas.items():
            parameter.requires_grad_(task_name in trained)
        for group in engine.optimizer.param_groups:
            group["lr"] = group["base_lr"] * (stage.lr_multiplier if group.get("follows_stage_lr", True) else 1.0)
        engine.optimizer.zero_grad(set_to_none=True)
        engine.stage = stage

    def state_dict(self) -> dict:
        return {"stage_index": -1 if self.stage_index is None else self.stage_index}

    def load_state_dict(self, state: Mapping) -> None:
        # the stage is re-derived from the restored epoch at the next EPOCH_STARTED; the saved index is informative
        self.stage_index = None
