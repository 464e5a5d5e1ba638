"""Ignite handler fitting the grade calibration on the validation split after training and storing it in model.pt."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.utils import evenly_divisible_all_gather
from sklearn.metrics import roc_auc_score

from medsegdiff_monai.handlers.checkpoint import validation_score
from medsegdiff_monai.networks.calibration import GradeCalibration, fit_platt_scaling
from medsegdiff_monai.networks.checkpoint import extract_network_state
from medsegdiff_monai.utils import unwrap_module

__all__ = ["GradeCalibrationFit"]

_KEYS = ("grade_calibration.scale", "grade_calibration.bias")


def _nll(log_odds: np.ndarray, grades: np.ndarray) -> float:
    """Mean binary cross-entropy of ``sigmoid(log_odds)`` against ``grades``."""
    return float(np.mean(np.logaddexp(0.0, log_odds) - grades * log_odds))


def _grade_summary(log_odds: np.ndarray, grades: np.ndarray) -> str:
    """``p(HGG) LGG a-b, HGG c-d, Acc e, NLL f``: the ranges of p per true grade and the accuracy at p >= 0.5."""
    p = 1.0 / (1.0 + np.exp(-log_odds))
    ranges = ", ".join(
        f"{name} {p[grades == index].min():.3f}-{p[grades == index].max():.3f}"
        for index, name in ((0, "LGG"), (1, "HGG"))
    )
    accuracy = float(np.mean((p >= 0.5) == (grades == 1)))
    return f"p(HGG) {ranges}, Acc {accuracy:.2f}, NLL {_nll(log_odds, grades):.4f}"


def _described(state: Mapping[str, torch.Tensor]) -> str:
    """The calibration a network state holds, in words: the identity, or its scale and bias."""
    if not all(key in state for key in _KEYS):
        return "the identity"
    scale, bias = (float(state[key]) for key in _KEYS)
    return (
        "the identity"
        if (scale, bias) == (1.0, 0.0)
        else f"the calibration it holds (scale={scale:.4f} bias={bias:.4f})"
    )


class GradeCalibrationFit:
    """Fit the Platt scaling of the grade on the validation subjects of the best epoch and write it into the best
    network file, so that every later use of that file (inference, ``grades.csv``, evaluation) is calibrated.

    During training it keeps, from the evaluator's iteration outputs, the subject-level log-odds
    (``"grade_log_odds"``, the mean slice log-odds of :func:`~medsegdiff_monai.inferers.subject_p_hgg`) and grades
    of the validation epoch with the best ``score_function`` (the same score as the best-checkpoint selection, a
    strictly better score replacing the kept one, as Ignite's ``Checkpoint`` does). When training completes it fits
    ``(scale, bias)`` with :func:`~medsegdiff_monai.networks.fit_platt_scaling` on those subjects only (never the
    training or test subjects), composes it with the calibration already in the file, and rewrites the file's
    ``grade_calibration.scale`` / ``.bias`` atomically (a temporary file renamed into place). It logs the scale and
    bias, and the validation p(HGG) range per grade, accuracy at 0.5 and NLL before and after (in-sample figures:
    held-out ones come from evaluating the ``testing`` split). With fewer than ``min_subjects`` graded validation
    subjects, or a single grade among them, it leaves the identity and logs why. Under DDP the log-odds of all ranks
    are gathered and only rank 0 writes.

    The decision threshold stays p(HGG) >= 0.5 on the calibrated probability (equal costs of both errors); the
    calibration moves the probabilities, not the threshold.

    A resumed run fits on the same subjects as an uninterrupted one: the kept epoch's score and log-odds are the
    handler's ``state_dict``, which the training checkpoint holds (attach the handler before the checkpoint saver, so
    that each epoch's checkpoint includes that epoch). With ``network``, the fit happens once per run: when the best
    network file's calibration already differs from the network's own (the buffers that training never changes),
    the file holds this run's fit, and re-running a finished run leaves it as it is.

    Args:
        evaluator: the validation engine (a :class:`~medsegdiff_monai.engines.DiffusionEvaluator`).
        best_path: the best network file written by the checkpoint saver (e.g. ``models/model.pt``).
        score_names: the checkpoint-selection figures (see :func:`~medsegdiff_monai.handlers.validation_score`).
        min_subjects: fewest graded validation subjects to fit on.
        min_auc: the identity is kept when the head's AUC over those subjects is at most this (0.5: no better than
            chance, where the positive Platt scale would fall to about 0 and give every subject the same p(HGG)); a
            negative value fits whatever the ranking.
        network: the trained network, to tell a fitted best network file from one still to fit (None: always fit).
        name: logger name.
    """

    def __init__(
        self,
        evaluator: Engine,
        best_path: str | Path,
        score_names: Sequence[str] = ("Dice", "-Brier"),
        min_subjects: int = 4,
        network: torch.nn.Module | None = None,
        name: str = "medsegdiff_monai",
        min_auc: float = 0.5,
    ) -> None:
        self.evaluator = evaluator
        self.min_auc = min_auc
        self.best_path = Path(best_path)
        self.network = network
        self.score_function: Callable[[Mapping], float] = lambda metrics: validation_score(metrics, score_names)
        self.min_subjects = min_subjects
        self.logger = logging.getLogger(name)
        self._epoch_log_odds: list[torch.Tensor] = []
        self._epoch_grades: list[torch.Tensor] = []
        self.best_score = -math.inf
        self.best: tuple[np.ndarray, np.ndarray] | None = None

    def attach(self, engine: Engine) -> None:
        """Attach to the trainer (after the validation handler) and to the evaluator."""
        self.evaluator.add_event_handler(Events.EPOCH_STARTED, self._reset)
        self.evaluator.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._keep_if_best)
        engine.add_event_handler(Events.COMPLETED, self._fit_and_store)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The kept epoch's score and, once an epoch is kept, its subjects' log-odds and grades (float64)."""
        state = {"best_score": torch.tensor(self.best_score, dtype=torch.float64)}
        if self.best is not None:
            state["log_odds"], state["grades"] = (torch.from_numpy(values) for values in self.best)
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned (a resumed run)."""
        self.best_score = float(state["best_score"])
        self.best = (state["log_odds"].numpy(), state["grades"].numpy()) if "log_odds" in state else None

    def _reset(self, _: Engine) -> None:
        self._epoch_log_odds.clear()
        self._epoch_grades.clear()

    def _collect(self, evaluator: Engine) -> None:
        output = evaluator.state.output
        if "grade_log_odds" in output:
            self._epoch_log_odds.append(output["grade_log_odds"].detach().cpu().double().view(-1))
            self._epoch_grades.append(output["grade"].detach().cpu().double().view(-1))

    def _keep_if_best(self, _: Engine) -> None:
        if not self._epoch_log_odds:
            return
        score = self.score_function(self.evaluator.state.metrics)
        if score > self.best_score:
            self.best_score = score
            # ranks may hold different numbers of validation subjects
            log_odds = evenly_divisible_all_gather(torch.cat(self._epoch_log_odds), concat=True)
            grades = evenly_divisible_all_gather(torch.cat(self._epoch_grades), concat=True)
            self.best = (log_odds.cpu().numpy(), grades.cpu().numpy())

    def _fit_and_store(self, _: Engine) -> None:
        if idist.get_rank() != 0:
            return
        if self.best is None:
            self.logger.warning("grade calibration: no validation grade was recorded; the identity is kept.")
            return
        log_odds, grades = self.best
        finite = np.isfinite(log_odds)
        log_odds, grades = log_odds[finite], grades[finite]
        n_lgg, n_hgg = int((grades == 0).sum()), int((grades == 1).sum())
        if n_lgg + n_hgg < self.min_subjects or min(n_lgg, n_hgg) == 0:
            self.logger.warning(
                f"grade calibration: {n_lgg} LGG and {n_hgg} HGG validation subjects (need both grades and at least "
                f"{self.min_subjects}); the identity is kept."
            )
            return
        if not self.best_path.is_file():
            self.logger.warning(f"grade calibration: {self.best_path} does not exist; nothing calibrated.")
            return
        checkpoint = torch.load(self.best_path, map_location="cpu", weights_only=True)
        state = extract_network_state(checkpoint)
        if self._already_fitted(state):
            self.logger.info(f"grade calibration: {self.best_path} already holds this run's fitted calibration.")
            return
        ranking = float(roc_auc_score(grades, log_odds))  # both grades are present (checked above)
        if ranking <= self.min_auc:
            self.logger.warning(
                f"grade calibration: the grade head ranks the {n_lgg} LGG + {n_hgg} HGG validation subjects of the "
                f"best epoch with AUC {ranking:.2f}, at most min_auc={self.min_auc} (0.5: chance), so none is fitted "
                "(calibrating a head that ranks no better than chance gives every subject about the same p(HGG)): "
                f"{self.best_path} keeps {_described(state)}. The grade figures of this network are not meaningful: "
                "train the grade stages longer, or check the grades of the datalist."
            )
            return
        scale, bias = fit_platt_scaling(log_odds, grades)
        calibration = GradeCalibration()
        if all(key in state for key in _KEYS):
            calibration.set(float(state[_KEYS[0]]), float(state[_KEYS[1]]))
        calibration.compose(scale, bias)
        for key, value in zip(_KEYS, (calibration.scale, calibration.bias), strict=True):
            state[key] = value.clone()
        partial = self.best_path.with_name(f".{self.best_path.name}.partial")
        torch.save(state, partial)
        os.replace(partial, self.best_path)
        self.logger.info(
            f"grade calibration fitted on {n_lgg} LGG + {n_hgg} HGG validation subjects of the best epoch: "
            f"scale={float(calibration.scale):.4f} bias={float(calibration.bias):.4f}, written to {self.best_path}"
        )
        self.logger.info(f"  before: {_grade_summary(log_odds, grades)}")
        self.logger.info(f"  after:  {_grade_summary(scale * log_odds + bias, grades)} (decision at p >= 0.5)")

    def _already_fitted(self, state: Mapping[str, torch.Tensor]) -> bool:
        """Whether the best network file's calibration differs from the network's own, i.e. the fit was stored."""
        if self.network is None or not all(key in state for key in _KEYS):
            return False
        own = unwrap_module(self.network).state_dict()
        return any(key in own and not torch.equal(state[key].cpu(), own[key].cpu()) for key in _KEYS)
