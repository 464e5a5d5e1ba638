"""Epoch-level validation that also validates the run's last epoch and leaves no stale figures between validations."""

from __future__ import annotations

from ignite.engine import Engine, Events
from monai.engines import Evaluator
from monai.handlers import ValidationHandler

__all__ = ["EpochValidation"]


class EpochValidation(ValidationHandler):
    """MONAI's epoch-level ``ValidationHandler`` for runs that validate every ``interval`` epochs.

    The validator runs after every ``interval``-th epoch and after the run's last epoch, so that the end of training
    can become the best network even when the epoch count is not a multiple of ``interval``. At the start of every
    epoch the validator's ``state.metrics`` are emptied, so that what reads them when the epoch ends (the
    ``metrics.csv`` row of :class:`~medsegdiff_monai.handlers.EpochReport`, the best-network score of
    :class:`~medsegdiff_monai.handlers.TrainingCheckpointSaver` and of
    :class:`~medsegdiff_monai.handlers.GradeCalibrationFit`) finds no figures after an epoch without validation (NaN,
    and no candidate for the best network) instead of the previous validation's figures.

    Args:
        interval: validate every ``interval`` epochs (and after the last one).
        validator: the validation engine.
        exec_at_start: also validate before the first epoch.
    """

    def __init__(self, interval: int, validator: Evaluator | None = None, exec_at_start: bool = False) -> None:
        if interval < 1:
            raise ValueError(f"val_interval must be >= 1 (validate every N epochs), got {interval}.")
        super().__init__(interval, validator, epoch_level=True, exec_at_start=exec_at_start)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._forget_figures)
        engine.add_event_handler(Events.EPOCH_COMPLETED(event_filter=self._due), self)
        if self.exec_at_start:
            engine.add_event_handler(Events.STARTED, self)

    def _due(self, engine: Engine, epoch: int) -> bool:
        return epoch % self.interval == 0 or epoch == engine.state.max_epochs

    def _forget_figures(self, _: Engine) -> None:
        if self.validator is not None:
            self.validator.state.metrics = {}
