"""Ignite handler reporting (and bounding) training steps skipped for a non-finite loss."""

from __future__ import annotations

import logging

from ignite.engine import Engine, Events

from medsegdiff_monai.engines.trainer import NonFiniteLossEvents

__all__ = ["NonFiniteLossGuard"]


class NonFiniteLossGuard:
    """Count and report the steps :class:`DiffusionTrainer` skipped because the loss or gradient was not finite.

    The trainer itself never applies such a step, so no NaN reaches the weights or a checkpoint. This handler logs
    each skip with its epoch and iteration, keeps the count in ``engine.state.skipped_steps`` (the run) and
    ``engine.state.epoch_skipped_steps`` (the current epoch), and stops the run with an error after
    ``max_consecutive`` skips in a row (a diverged run is not worth continuing).

    Args:
        max_consecutive: consecutive skipped steps that end the run (None: never).
        name: logger name.
    """

    def __init__(self, max_consecutive: int | None = 50, name: str = "medsegdiff_monai") -> None:
        self.max_consecutive = max_consecutive
        self.logger = logging.getLogger(name)
        self.consecutive = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset_run)
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset_epoch)
        engine.add_event_handler(NonFiniteLossEvents.STEP_SKIPPED, self._skipped)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._completed)

    def _reset_run(self, engine: Engine) -> None:
        engine.state.skipped_steps = 0
        engine.state.epoch_skipped_steps = 0

    def _reset_epoch(self, engine: Engine) -> None:
        engine.state.epoch_skipped_steps = 0

    def _skipped(self, engine: Engine) -> None:
        engine.state.epoch_skipped_steps += 1
        self.consecutive += 1
        self.logger.warning(
            f"non-finite loss or gradient at epoch {engine.state.epoch}, iteration {engine.state.iteration}: "
            f"step skipped ({engine.state.skipped_steps} skipped in this run)"
        )
        if self.max_consecutive is not None and self.consecutive >= self.max_consecutive:
            raise RuntimeError(
                f"{self.consecutive} consecutive training steps had a non-finite loss or gradient: training diverged "
                f"(lower the learning rate or switch amp_dtype to bfloat16/None)."
            )

    def _completed(self, engine: Engine) -> None:
        if not engine.state.output.get("skipped", False):
            self.consecutive = 0
