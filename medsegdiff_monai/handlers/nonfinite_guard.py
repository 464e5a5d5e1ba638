"""Ignite handler reporting (and bounding) training steps skipped for a non-finite loss."""

from __future__ import annotations

import logging

from ignite.engine import Engine

from medsegdiff_monai.engines.trainer import NonFiniteLossEvents

__all__ = ["NonFiniteLossGuard"]


class NonFiniteLossGuard:
    """Report the steps :class:`DiffusionTrainer` skipped because the loss or gradient was not finite, and stop a run
    that keeps skipping.

    The trainer itself never applies such a step, so no NaN reaches the weights or a checkpoint, and counts them in
    ``engine.state.skipped_steps`` (the run), ``engine.state.epoch_skipped_steps`` (the current epoch) and
    ``engine.state.consecutive_skipped_steps``. This handler logs each skip with its epoch, iteration and the subjects
    of its batch, and stops the run with an error after ``max_consecutive`` skips in a row (a diverged run is not
    worth continuing).

    Args:
        max_consecutive: consecutive skipped steps that end the run (None: never).
        name: logger name.
    """

    def __init__(self, max_consecutive: int | None = 50, name: str = "medsegdiff_monai") -> None:
        self.max_consecutive = max_consecutive
        self.logger = logging.getLogger(name)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(NonFiniteLossEvents.STEP_SKIPPED, self._skipped)

    def _skipped(self, engine: Engine) -> None:
        epoch, iteration = engine.state.skipped_step
        consecutive = engine.state.consecutive_skipped_steps
        subjects = sorted(set(getattr(engine.state, "skipped_subject_ids", ())))
        batch = f" (batch of {', '.join(subjects)}: check their files with medsegdiff-monai check)" if subjects else ""
        self.logger.warning(
            f"non-finite loss or gradient at epoch {epoch}, iteration {iteration}{batch}: "
            f"step skipped ({engine.state.skipped_steps} skipped in this run)"
        )
        if self.max_consecutive is not None and consecutive >= self.max_consecutive:
            raise RuntimeError(
                f"{consecutive} consecutive training steps had a non-finite loss or gradient: training diverged "
                f"(lower the learning rate or switch amp_dtype to bfloat16/None)."
            )
