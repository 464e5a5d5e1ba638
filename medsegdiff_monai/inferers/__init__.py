"""Diffusion sampling, whole-volume inference, subject-level grading, export and evaluation."""

from medsegdiff_monai.inferers.checkpoint import extract_network_state, load_network_weights
from medsegdiff_monai.inferers.evaluation import run_evaluation
from medsegdiff_monai.inferers.export import (
    ExportedDiffusionNetwork,
    export_from_checkpoint,
    export_network,
    exported_program_paths,
    load_exported_network,
)
from medsegdiff_monai.inferers.inputs import check_inference_inputs, collect_inference_inputs, resolve_entries
from medsegdiff_monai.inferers.pipeline import (
    BratsVolumeInferer,
    SubjectOutput,
    SubjectPrediction,
    check_inference_run,
    check_no_earlier_outputs,
)
from medsegdiff_monai.inferers.sampler import (
    SAMPLING_SCHEDULERS,
    DiffusionSampler,
    SamplerOutput,
    make_sampling_scheduler,
    repeat_condition,
)
from medsegdiff_monai.inferers.schedulers import DPMSolverMultistepScheduler
from medsegdiff_monai.inferers.volume import VolumeOutput, brain_slice_mask, sample_volume, subject_p_hgg
from medsegdiff_monai.inferers.writers import (
    label_overlay,
    tumour_slice,
    write_grades_csv,
    write_nifti_like,
    write_overlay_png,
    write_png,
)

__all__ = [
    "SAMPLING_SCHEDULERS",
    "BratsVolumeInferer",
    "DPMSolverMultistepScheduler",
    "DiffusionSampler",
    "ExportedDiffusionNetwork",
    "SamplerOutput",
    "SubjectOutput",
    "SubjectPrediction",
    "VolumeOutput",
    "brain_slice_mask",
    "check_inference_inputs",
    "check_inference_run",
    "check_no_earlier_outputs",
    "collect_inference_inputs",
    "export_from_checkpoint",
    "export_network",
    "exported_program_paths",
    "extract_network_state",
    "label_overlay",
    "load_exported_network",
    "load_network_weights",
    "make_sampling_scheduler",
    "repeat_condition",
    "resolve_entries",
    "run_evaluation",
    "sample_volume",
    "subject_p_hgg",
    "tumour_slice",
    "write_grades_csv",
    "write_nifti_like",
    "write_overlay_png",
    "write_png",
]
