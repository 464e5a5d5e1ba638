"""Homoscedastic-uncertainty weighting of several task losses (Kendall, Gal & Cipolla, CVPR 2018)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from medsegdiff_monai.utils import rename_state_dict_keys, warn_renamed

__all__ = ["UncertaintyWeightedLoss"]

_OLD_GRADE_TASK = "cls"


def _current_task_name(task: str) -> str:
    """``"grade"`` for the old task name ``"cls"`` (with a warning), any other name unchanged."""
    if task != _OLD_GRADE_TASK:
        return task
    warn_renamed("the UncertaintyWeightedLoss task name 'cls'", "'grade'")
    return "grade"


class UncertaintyWeightedLoss(nn.Module):
    """
    ``L_total = sum_t ( 0.5 * exp(-2 s_t) * L_t + s_t )`` over the tasks present in the call, with a learnable
    ``s_t = log sigma_t`` per task (Kendall et al., "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
    Geometry and Semantics", CVPR 2018, https://arxiv.org/abs/1705.07115).

    ``s_t`` is clamped to ``log_sigma_bounds`` in forward (its gradient is zero outside the bounds), which stops a
    task from being switched off (sigma -> inf) or blown up. Each ``s_t`` is a separate ``nn.Parameter``
    (``log_sigmas.<task>``), so a training stage can freeze one and train the other; they are saved in the state dict.

    The grade task was called ``"cls"`` before: that task name (in ``tasks`` and in the losses of a call) and the
    state-dict key ``log_sigmas.cls`` of older checkpoints are read as ``"grade"``, with a ``DeprecationWarning``,
    for one release.

    Args:
        tasks: task names, e.g. ``("seg", "grade")``.
        init_log_sigma: initial value of every ``s_t`` (0: weight 0.5 on each loss).
        log_sigma_bounds: (min, max) of ``s_t``.

    Example:
        >>> weighting = UncertaintyWeightedLoss(("seg", "grade"))
        >>> weighting({"seg": torch.tensor(0.8), "grade": None})  # a stage without the grade loss
    """

    def __init__(
        self,
        tasks: Sequence[str] = ("seg", "grade"),
        init_log_sigma: float = 0.0,
        log_sigma_bounds: tuple[float, float] = (-3.0, 3.0),
    ) -> None:
        super().__init__()
        tasks = tuple(_current_task_name(task) for task in tasks)
        if len(tasks) == 0 or len(set(tasks)) != len(tasks):
            raise ValueError(f"UncertaintyWeightedLoss needs distinct task names, got {tuple(tasks)}.")
        low, high = log_sigma_bounds
        if not low <= init_log_sigma <= high:
            raise ValueError(f"init_log_sigma {init_log_sigma} must lie within log_sigma_bounds {log_sigma_bounds}.")
        self.tasks = tuple(tasks)
        self.log_sigma_bounds = (float(low), float(high))
        self.log_sigmas = nn.ParameterDict(
            {task: nn.Parameter(torch.tensor(float(init_log_sigma))) for task in self.tasks}
        )
        if "grade" in self.tasks:  # checkpoints written when the grade task was called "cls"
            rename_state_dict_keys(self, {f"log_sigmas.{_OLD_GRADE_TASK}": "log_sigmas.grade"})

    def clamped_log_sigma(self, task: str) -> torch.Tensor:
        """``s_t`` clamped to the bounds (0-d tensor)."""
        return self.log_sigmas[task].clamp(*self.log_sigma_bounds)

    def forward(self, losses: Mapping[str, torch.Tensor | None]) -> torch.Tensor:
        """
        Args:
            losses: scalar loss per task name; a task that is absent or None is skipped (a stage without it).

        Returns:
            the weighted total (scalar).
        """
        if _OLD_GRADE_TASK in losses and _OLD_GRADE_TASK not in self.tasks:
            losses = {_current_task_name(task): loss for task, loss in losses.items()}
        unknown = set(losses) - set(self.tasks)
        if unknown:
            raise ValueError(
                f"UncertaintyWeightedLoss got losses for unknown tasks {sorted(unknown)}; knows {self.tasks}."
            )
        terms = []
        for task in self.tasks:
            loss = losses.get(task)
            if loss is None:
                continue
            log_sigma = self.clamped_log_sigma(task)
            terms.append(0.5 * torch.exp(-2.0 * log_sigma) * loss + log_sigma)
        if not terms:
            raise ValueError(f"UncertaintyWeightedLoss needs at least one loss among {self.tasks}, got none.")
        return torch.stack(terms).sum()

    def sigmas(self) -> dict[str, float]:
        """``sigma_t = exp(clamped s_t)`` per task, as Python floats (for printing and logging)."""
        return {task: float(self.clamped_log_sigma(task).detach().exp()) for task in self.tasks}

    def log_sigma_parameters(self) -> list[nn.Parameter]:
        """The ``s_t`` parameters in task order (for a no-weight-decay optimizer group)."""
        return [self.log_sigmas[task] for task in self.tasks]
