"""Ignite handlers: staged freezing, non-finite-loss guard, per-epoch report, checkpoints and resume."""

from medsegdiff_monai.handlers.checkpoint import (
    LoadNetworkWeights,
    ResumeFromCheckpoint,
    TrainingCheckpointSaver,
    latest_checkpoint,
    validation_score,
)
from medsegdiff_monai.handlers.epoch_report import REPORT_COLUMNS, EpochReport
from medsegdiff_monai.handlers.nonfinite_guard import NonFiniteLossGuard
from medsegdiff_monai.handlers.staged_training import StagedTraining
