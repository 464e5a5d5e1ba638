"""The bundle's ``large_files.yml``: the weight files it lists with their hashes, checked and refreshed."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from medsegdiff_monai.data.files import write_text_atomically

__all__ = ["LARGE_FILES_NAME", "check_large_files", "refresh_large_files"]

LARGE_FILES_NAME = "large_files.yml"
"""The file of a MONAI bundle that lists its weight files (``path``, ``url``, ``hash_val``, ``hash_type``)."""


def _file_hash(path: Path, hash_type: str) -> str:
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, hash_type).hexdigest()


def _read_entries(bundle_root: Path) -> list[dict[str, Any]] | None:
    """The ``large_files`` entries of the bundle, or None when it has no ``large_files.yml``."""
    listing = bundle_root / LARGE_FILES_NAME
    if not listing.is_file():
        return None
    content = yaml.safe_load(listing.read_text()) or {}
    entries = content.get("large_files") if isinstance(content, dict) else None
    if not isinstance(entries, list) or not all(isinstance(entry, dict) and "path" in entry for entry in entries):
        raise ValueError(
            f"{listing} is not a MONAI large-files list: expected 'large_files:' followed by entries with a 'path' "
            "(and 'url', 'hash_val', 'hash_type')."
        )
    return entries


def _by_path(entries: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A list's entries by the bundle-relative path each names (without a leading ``./``)."""
    return {str(entry["path"]).removeprefix("./"): entry for entry in entries}


def _relative_to_bundle(path: str | os.PathLike, bundle_root: Path) -> str | None:
    """``path`` relative to ``bundle_root`` in POSIX form, or None for a file outside the bundle."""
    try:
        return Path(os.path.abspath(path)).relative_to(os.path.abspath(bundle_root)).as_posix()
    except ValueError:
        return None


def check_large_files(bundle_root: str | os.PathLike, paths: Sequence[str | os.PathLike]) -> list[str]:
    """Log a warning for each of ``paths`` that ``large_files.yml`` lists with another hash than the file's.

    A listed weight file that differs from its hash is damaged, or was replaced without refreshing the list (for
    example by training with ``--update_bundle_model true``): the bundle would then fail the model zoo's check, and
    a damaged file would load without an error. Files outside ``bundle_root``, files the list does not name, and
    bundles without ``large_files.yml`` are not checked.

    Args:
        bundle_root: the bundle folder that holds ``large_files.yml``.
        paths: the files the run reads (e.g. the checkpoint).

    Returns:
        the messages logged, one per differing file.
    """
    bundle_root = Path(bundle_root)
    entries = _read_entries(bundle_root)
    if entries is None:
        return []
    listed = _by_path(entries)
    messages = []
    for path in paths:
        relative = _relative_to_bundle(path, bundle_root)
        entry = listed.get(relative) if relative is not None else None
        if entry is None or not entry.get("hash_val") or not Path(path).is_file():
            continue
        hash_type = str(entry.get("hash_type") or "md5")
        if _file_hash(Path(path), hash_type) != str(entry["hash_val"]):
            messages.append(
                f"{path} differs from the {hash_type} hash that {bundle_root / LARGE_FILES_NAME} lists for it: the "
                "file is damaged, or it was replaced (e.g. by training with --update_bundle_model true). After a "
                "replacement, run the bundle's export with --overwrite true: it writes the programs of the new weights "
                f"and refreshes the hashes in {LARGE_FILES_NAME}."
            )
    for message in messages:
        logging.getLogger("medsegdiff_monai").warning(message)
    return messages


def refresh_large_files(
    bundle_root: str | os.PathLike, paths: Sequence[str | os.PathLike], source: str | os.PathLike | None = None
) -> list[str]:
    """Write the current hashes of ``paths`` into the bundle's ``large_files.yml``.

    A listed file gets its hash of the listed ``hash_type`` (``md5`` when none). Files the list does not name (such
    as a checkpoint under ``runs/``, which the bundle does not ship), files outside ``bundle_root`` and bundles
    without ``large_files.yml`` are left alone. The list is rewritten atomically, and only when a hash changed.

    Args:
        bundle_root: the bundle folder that holds ``large_files.yml``.
        paths: the weight files just written (e.g. ``models/model.pt`` and the exported programs).
        source: the weights ``paths`` were made from (the exported checkpoint). Nothing is refreshed when no file
            the list names, other than ``source``, was made (programs exported outside the bundle), and nothing, with
            a warning, when the list does not name ``source`` (a checkpoint under ``runs/``): the list would
            otherwise certify programs of other weights beside the listed ``model.pt``.

    Returns:
        the bundle-relative paths whose hashes changed.
    """
    bundle_root = Path(bundle_root)
    entries = _read_entries(bundle_root)
    if entries is None:
        return []
    listed = _by_path(entries)
    made = [path for path in paths if path != source and _relative_to_bundle(path, bundle_root) in listed]
    if not made:  # e.g. programs exported outside the bundle: nothing the list names was written
        return []
    if source is not None and _relative_to_bundle(source, bundle_root) not in listed:
        logging.getLogger("medsegdiff_monai").warning(
            f"{bundle_root / LARGE_FILES_NAME} was not refreshed: the programs were made from {source}, which it does "
            "not list, so they now stand beside other weights. To publish these weights, copy the file to "
            f"{bundle_root / 'models' / 'model.pt'} and run the export again without --checkpoint."
        )
        return []
    changed = []
    for path in paths:
        relative = _relative_to_bundle(path, bundle_root)
        entry = listed.get(relative) if relative is not None else None
        if entry is None or not Path(path).is_file():
            continue
        digest = _file_hash(Path(path), str(entry.get("hash_type") or "md5"))
        if entry.get("hash_val") != digest:
            entry["hash_val"] = digest
            entry.setdefault("hash_type", "md5")
            changed.append(relative)
    if changed:
        text = yaml.safe_dump({"large_files": entries}, sort_keys=False, default_flow_style=False)
        write_text_atomically(bundle_root / LARGE_FILES_NAME, text)
        logging.getLogger("medsegdiff_monai").info(
            f"refreshed the hashes in {bundle_root / LARGE_FILES_NAME}: {', '.join(changed)}"
        )
    return changed
