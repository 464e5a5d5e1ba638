"""Ignite handlers: staged freezing, non-finite-loss guard, per-epoch report, checkpoints, resume, run state and
grade calibration."""

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
from medsegdiff_monai.handlers.run_state import (
    RUN_FILENAME,
    RandomState,
    RunFolderError,
    check_checkpoint_readable,
    datalist_digest,
    prepare_run_folder,
    prune_checkpoints,
    run_fingerprint,
)
from medsegdiff_monai.handlers.staged_training import StagedTraining
from medsegdiff_monai.handlers.validation import EpochValidation
