"""BraTS label values <-> nested tumour regions (TC, WT, ET).

The forward direction is MONAI's :class:`monai.transforms.ConvertToMultiChannelBasedOnBratsClassesd`
(TC = {1, 4}, WT = {1, 2, 4}, ET = {4}, in that channel order) on the library's internal labels, those of BraTS
2018-2022; this module checks the label values before it (bringing a BraTS 2023+ map, enhancing tumour = 3, to the
internal convention) and provides the inverse used to write predictions as BraTS label maps.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type

from medsegdiff_monai.data.layout import convert_label_convention, label_convention

__all__ = [
    "CheckBratsLabelsd",
    "RegionsToBratsLabelsd",
    "SuppressSmallEnhancingd",
    "regions_to_brats_labels",
    "suppress_small_enhancing",
]

# BraTS label values of the enhancing tumour, the necrotic / non-enhancing core and the oedema
_ENHANCING, _NECROTIC, _OEDEMA = 4, 1, 2


class CheckBratsLabelsd(MapTransform):
    """Check a label map against the BraTS label conventions and bring it to the internal one (enhancing tumour 4).

    The convention is detected from the values (:func:`~medsegdiff_monai.data.label_convention`): {0, 1, 2, 4} is
    BraTS 2018-2022 and passes unchanged; {0, 1, 2, 3} is BraTS 2023+ and its label 3 becomes 4; a map with both 3
    and 4, or any other value, is refused.

    Args:
        keys: keys of the label maps (default ``"label"``).
        allow_missing_keys: do not raise when a key is absent (e.g. inference data without labels).

    Raises:
        ValueError: naming the subject, the label file (from the MetaTensor's ``filename_or_obj``) and the labels.
    """

    def __init__(self, keys: KeysCollection = "label", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            source = label.meta.get("filename_or_obj", key) if isinstance(label, MetaTensor) else key
            try:
                release = label_convention(torch.unique(torch.as_tensor(label)).tolist(), source)
            except ValueError as error:
                raise ValueError(f"subject {d.get('subject_id', '?')}: {error}") from None
            if release is not None:
                d[key] = convert_label_convention(label, release, "brats2020")
        return d


def regions_to_brats_labels(regions: NdarrayOrTensor, threshold: float = 0.5) -> NdarrayOrTensor:
    """Turn nested region maps (TC, WT, ET) into a BraTS label map: ET -> 4, TC \\ ET -> 1, WT \\ TC -> 2, else 0.

    Args:
        regions: (3, *spatial) channels TC, WT, ET, binary or probabilities (numpy or torch).
        threshold: a voxel is in a region when its value is above ``threshold``.

    Returns:
        (1, *spatial) ``uint8`` labels in {0, 1, 2, 4}, of the input's type (a MetaTensor keeps its metadata).

    Example::

        >>> regions = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]])  # TC, WT, ET over 4 voxels
        >>> regions_to_brats_labels(regions)
        tensor([[4, 1, 2, 0]], dtype=torch.uint8)
    """
    if regions.ndim < 2 or regions.shape[0] != 3:
        raise ValueError(f"regions must have shape (3, *spatial) with channels TC, WT, ET, got {tuple(regions.shape)}.")
    tc, wt, et = (torch.as_tensor(regions[i]) > threshold for i in range(3))
    labels = torch.zeros((1, *regions.shape[1:]), dtype=torch.uint8, device=tc.device)
    labels[0][wt] = _OEDEMA
    labels[0][tc] = _NECROTIC
    labels[0][et] = _ENHANCING
    dtype = torch.uint8 if isinstance(regions, torch.Tensor) else np.uint8
    out, *_ = convert_to_dst_type(labels, dst=regions, dtype=dtype)
    return out


class RegionsToBratsLabelsd(MapTransform):
    """Dictionary wrapper of :func:`regions_to_brats_labels`: (3, *spatial) TC/WT/ET -> (1, *spatial) uint8 labels.

    Args:
        keys: keys of the region maps.
        threshold: a voxel is in a region when its value is above ``threshold``.
        allow_missing_keys: do not raise when a key is absent.
    """

    def __init__(self, keys: KeysCollection, threshold: float = 0.5, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.threshold = threshold

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = regions_to_brats_labels(d[key], self.threshold)
        return d


def _check_min_voxels(min_voxels: int) -> None:
    if min_voxels < 0:
        raise ValueError(f"min_voxels must be >= 0, got {min_voxels}.")


def suppress_small_enhancing(labels: NdarrayOrTensor, min_voxels: int) -> NdarrayOrTensor:
    """Relabel the enhancing tumour of a BraTS label map as necrotic / non-enhancing core (4 -> 1) when it has fewer
    than ``min_voxels`` voxels; otherwise return the labels unchanged.

    BraTS scores an empty ET as Dice 1 when the reference has none and 0 when it has some, so a few stray ET voxels
    on a subject without enhancement (most LGG) cost a whole subject's ET Dice. Several BraTS challenge entries
    (e.g. nnU-Net's) therefore drop an ET prediction below a volume threshold; the voxels stay tumour core, so TC and
    WT are unchanged.

    Args:
        labels: BraTS label map (any shape, values in {0, 1, 2, 4}; numpy or torch).
        min_voxels: smallest ET voxel count kept; 0 keeps every prediction.

    Returns:
        The label map, of the input's type (a copy when relabelled).

    Example::

        >>> suppress_small_enhancing(torch.tensor([0, 4, 4, 1, 2]), min_voxels=3)
        tensor([0, 1, 1, 1, 2])
    """
    _check_min_voxels(min_voxels)
    voxels = torch.as_tensor(labels)
    enhancing = voxels == _ENHANCING
    count = int(enhancing.sum())
    if count == 0 or count >= min_voxels:
        return labels
    relabelled = voxels.clone()
    relabelled[enhancing] = _NECROTIC
    out, *_ = convert_to_dst_type(relabelled, dst=labels)
    return out


class SuppressSmallEnhancingd(MapTransform):
    """Dictionary wrapper of :func:`suppress_small_enhancing` (per label map, ET below ``min_voxels`` -> label 1).

    Args:
        keys: keys of the BraTS label maps.
        min_voxels: smallest ET voxel count kept; 0 keeps every prediction.
        allow_missing_keys: do not raise when a key is absent.
    """

    def __init__(self, keys: KeysCollection, min_voxels: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        _check_min_voxels(min_voxels)
        self.min_voxels = min_voxels

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = suppress_small_enhancing(d[key], self.min_voxels)
        return d
