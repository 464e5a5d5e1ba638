"""Ignite handlers: staged freezing, non-finite guard, epoch report, checkpoints and resume, grade calibration."""

from medsegdiff_monai.handlers.calibration import GradeCalibrationFit
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
