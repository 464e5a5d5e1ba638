"""Slice-by-slice diffusion sampling of a whole volume, with a subject-level grade."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from medsegdiff_monai.inferers.sampler import DiffusionSampler
from medsegdiff_monai.networks.calibration import logit

__all__ = [
    "VolumeOutput",
    "balanced_batch_size",
    "brain_slice_mask",
    "default_slice_batch_size",
    "sample_volume",
    "slice_batch_size_for_memory",
    "subject_p_hgg",
]

# a compiled sampler's batch sizes are multiples of this, so that a few compiled shapes serve every volume
STATIC_BATCH_MULTIPLE = 8


class VolumeOutput(NamedTuple):
    """What :func:`sample_volume` returns for one subject with ``C`` mask channels.

    Attributes:
        probs: (C, H, W, D) mean member probability; 0 on slices without brain.
        uncertainty: (C, H, W, D) per-voxel std across members; 0 on slices without brain.
        p_hgg: subject-level probability of HGG (see :func:`subject_p_hgg`), or ``None`` without a
            classification head.
        slice_p_hgg: (D,) per-slice p(HGG), NaN on slices without brain, or ``None`` without a head.
    """

    probs: Tensor
    uncertainty: Tensor
    p_hgg: float | None
    slice_p_hgg: Tensor | None


def brain_slice_mask(image: Tensor, brain_threshold: float = 0.0) -> Tensor:
    """Axial slices that hold brain: some channel has a voxel with ``|value| > brain_threshold``.

    Args:
        image: (channels, H, W, D) volume; after z-scoring over brain voxels the background stays exactly 0.
        brain_threshold: absolute intensity at or below which a voxel counts as background.

    Returns:
        (D,) bool tensor.
    """
    return (image.abs() > brain_threshold).flatten(0, 2).any(dim=0)


def default_slice_batch_size(
    device: torch.device | str, roi_size: Sequence[int], gpu_slices: int = 32, cpu_pixels: int = 4 * 64 * 64
) -> int:
    """Slices per sampler call for :func:`sample_volume`: ``gpu_slices`` on a GPU; on a CPU the most slices whose
    ``slices * H * W`` stays within ``cpu_pixels``, and at least one.

    On a CPU a large batch does not pay: once a call's activations outgrow what the C allocator keeps for reuse
    (tens of MB), every call faults their pages in again, as much system time as computing. At roi 192 one slice
    (5 members) per call runs 1.9 times faster per input than 4; at roi 64, 4 slices per call cost the same per input
    as 1 (``docs/inference.md``, CPU).

    Args:
        device: where the network runs.
        roi_size: the in-plane ``(H, W)`` of the slices.
        gpu_slices: the value on a CUDA device.
        cpu_pixels: the in-plane pixels of one call's slices on a CPU (the default: 4 slices at 64 x 64).
    """
    if torch.device(device).type == "cuda":
        return gpu_slices
    return max(1, cpu_pixels // math.prod(roi_size))


def slice_batch_size_for_memory(
    device: torch.device | str,
    roi_size: Sequence[int],
    ensemble_size: int,
    bytes_per_input_pixel: int = 3584,
    memory_fraction: float = 0.6,
    max_slices: int = 68,
) -> int:
    """Slices per sampler call on a GPU: the most whose sampling fits in ``memory_fraction`` of the device's free
    memory, at most ``max_slices``; on any other device :func:`default_slice_batch_size`.

    A call samples ``slices * ensemble_size`` network inputs of ``H * W`` pixels, and its peak memory grows with
    them: the ``base`` preset in bf16 at roi 192, ensemble 5, peaked at 35.5 GiB with 68 slices, 13.4 GiB with 23
    and 9.5 GiB with 16, eager, on an H100 (3,040 to 3,450 bytes per input pixel; the default rounds up). Larger
    calls fill the GPU better (a volume of 136 brain slices took 4.31 s at 68 and 4.66 s at 16, compiled), so on an
    idle 80 GB card this gives 68 and on an idle 24 GB card 23 (``docs/inference.md``, Speed and agreement). Memory
    that other processes hold is left to them.

    Args:
        device: where the network runs.
        roi_size: the in-plane ``(H, W)`` of the slices.
        ensemble_size: members sampled per slice.
        bytes_per_input_pixel: peak memory per network input pixel of one call.
        memory_fraction: the share of the device's free memory a call may take.
        max_slices: the largest batch returned.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return default_slice_batch_size(device, roi_size)
    free_bytes, _ = torch.cuda.mem_get_info(device)
    budget = memory_fraction * free_bytes
    slices = int(budget // (ensemble_size * math.prod(roi_size) * bytes_per_input_pixel))
    return max(1, min(max_slices, slices))


def subject_p_hgg(slice_p_hgg: Tensor, tumour_slices: Tensor) -> float:
    """Subject-level p(HGG): the sigmoid of the mean slice log-odds over the tumour-bearing slices.

    Slices are pooled as evidence, not as votes: ``p = sigmoid(mean_s logit(p_s))``. Averaging probabilities
    instead pulls every subject towards 0.5 (one confident slice among many uncertain ones counts for little), and
    the mean log-odds is what the grade calibration (:class:`~medsegdiff_monai.networks.GradeCalibration`, affine in
    the log-odds) is fitted on. Slices without predicted tumour carry no grade evidence and are left out; when no
    slice is tumour-bearing all given slices are used; NaN (with a warning) when no slice is given. This one function
    grades subjects in validation, inference (``grades.csv``) and evaluation.

    Args:
        slice_p_hgg: (S,) p(HGG) of the slices that hold brain (after the network's grade calibration).
        tumour_slices: (S,) bool, slices where the model predicts tumour.
    """
    if slice_p_hgg.numel() == 0:
        warnings.warn("no brain slice to grade: subject-level p_hgg is NaN.", stacklevel=2)
        return math.nan
    chosen = slice_p_hgg[tumour_slices] if bool(tumour_slices.any()) else slice_p_hgg
    return float(torch.sigmoid(logit(chosen).mean()))


def balanced_batch_size(count: int, max_batch_size: int, multiple: int = 1) -> int:
    """
    Slices per batch when ``count`` slices run in the fewest batches of at most ``max_batch_size``: batches as equal
    as they can be, the size rounded up to a multiple of ``multiple`` but not past ``max_batch_size``. E.g. 140
    slices, at most 68 per batch: 47 (3 batches of 47, 47, 46), or 48 with ``multiple`` 8, instead of 68, 68, 4.

    Args:
        count: number of slices, >= 0.
        max_batch_size: the largest batch, >= 1.
        multiple: the size's granularity, >= 1.
    """
    if count == 0:
        return max_batch_size
    size = math.ceil(count / math.ceil(count / max_batch_size))
    return min(max_batch_size, math.ceil(size / multiple) * multiple)


def sample_volume(
    network: nn.Module,
    image: Tensor,
    sampler: DiffusionSampler,
    slice_batch_size: int | None = None,
    brain_threshold: float = 0.0,
    tumour_threshold: float = 0.5,
    progress: bool = False,
) -> VolumeOutput:
    """
    Segment one subject slice by slice with ``sampler`` and grade it.

    Axial slices without brain (see :func:`brain_slice_mask`) are skipped and get probability 0 and uncertainty 0.
    The others run in the fewest batches of at most ``slice_batch_size`` slices, of equal size
    (:func:`balanced_batch_size`; ``size * ensemble_size`` network inputs per step, members and slices in one batch,
    the condition features computed once per slice). With a compiled sampler (``sampler.compile``) the size is
    rounded up to a multiple of :data:`STATIC_BATCH_MULTIPLE` (at most ``slice_batch_size``) and every batch has
    exactly that many slices, the last one padded with copies of its last slice whose results are dropped, so a few
    compiled shapes serve every batch of every volume; without it the last batch is just shorter (no padded work).
    One random generator (seeded by ``sampler.seed``) serves the whole volume. A slice is tumour-bearing when some
    voxel's probability exceeds ``tumour_threshold`` in any channel (for the nested BraTS regions this is the whole
    tumour); the subject's p(HGG) pools those slices (:func:`subject_p_hgg`: the sigmoid of their mean log-odds), or
    all brain slices when the model finds no tumour.

    Args:
        network: the diffusion network (``encode_condition`` / ``denoise``), in the mode the caller chose.
        image: (4, H, W, D) one subject after the inference / validation transforms.
        sampler: the :class:`DiffusionSampler`.
        slice_batch_size: the most slices per sampler call; None: :func:`default_slice_batch_size` of the image's
            device and in-plane size.
        brain_threshold: see :func:`brain_slice_mask`.
        tumour_threshold: probability above which a voxel counts as tumour when choosing slices to grade.
        progress: show a tqdm bar over slice batches.

    Returns:
        :class:`VolumeOutput`, tensors on ``image.device``.
    """
    in_channels = getattr(network, "in_channels", None)
    if image.ndim != 4 or image.shape[0] != (in_channels or image.shape[0]):
        raise ValueError(
            f"image must have shape ({in_channels or 'channels'}, H, W, D) (one channel per modality), got "
            f"{tuple(image.shape)}."
        )
    if slice_batch_size is None:
        slice_batch_size = default_slice_batch_size(image.device, image.shape[1:3])
    if slice_batch_size < 1:
        raise ValueError(f"slice_batch_size must be >= 1, got {slice_batch_size}.")
    depth = image.shape[-1]
    brain_index = torch.nonzero(brain_slice_mask(image, brain_threshold)).flatten().tolist()
    slices = image.permute(3, 0, 1, 2)
    generator = sampler.make_generator(image.device)
    probs: Tensor | None = None
    uncertainty: Tensor | None = None
    slice_p_hgg: Tensor | None = None
    multiple = STATIC_BATCH_MULTIPLE if sampler.compile else 1
    batch_size = balanced_batch_size(len(brain_index), slice_batch_size, multiple)
    batches = [brain_index[i : i + batch_size] for i in range(0, len(brain_index), batch_size)]
    for batch_index in tqdm(batches, desc="slices", unit="batch", disable=not progress, leave=False):
        padding = [batch_index[-1]] * (batch_size - len(batch_index)) if sampler.compile else []
        out = sampler(network, slices[batch_index + padding], generator=generator)
        if probs is None or uncertainty is None:
            shape = (depth, *out.probs.shape[1:])
            probs = out.probs.new_zeros(shape)
            uncertainty = out.probs.new_zeros(shape)
        count = len(batch_index)
        probs[batch_index] = out.probs[:count]
        uncertainty[batch_index] = out.uncertainty[:count]
        if out.p_hgg is not None:
            if slice_p_hgg is None:
                slice_p_hgg = out.p_hgg.new_full((depth,), math.nan)
            slice_p_hgg[batch_index] = out.p_hgg[:count]
    if probs is None or uncertainty is None:
        return _empty_volume_output(network, image)
    p_hgg = None
    if slice_p_hgg is not None:
        tumour_slices = (probs[brain_index] > tumour_threshold).flatten(1).any(dim=1)
        p_hgg = subject_p_hgg(slice_p_hgg[brain_index], tumour_slices)
    return VolumeOutput(
        probs=probs.permute(1, 2, 3, 0),
        uncertainty=uncertainty.permute(1, 2, 3, 0),
        p_hgg=p_hgg,
        slice_p_hgg=slice_p_hgg,
    )


def _empty_volume_output(network: nn.Module, image: Tensor) -> VolumeOutput:
    """Output for a volume without any brain slice: zeros, and NaN p(HGG) when the network grades."""
    with torch.no_grad():  # one blank slice tells the mask channels and whether the network grades (depth may be 0)
        condition = network.encode_condition(image.new_zeros((1, *image.shape[:3])))
    channels = condition.calib_map.shape[1]
    zeros = image.new_zeros((channels, *image.shape[1:]))
    has_head = condition.grade_logits is not None
    p_hgg = subject_p_hgg(image.new_zeros(0), image.new_zeros(0, dtype=torch.bool)) if has_head else None
    slice_p_hgg = image.new_full((image.shape[-1],), math.nan) if has_head else None
    return VolumeOutput(probs=zeros, uncertainty=zeros.clone(), p_hgg=p_hgg, slice_p_hgg=slice_p_hgg)
