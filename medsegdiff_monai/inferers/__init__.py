"""Diffusion sampling, whole-volume inference and subject-level grading."""

from medsegdiff_monai.inferers.sampler import DiffusionSampler, SamplerOutput, repeat_condition
from medsegdiff_monai.inferers.volume import VolumeOutput, brain_slice_mask, sample_volume, subject_p_hgg

__all__ = [
    "DiffusionSampler",
    "SamplerOutput",
    "VolumeOutput",
    "brain_slice_mask",
    "repeat_condition",
    "sample_volume",
    "subject_p_hgg",
]
