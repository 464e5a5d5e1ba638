"""Load trained network weights from the files the training workflow writes."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["extract_network_state", "load_network_weights", "read_checkpoint"]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_GRADE_MODULES = ("grade_head", "grade_calibration", "cls_head")
"""Top-level modules of the grade (``cls_head``: the grade head of files written before it was renamed)."""


def extract_network_state(checkpoint: Mapping, key: str = "network") -> dict[str, torch.Tensor]:
    """The network's state dict inside a checkpoint.

    Accepts a plain state dict (Ignite's ``Checkpoint`` of a single object writes one), ``{"network": state_dict}``
    with or without other entries (optimizer, trainer, ...), and strips the ``module.`` (DDP) and ``_orig_mod.``
    (``torch.compile``) prefixes of wrapped networks.

    Args:
        checkpoint: the loaded checkpoint.
        key: the entry holding the network in a multi-object checkpoint.
    """
    state = checkpoint[key] if isinstance(checkpoint.get(key), Mapping) else checkpoint
    cleaned = {}
    for name, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            while name.startswith(prefix):
                name = name[len(prefix) :]
        cleaned[name] = value
    return cleaned


def read_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", what: str = "checkpoint", remedy: str = ""
) -> Any:
    """``torch.load(path, weights_only=True)``, with a file that cannot be read (truncated, or not a checkpoint)
    reported by name instead of by torch's error (which would suggest the unsafe ``weights_only=False``).

    Args:
        path: the file.
        map_location: where to load the tensors.
        what: the file's role, for the message (e.g. ``"newest checkpoint"``).
        remedy: what to do, appended to the message.

    Raises:
        ValueError: naming the file, the error's kind and ``remedy``.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError, KeyError, ... for such a file
        detail = (str(error).splitlines() or [""])[0][:120]
        kind = type(error).__name__ if not detail or "weights_only" in detail else f"{type(error).__name__}: {detail}"
        raise ValueError(
            f"{what} {path} cannot be read ({kind}); it is truncated or not a checkpoint of this library. "
            f"{remedy}".rstrip()
        ) from None


def load_network_weights(
    network: nn.Module, path: str | Path, map_location: str | torch.device = "cpu", strict: bool = True
) -> nn.Module:
    """Load the weights in ``path`` (see :func:`extract_network_state`) into ``network`` and return it.

    The file's ``grade_calibration.scale`` / ``.bias`` (the Platt scaling fitted on the validation split after
    training) load with the weights, so every grade computed with the network is calibrated. A file saved before
    the calibration existed lacks them: it still loads (also with ``strict=True``), with a warning, and the grade
    is the uncalibrated network output (identity calibration). A file and a network that differ only in having a
    grade head (a segmentation-only file, which training writes on data without grades, loaded into a network with
    the head, or the converse) are refused before loading, saying which ``use_grade_head`` fits the file.

    Args:
        network: the module built with the training configuration (same preset, heads and mask channels).
        path: checkpoint file, e.g. the bundle's ``models/model.pt``.
        map_location: where to load the tensors.
        strict: require the keys to match exactly.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when the file holds no tensors of the network or the keys do not match (with ``strict``, a
            grade head in only one of them is named with the ``use_grade_head`` to pass).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist: train the bundle first (it writes models/model.pt) "
            "or set 'checkpoint' to a trained network file."
        )
    checkpoint = read_checkpoint(path, map_location, remedy="Give a network file written by training (model.pt).")
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"checkpoint {path} holds a {type(checkpoint).__name__}, expected a state dict.")
    state = extract_network_state(checkpoint)
    remedy = _grade_head_remedy(network.state_dict(), state) if strict else None
    if remedy is not None:
        raise ValueError(f"checkpoint {path} does not match the network: {remedy}")
    try:
        network.load_state_dict(state, strict=strict)
    except RuntimeError:
        raise ValueError(
            f"checkpoint {path} does not match the network: {_mismatch(network.state_dict(), state)}. "
            "Build the network as the training run that wrote the file did (preset, use_grade_head, "
            "mask_channels and any network_def keys)."
        ) from None
    return network


def _grade_head_remedy(expected: Mapping[str, torch.Tensor], stored: Mapping[str, torch.Tensor]) -> str | None:
    """What to do when a state dict and a network's differ only in the grade (head and calibration): one of them
    has it and the other none of it; ``None`` for any other difference, or none.

    Args:
        expected: the network's state dict.
        stored: the file's state dict.
    """

    def split(state: Mapping[str, torch.Tensor]) -> tuple[list[str], set[str]]:
        grade = [key for key in state if key.split(".", 1)[0] in _GRADE_MODULES]
        return grade, set(state) - set(grade)

    network_grade, network_rest = split(expected)
    file_grade, file_rest = split(stored)
    if network_rest != file_rest or any(stored[key].shape != expected[key].shape for key in file_rest):
        return None
    if network_grade and not file_grade:
        return (
            "the file has no grade head: it was trained segmentation-only (training does so on data without grades), "
            f"while the network is built with one ({len(network_grade)} tensor(s) of the network are not in the "
            f"file, e.g. {network_grade[0]}). Pass --use_grade_head false (get_network(..., use_grade_head=False)) "
            "to segment without a grade."
        )
    if file_grade and not network_grade:
        return (
            f"the file has a grade head, while the network is built without one ({len(file_grade)} in the file are "
            f"not in the network, e.g. {file_grade[0]}). Pass --use_grade_head true or leave it at its default "
            "(true)."
        )
    return None


def _mismatch(expected: Mapping[str, torch.Tensor], stored: Mapping[str, torch.Tensor]) -> str:
    """How a state dict differs from a network's: counts of missing, unexpected and reshaped tensors, one example
    of each."""
    missing = [key for key in expected if key not in stored]
    unexpected = [key for key in stored if key not in expected]
    reshaped = [key for key in expected if key in stored and stored[key].shape != expected[key].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) of the network are not in the file (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} in the file are not in the network (e.g. {unexpected[0]})")
    if reshaped:
        key = reshaped[0]
        parts.append(
            f"{len(reshaped)} have another shape (e.g. {key}: {tuple(stored[key].shape)} in the file, "
            f"{tuple(expected[key].shape)} in the network)"
        )
    return "; ".join(parts) or "the tensors differ"
