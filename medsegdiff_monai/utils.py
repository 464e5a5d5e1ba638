"""Small helpers shared by the configs and the command line."""

from __future__ import annotations

import os

import torch

__all__ = ["AMP_DTYPES", "as_bool", "parse_amp_dtype", "require_file", "unwrap_module"]

AMP_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off", "none", "")


def as_bool(value: bool | int | str | None, name: str = "value") -> bool:
    """Read a switch given as a bool, a number or a string.

    ``python -m monai.bundle run ... --use_cls_head false`` hands the config the *string* ``"false"`` (Python Fire
    only converts ``False``), which plain ``bool()`` would take for True.

    Raises:
        ValueError: naming ``name`` when the string is not a recognised switch value.
    """
    if isinstance(value, str):
        key = value.strip().lower()
        if key in _TRUE:
            return True
        if key in _FALSE:
            return False
        raise ValueError(f"{name}={value!r}: expected true/false.")
    return bool(value)


def parse_amp_dtype(amp_dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Autocast dtype named by a config value: ``"bfloat16"``/``"bf16"``, ``"float16"``/``"fp16"``, or
    None / ``"none"`` / ``"float32"`` / ``"fp32"`` for full precision (returns None).

    Raises:
        ValueError: on any other value.
    """
    if amp_dtype is None or amp_dtype == torch.float32:
        return None
    if isinstance(amp_dtype, torch.dtype):
        if amp_dtype in AMP_DTYPES.values():
            return amp_dtype
        raise ValueError(f"amp_dtype={amp_dtype}: expected bfloat16, float16 or None.")
    key = str(amp_dtype).strip().lower()
    if key in ("none", "float32", "fp32", ""):
        return None
    if key not in AMP_DTYPES:
        raise ValueError(f"amp_dtype={amp_dtype!r}: expected one of {sorted(AMP_DTYPES)} or None.")
    return AMP_DTYPES[key]


def unwrap_module(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` without its DistributedDataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while hasattr(module, "module") or hasattr(module, "_orig_mod"):
        module = getattr(module, "module", None) or module._orig_mod
    return module


def require_file(path: str | os.PathLike, key: str, hint: str = "") -> str:
    """``path`` itself when it names an existing file, for a bundle config to check a path before it is used.

    The bundle's paths default to folders under ``bundle_root`` (``"."``: the configs run from inside the bundle
    folder), so a config run from elsewhere looks in the wrong place.

    Args:
        path: the file the config will read.
        key: the config key that sets ``path`` (named in the error).
        hint: a last sentence of the error, e.g. the command that writes the file.

    Raises:
        FileNotFoundError: naming the absolute path looked for, ``bundle_root`` and ``key``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{os.path.abspath(path)} does not exist ('{key}' resolves to {os.fspath(path)!r}). Run the bundle "
            "from inside its folder (bundle_root is '.'), pass --bundle_root with the bundle folder (e.g. "
            f"--bundle_root bundle from the repository root), or set --{key}. {hint}".rstrip()
        )
    return os.fspath(path)
