"""Dataset of 2D training slices drawn from cached, decoded volumes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from monai.data import CacheDataset

__all__ = ["make_slice_dataset"]


def make_slice_dataset(
    datalist_entries: Sequence[dict],
    transforms: Callable,
    cache_rate: float = 1.0,
    num_workers: int = 0,
    progress: bool = False,
    copy_cache: bool = True,
) -> CacheDataset:
    """A :class:`monai.data.CacheDataset` that decodes each volume once per run and draws slices every epoch.

    With the chains of :mod:`medsegdiff_monai.transforms`, the cache holds the brain-cropped, z-scored volume
    (the deterministic steps); the random slice sampling and augmentation run at every access. One item is a list
    of ``num_slices_per_volume`` slice dicts, flattened into a batch by ``monai.data.list_data_collate``.

    Args:
        datalist_entries: datalist entries (absolute paths), e.g. from :func:`load_brats_datalist`.
        transforms: the chain, e.g. ``get_train_transforms()``.
        cache_rate: share of volumes kept in memory; the others are decoded at every access.
        num_workers: threads filling the cache.
        progress: show a progress bar while filling the cache.
        copy_cache: deep-copy a cached volume before the random steps (MONAI's default); ``False`` saves the copy
            and is safe with the training chain, whose random steps do not modify their input in place.
    """
    from monai.data import CacheDataset  # MONAI (and torch) load lazily, keeping the CLI quick to start

    return CacheDataset(
        data=list(datalist_entries),
        transform=transforms,
        cache_rate=cache_rate,
        num_workers=num_workers,
        progress=progress,
        copy_cache=copy_cache,
    )
