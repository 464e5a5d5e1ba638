"""Scale binary region maps to the [-1, 1] range of the diffusion model's mask."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import ensure_tuple_rep

__all__ = ["MaskToSymmetricd"]


class MaskToSymmetricd(MapTransform):
    """Write ``2 * x - 1`` of binary region maps into new keys: {0, 1} -> {-1, 1}, as float32.

    Args:
        keys: keys of the region maps, e.g. ``"label"`` of shape (3, H, W) with channels TC, WT, ET.
        mask_keys: output key for each of ``keys``, distinct (default ``"mask"``, for one key); the input keys are
            left unchanged.
        allow_missing_keys: do not raise when a key is absent.

    Example::

        >>> MaskToSymmetricd("label")({"label": torch.tensor([[0.0, 1.0]])})["mask"]
        tensor([[-1.,  1.]])
    """

    def __init__(
        self, keys: KeysCollection = "label", mask_keys: str | Sequence[str] = "mask", allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_keys = ensure_tuple_rep(mask_keys, len(self.keys))
        if len(set(self.mask_keys)) != len(self.mask_keys):
            raise ValueError(
                f"MaskToSymmetricd writes each of keys {list(self.keys)} to its own mask key, got mask_keys "
                f"{list(self.mask_keys)}: give one distinct mask key per key."
            )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, mask_key in self.key_iterator(d, self.mask_keys):
            d[mask_key] = 2.0 * torch.as_tensor(d[key], dtype=torch.float32) - 1.0
        return d
