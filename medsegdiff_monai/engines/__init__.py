"""Ignite/MONAI engines: the diffusion trainer, the whole-volume evaluator, the stage plan, the optimizer."""

from medsegdiff_monai.engines.evaluator import REGION_NAMES, DiffusionEvaluator, validation_metrics
from medsegdiff_monai.engines.optimizer import build_optimizer, count_parameters
from medsegdiff_monai.engines.stages import (
    LOSS_NAMES,
    TRAINABLE_PARTS,
    TrainingStage,
    current_stage_spelling,
    parse_stages,
    stage_at_epoch,
    total_epochs,
    trained_log_sigmas,
)
from medsegdiff_monai.engines.trainer import DiffusionTrainer, NoisyMaskPrepareBatch, NonFiniteLossEvents
