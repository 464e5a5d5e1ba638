"""A :class:`monai.data.NibabelReader` that can be shared by threads (e.g. a threaded CacheDataset fill)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from monai.data import NibabelReader

__all__ = ["ThreadSafeNibabelReader"]


class ThreadSafeNibabelReader(NibabelReader):
    """
    :class:`monai.data.NibabelReader` whose ``read`` -> ``get_data`` hand-over of the file names is per thread.

    MONAI 1.6's ``NibabelReader.read`` stores the names of the files it opened on the reader (``self.filenames``)
    and ``get_data`` zips the opened images with them. One :class:`monai.transforms.LoadImaged` (one reader) is
    shared by every thread of a :class:`monai.data.CacheDataset` filled with ``num_workers`` > 0: when another
    thread reads a one-file label between a thread's ``read`` of the four modality files and its ``get_data``, the
    zip stops after one image and the subject is cached with one modality instead of four (seen with 2 or more
    threads on 18 synthetic subjects: 2-5 of them per fill). Here ``filenames`` lives in thread-local storage, so
    each thread's ``get_data`` sees the files of its own ``read``; everything else is MONAI's reader.

    Args:
        kwargs: passed to :class:`monai.data.NibabelReader` (``channel_dim``, ``as_closest_canonical``, ...).
    """

    def __init__(self, **kwargs: Any) -> None:
        self._thread_state = threading.local()
        super().__init__(**kwargs)

    @property
    def filenames(self) -> Sequence:
        """The files opened by this thread's latest ``read``."""
        return getattr(self._thread_state, "filenames", ())

    @filenames.setter
    def filenames(self, value: Sequence) -> None:
        self._thread_state.filenames = value

    def __getstate__(self) -> dict:
        # thread-local storage does not pickle (spawned DataLoader workers pickle the dataset): start a fresh one
        state = self.__dict__.copy()
        del state["_thread_state"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._thread_state = threading.local()
