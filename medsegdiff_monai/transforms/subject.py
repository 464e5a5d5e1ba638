"""Keep a clean subject id in the data dictionary."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

from monai.config import KeysCollection
from monai.transforms import MapTransform

from medsegdiff_monai.transforms.grade import source_path, subject_id_from_path

__all__ = ["SubjectIdd"]


class SubjectIdd(MapTransform):
    """Make ``subject_id`` a bare subject id, deriving it from the image path where it is missing.

    ``monai.data.load_decathlon_datalist`` joins the data root to every value that names an existing path, so a
    ``subject_id`` equal to a subject folder's name comes back as that folder's full path; this transform keeps the
    last path component. Where the key is absent (inference on bare paths), the id is taken from the image path
    (:func:`subject_id_from_path`).

    Args:
        keys: key of the subject id (default ``"subject_id"``).
        image_key: key of the image path(s) or loaded image, used when the subject id is absent.
    """

    def __init__(self, keys: KeysCollection = "subject_id", image_key: str = "image") -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.keys:
            if key in d:
                d[key] = Path(str(d[key])).name
            elif self.image_key in d:
                d[key] = subject_id_from_path(source_path(d[self.image_key]))
        return d
