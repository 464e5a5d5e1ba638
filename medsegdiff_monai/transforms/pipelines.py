"""Transform chains for training (2D axial slices), validation and inference (whole volumes).

All chains start with the same deterministic volume-level steps: load the four modalities and the label (nibabel,
through :class:`~medsegdiff_monai.data.ThreadSafeNibabelReader`, which the threads of a
:class:`monai.data.CacheDataset` fill can share), channel first, RAS orientation, label values checked and turned into
nested regions (TC, WT, ET), subject id and grade attached, crop to the brain's bounding box, z-score per channel over
brain voxels. In training these are followed only by random steps, so :class:`monai.data.CacheDataset` keeps the
decoded, cropped, normalised volume and each epoch only draws slices and augments them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import (
    CastToTyped,
    Compose,
    ConvertToMultiChannelBasedOnBratsClassesd,
    CropForegroundd,
    DivisiblePadd,
    EnsureChannelFirstd,
    EnsureTyped,
    FgBgToIndicesd,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ResizeWithPadOrCropd,
    SpatialPadd,
    SqueezeDimd,
)
from monai.transforms.transform import Transform

from medsegdiff_monai.data.nifti_reader import ThreadSafeNibabelReader
from medsegdiff_monai.transforms.compose import UntrackedTailCompose
from medsegdiff_monai.transforms.grade import AttachGraded
from medsegdiff_monai.transforms.mask import MaskToSymmetricd
from medsegdiff_monai.transforms.regions import CheckBratsLabelsd
from medsegdiff_monai.transforms.subject import SubjectIdd

__all__ = ["get_inference_transforms", "get_train_transforms", "get_val_transforms", "volume_transforms"]

IMAGE, LABEL, MASK, GRADE, SUBJECT = "image", "label", "mask", "grade", "subject_id"


def _check_roi(roi_size: Sequence[int]) -> tuple[int, int]:
    roi = tuple(int(s) for s in roi_size)
    if len(roi) != 2 or min(roi) < 1:
        raise ValueError(f"roi_size must be two positive in-plane sizes (H, W), got {roi_size}.")
    return roi


def volume_transforms(label_optional: bool = False) -> list[Transform]:
    """The deterministic volume-level steps shared by every chain.

    Output per sample: ``image`` (4, X, Y, Z) float32 z-scored over brain voxels (0 outside), ``label``
    (3, X, Y, Z) uint8 regions TC, WT, ET, ``grade`` scalar long tensor, ``subject_id`` str, where (X, Y, Z) is the
    brain's bounding box in RAS orientation.

    Args:
        label_optional: allow samples without ``label`` / ``grade`` (inference).
    """
    keys = [IMAGE, LABEL]
    return [
        LoadImaged(keys, reader=ThreadSafeNibabelReader, image_only=True, allow_missing_keys=label_optional),
        EnsureChannelFirstd(keys, allow_missing_keys=label_optional),
        Orientationd(keys, axcodes="RAS", labels=None, allow_missing_keys=label_optional),
        SubjectIdd(SUBJECT, image_key=IMAGE),
        CheckBratsLabelsd(LABEL, allow_missing_keys=label_optional),
        ConvertToMultiChannelBasedOnBratsClassesd(LABEL, allow_missing_keys=label_optional),
        CastToTyped(LABEL, dtype=torch.uint8, allow_missing_keys=label_optional),
        AttachGraded(GRADE, allow_missing_keys=True),  # segmentation-only data (BraTS 2021, 2023) has no grade
        CropForegroundd(
            keys,
            source_key=IMAGE,
            allow_smaller=True,
            start_coord_key=None,
            end_coord_key=None,
            allow_missing_keys=label_optional,
        ),
        NormalizeIntensityd(IMAGE, nonzero=True, channel_wise=True, dtype=np.float32),
    ]


def get_train_transforms(
    roi_size: Sequence[int] = (192, 192),
    num_slices_per_volume: int = 8,
    tumour_fraction: float = 0.7,
    augment: bool = True,
    rotate_degrees: float = 10.0,
    scale_range: float = 0.1,
    intensity_range: float = 0.1,
    pad_in_cache: bool = False,
) -> Compose:
    """Training chain: cached volume steps, then ``num_slices_per_volume`` random axial slices per volume.

    The random tail runs without MetaTensor tracking (:class:`UntrackedTailCompose`): plain tensors, the same values,
    about 2 times faster per volume.

    Slices are drawn by :class:`monai.transforms.RandCropByPosNegLabeld` with ``spatial_size=(-1, -1, 1)``: a share
    ``tumour_fraction`` of the slice centres is a tumour voxel (any region), the rest a brain voxel outside the tumour
    (a voxel with a positive z-score in some channel). The candidate centres are computed once per volume
    (:class:`monai.transforms.FgBgToIndicesd`, stored as int32 next to the cached volume), which makes slice
    sampling about 3.5 times faster than computing them at every draw. Each slice is padded / cropped in-plane to
    ``roi_size``; with ``pad_in_cache`` the whole volume is, once, before caching: the same slices (same seed, same
    output), about 1.5 times faster per epoch, for about 45 % more cached memory (a padded instead of a cropped
    volume).
    Augmentation (when ``augment``): flips along both in-plane axes (p 0.5 each), a small affine (p 0.3: rotation up
    to ``rotate_degrees``, scaling up to ``scale_range``; labels nearest-neighbour), intensity scaling and shifting by
    up to ``intensity_range`` (p 0.5 each).

    Each item of a dataset using this chain is a list of ``num_slices_per_volume`` dicts with:
    ``image`` (4, H, W) float32, ``label`` (3, H, W) float32 regions TC, WT, ET in {0, 1}, ``mask`` (3, H, W)
    float32 ``2 * label - 1``, ``grade`` scalar long tensor (LGG 0, HGG 1), ``subject_id`` str; (H, W) = ``roi_size``.
    MONAI's ``list_data_collate`` (the default of :class:`monai.data.DataLoader`) flattens them into a batch.

    Args:
        roi_size: in-plane size (H, W) of the slices, e.g. 192 x 192 (a multiple of the network's ``2 ** (levels - 1)``:
            16 for ``base``, 8 for ``small``).
        num_slices_per_volume: slices drawn per volume per epoch.
        tumour_fraction: share of slices centred on a tumour voxel, in [0, 1].
        augment: apply the light augmentation.
        rotate_degrees: largest in-plane rotation of the affine augmentation.
        scale_range: largest relative zoom of the affine augmentation.
        intensity_range: largest relative intensity scaling, and largest shift (in z-score units).
        pad_in_cache: pad / crop in-plane to ``roi_size`` before caching instead of per slice (faster, more memory).
    """
    roi = _check_roi(roi_size)
    if num_slices_per_volume < 1:
        raise ValueError(f"num_slices_per_volume must be >= 1, got {num_slices_per_volume}.")
    if not 0.0 <= tumour_fraction <= 1.0:
        raise ValueError(f"tumour_fraction must be in [0, 1], got {tumour_fraction}.")
    keys = [IMAGE, LABEL]
    indices = [f"{LABEL}_fg_indices", f"{LABEL}_bg_indices"]
    # candidate slice centres, computed once per volume and cached with it (int32: half the memory of int64)
    in_plane = [ResizeWithPadOrCropd(keys, spatial_size=(*roi, -1))] if pad_in_cache else []
    slice_centres: list[Transform] = [
        FgBgToIndicesd(LABEL, image_key=IMAGE, image_threshold=0.0),
        CastToTyped(indices, dtype=np.int32),
    ]
    slicing: list[Transform] = [
        RandCropByPosNegLabeld(
            keys,
            label_key=LABEL,
            spatial_size=(-1, -1, 1),
            pos=tumour_fraction,
            neg=1.0 - tumour_fraction,
            num_samples=num_slices_per_volume,
            fg_indices_key=indices[0],
            bg_indices_key=indices[1],
            allow_smaller=True,
        ),
        SqueezeDimd(keys, dim=3),
    ]
    if not pad_in_cache:
        slicing.append(ResizeWithPadOrCropd(keys, spatial_size=roi))
    augmentation: list[Transform] = []
    if augment:
        angle = float(np.deg2rad(rotate_degrees))
        augmentation = [
            RandFlipd(keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys, prob=0.5, spatial_axis=1),
            RandAffined(
                keys,
                prob=0.3,
                rotate_range=(angle,),
                scale_range=(scale_range, scale_range),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandScaleIntensityd(IMAGE, factors=intensity_range, prob=0.5),
            RandShiftIntensityd(IMAGE, offsets=intensity_range, prob=0.5),
        ]
    finishing: list[Transform] = [
        CastToTyped(keys, dtype=torch.float32),
        MaskToSymmetricd(LABEL, mask_keys=MASK),
        EnsureTyped([IMAGE, LABEL, MASK], track_meta=False),
    ]
    cached = volume_transforms() + in_plane + slice_centres
    # the per-epoch tail needs no metadata: plain tensors there make it about 2 times faster
    return UntrackedTailCompose(cached + slicing + augmentation + finishing, untracked_from=len(cached))


def get_val_transforms(roi_size: Sequence[int] = (192, 192), size_multiple: int | None = None) -> Compose:
    """Validation chain: whole volumes, deterministic and invertible.

    Output per sample: ``image`` (4, H, W, D) float32, ``label`` (3, H, W, D) float32 regions TC, WT, ET in {0, 1},
    ``grade`` scalar long tensor, ``subject_id`` str, where D is the brain's depth and (H, W) is ``roi_size``, or
    more where the brain is wider (see ``size_multiple``): no brain voxel is ever cropped away. ``image`` and
    ``label`` are MetaTensors that record the applied operations, so :class:`monai.transforms.Invertd` with this
    chain maps a prediction back to the original grid (e.g. 240 x 240 x 155) with the original affine.

    Args:
        roi_size: in-plane size (H, W) the brain's bounding box is padded to.
        size_multiple: a side of a brain wider than ``roi_size`` is padded up to a multiple of this (the network's
            ``2 ** (levels - 1)``); None: the largest power of two dividing both ``roi_size`` sides, which a valid
            ``roi_size`` makes a multiple of the network's.
    """
    return Compose(_whole_volume_transforms(roi_size, size_multiple, label_optional=False))


def get_inference_transforms(roi_size: Sequence[int] = (192, 192), size_multiple: int | None = None) -> Compose:
    """Inference chain: as :func:`get_val_transforms`, but ``label`` and ``grade`` are optional.

    Output per sample: ``image`` (4, H, W, D) float32, ``subject_id`` str (from the datalist, else from the image
    path), and where given ``label`` (3, H, W, D) float32 and ``grade``. Invertible like the validation chain.

    Args:
        roi_size: in-plane size (H, W) the brain's bounding box is padded to.
        size_multiple: see :func:`get_val_transforms`.
    """
    return Compose(_whole_volume_transforms(roi_size, size_multiple, label_optional=True))


def _whole_volume_transforms(
    roi_size: Sequence[int], size_multiple: int | None, label_optional: bool
) -> list[Transform]:
    roi = _check_roi(roi_size)
    if size_multiple is None:
        size_multiple = math.gcd(*(side & -side for side in roi))
    if size_multiple < 1:
        raise ValueError(f"size_multiple must be >= 1, got {size_multiple}.")
    keys = [IMAGE, LABEL]
    return volume_transforms(label_optional) + [
        SpatialPadd(keys, spatial_size=(*roi, -1), allow_missing_keys=label_optional),
        DivisiblePadd(keys, k=(size_multiple, size_multiple, 1), allow_missing_keys=label_optional),
        CastToTyped(keys, dtype=torch.float32, allow_missing_keys=label_optional),
    ]
