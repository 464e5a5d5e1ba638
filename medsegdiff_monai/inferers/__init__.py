"""Diffusion sampling and whole-volume inference: the sampler, its schedulers and slice-by-slice volume sampling."""

from __future__ import annotations

from medsegdiff_monai.inferers.sampler import (
    SAMPLING_SCHEDULERS,
    DiffusionSampler,
    SamplerOutput,
    check_noise_schedule,
    make_sampling_scheduler,
    repeat_condition,
)
from medsegdiff_monai.inferers.schedulers import DPMSolverMultistepScheduler
from medsegdiff_monai.inferers.volume import (
    VolumeOutput,
    balanced_batch_size,
    brain_slice_mask,
    default_slice_batch_size,
    sample_volume,
    slice_batch_size_for_memory,
    subject_p_hgg,
)
from medsegdiff_monai.utils import moved_names

__all__ = [
    "SAMPLING_SCHEDULERS",
    "DPMSolverMultistepScheduler",
    "DiffusionSampler",
    "SamplerOutput",
    "VolumeOutput",
    "balanced_batch_size",
    "brain_slice_mask",
    "check_noise_schedule",
    "default_slice_batch_size",
    "make_sampling_scheduler",
    "repeat_condition",
    "sample_volume",
    "slice_batch_size_for_memory",
    "subject_p_hgg",
]

_MOVED = {
    **dict.fromkeys(("extract_network_state", "load_network_weights"), "medsegdiff_monai.networks"),
    **dict.fromkeys(("label_overlay", "tumour_slice", "write_overlay_png", "write_png"), "medsegdiff_monai.visualize"),
    **dict.fromkeys(
        (
            "BratsVolumeInferer",
            "ExportedDiffusionNetwork",
            "SubjectOutput",
            "SubjectPrediction",
            "check_inference_inputs",
            "check_inference_run",
            "check_no_earlier_outputs",
            "collect_inference_inputs",
            "export_from_checkpoint",
            "export_network",
            "exported_program_paths",
            "load_exported_network",
            "resolve_entries",
            "run_evaluation",
            "write_grades_csv",
            "write_nifti_like",
        ),
        "medsegdiff_monai.workflows",
    ),
}
"""Names that moved out of this package, and the package that holds each now (old paths work for one release)."""

__getattr__ = moved_names(__name__, {name: f"{package}.{name}" for name, package in _MOVED.items()})
