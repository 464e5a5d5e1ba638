"""Small helpers shared by the configs and the command line."""

from __future__ import annotations

__all__ = ["as_bool"]

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
