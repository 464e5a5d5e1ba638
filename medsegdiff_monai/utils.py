"""Small helpers shared by the configs and the command line."""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

__all__ = [
    "AMP_DTYPES",
    "DeprecatedNameWarning",
    "as_bool",
    "check_device",
    "check_setting_names",
    "moved_module",
    "moved_names",
    "parameter_names",
    "parse_amp_dtype",
    "quoted_names",
    "rename_state_dict_keys",
    "renamed_args",
    "renamed_key",
    "require_file",
    "unwrap_module",
    "use_cudnn_benchmark",
    "warn_renamed",
]

T = TypeVar("T", bound=Callable)

AMP_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off", "none", "")


def as_bool(value: bool | int | str | None, name: str = "value") -> bool:
    """Read a switch given as a bool, a number or a string.

    ``python -m monai.bundle run ... --use_grade_head false`` hands the config the *string* ``"false"`` (Python Fire
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


def use_cudnn_benchmark(enabled: bool | int | str, name: str = "cudnn_benchmark") -> bool:
    """Let cuDNN time its algorithms once for each new convolution shape and keep the fastest (``enabled``), or leave
    the deterministic choice of :func:`monai.utils.set_determinism` in place.

    ``set_determinism(seed)`` sets ``cudnn.deterministic=True`` and ``cudnn.benchmark=False``: bit-reproducible runs,
    with slower convolutions on a GPU. A bundle config calls this right after it, so the seeds stay set either way;
    on a CPU the flags change nothing.

    Args:
        enabled: a switch as :func:`as_bool` reads it (``--cudnn_benchmark false`` on the command line).
        name: the config key that sets ``enabled`` (named in the error).

    Returns:
        the switch, as a bool.

    Raises:
        ValueError: naming ``name`` when ``enabled`` is not a switch value.
    """
    enabled = as_bool(enabled, name)
    if enabled:
        torch.backends.cudnn.deterministic = False
    torch.backends.cudnn.benchmark = enabled
    return enabled


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` when this machine has it, for a bundle config to check ``--device``.

    Raises:
        ValueError: naming the device and the ones to use instead (no name of a device, CUDA without a GPU or a CUDA
            build of PyTorch, a GPU index past the last).
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        message = f"device {device!r} is not a device name: pass e.g. --device cpu or --device cuda:0."
        raise ValueError(message) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"device {device} is not available: this PyTorch sees no CUDA GPU (torch.cuda.is_available() is "
                "False). Pass --device cpu."
            )
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {device} is not available: this machine has cuda:0 to cuda:{count - 1}.")
    return device


def quoted_names(names: Sequence[str], conjunction: str) -> str:
    """``('a', 'b', 'c'), "or"`` -> ``"'a', 'b' or 'c'"``, for error messages."""
    return f"{', '.join(map(repr, names[:-1]))} {conjunction} {names[-1]!r}"


def parameter_names(*functions: Callable) -> set[str]:
    """The names of the parameters ``functions`` take by name (not ``*args``, ``**kwargs`` or ``self``)."""
    return {
        parameter.name
        for function in functions
        for parameter in inspect.signature(function).parameters.values()
        if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD) and parameter.name != "self"
    }


def _bundle_run_arguments() -> set[str]:
    """The arguments ``monai.bundle run`` takes itself (not config keys): those of ``run``, ``create_workflow`` and
    ``ConfigWorkflow``."""
    from monai.bundle import ConfigWorkflow
    from monai.bundle.scripts import create_workflow, run

    return parameter_names(run, create_workflow, ConfigWorkflow.__init__)


def _command_line_value(text: str) -> Any:
    """A value of the command line as fire, which reads ``monai.bundle``'s command line, reads it (a list, a dict in
    Python or JSON spelling, or the string)."""
    from fire.parser import DefaultParseValue

    return DefaultParseValue(text)


def check_setting_names(argv: Sequence[str] | None = None) -> list[str]:
    """Refuse a ``--key`` of a ``monai.bundle run`` command line that no config file of the run has.

    MONAI adds an override of an unknown key to the config, where nothing reads it: ``--num_inference_step 25``
    would run the default step count without a word. A bundle config calls this as an ``initialize`` step. The
    first part of each key (before ``#``) must be a top-level key of the run's config files (``--config_file``, or
    that of ``--args_file``), ``_meta_``, a key that ``--tracking`` adds, or an argument of ``monai.bundle run``
    itself. Outside a ``monai.bundle`` command line (``argv[0]`` not ``monai/bundle/__main__.py``), nothing is
    checked.

    Args:
        argv: the command line, ``sys.argv`` by default.

    Returns:
        the keys checked.

    Raises:
        ValueError: naming each unknown key, with the nearest config keys.
    """
    argv = list(sys.argv if argv is None else argv)
    if not argv or Path(argv[0]).as_posix().split("/")[-2:] != ["bundle", "__main__.py"] or "run" not in argv[1:2]:
        return []
    from monai.bundle import ConfigParser

    given: dict[str, Any] = {}
    tokens = argv[2:]
    for index, token in enumerate(tokens):
        if token.startswith("--") and len(token) > 2:
            key, equals, value = token[2:].partition("=")
            following = tokens[index + 1] if index + 1 < len(tokens) else None
            given[key.replace("-", "_")] = value if equals else following
    if given.get("args_file"):  # its pairs are overrides as well; the command line's take precedence
        given = {**ConfigParser.load_config_file(given["args_file"]), **given}
    config_file = given.get("config_file")
    if config_file is None:
        return []
    files = _command_line_value(config_file) if isinstance(config_file, str) else config_file
    config_keys = set(ConfigParser.load_config_files(files)) | {"_meta_"}
    tracking = given.get("tracking")
    if tracking:  # MONAI's experiment tracking adds the top-level items of its settings' "configs"
        from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS

        tracking = _command_line_value(tracking) if isinstance(tracking, str) else tracking
        if isinstance(tracking, dict):  # the settings themselves
            settings = tracking
        else:  # a name of MONAI's settings, or a settings file
            settings = DEFAULT_EXP_MGMT_SETTINGS.get(tracking) or ConfigParser.load_config_files(tracking)
        config_keys |= set(settings.get("configs", {}))
    run_arguments = _bundle_run_arguments()
    keys = [key for key in given if key not in run_arguments]
    unknown = [key for key in keys if key.split("#")[0] not in config_keys]
    if unknown:
        hints = []
        for key in unknown:
            near = difflib.get_close_matches(key.split("#")[0], sorted(config_keys), n=3, cutoff=0.6)
            hints.append(f"--{key}" + (f" (did you mean {' or '.join('--' + name for name in near)}?)" if near else ""))
        raise ValueError(
            f"{', '.join(hints)}: not a setting of {files}, so it would change nothing. The settings are the "
            "top-level keys of those files."
        )
    return keys


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
        FileNotFoundError: naming the absolute path looked for, ``key`` and how ``bundle_root`` places its default.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{os.path.abspath(path)} does not exist ('{key}' resolves to {os.fspath(path)!r}). Set --{key}; its "
            "default is relative to bundle_root ('.' unless --bundle_root is given), so without --"
            f"{key} run the bundle from inside its folder or pass --bundle_root with the bundle folder (e.g. "
            f"--bundle_root bundle from the repository root). {hint}".rstrip()
        )
    return os.fspath(path)


class DeprecatedNameWarning(DeprecationWarning):
    """A name of this library that was renamed or moved: the old one still works, for one release."""


if not sys.warnoptions:  # shown once per place by default (Python hides DeprecationWarning outside __main__)
    warnings.filterwarnings("default", category=DeprecatedNameWarning)


def warn_renamed(old: str, new: str, stacklevel: int = 2, note: str = "") -> None:
    """Warn (:class:`DeprecatedNameWarning`) that the spelling ``old`` is now ``new``.

    Args:
        old: the old spelling, with enough context to find it (e.g. ``"the argument cls_loss= of DiffusionTrainer"``).
        new: the spelling to use instead.
        stacklevel: as for ``warnings.warn``, counted from the caller of this function.
        note: a sentence appended to the message.
    """
    warnings.warn(
        f"{old} is renamed {new}; the old name is deprecated and will be removed in the next release.{note}",
        DeprecatedNameWarning,
        stacklevel=stacklevel + 1,
    )


def renamed_key(old_value: Any, default: Any, old_key: str, new_key: str) -> Any:
    """The value of a renamed bundle config key, reading the old key for one release.

    A config keeps the old key as ``null`` and computes the new one from it::

        "use_cls_head": null,
        "use_grade_head": "$medsegdiff_monai.utils.renamed_key(@use_cls_head, True, 'use_cls_head', 'use_grade_head')"

    so ``--use_cls_head false`` still works (with a warning) and ``--use_grade_head false`` replaces the expression.

    Args:
        old_value: the old key's value; None (``null``) when the user did not set it.
        default: the new key's default value.
        old_key: the old key's name (for the warning).
        new_key: the new key's name (for the warning).

    Returns:
        ``default`` when ``old_value`` is None, else ``old_value``.
    """
    if old_value is None:
        return default
    warn_renamed(f"the config key {old_key!r}", repr(new_key))
    return old_value


def renamed_args(**renamed: str) -> Callable[[T], T]:
    """Decorator: keyword arguments renamed ``old="new"`` are still accepted under their old name, with a warning.

    A call that gives both names uses the old one's value: a bundle config names the new argument, and a user's
    override of the old one (``net_override={"use_cls_head": False}``, ``--network_def#use_cls_head false``) is the
    value meant. (MONAI's ``deprecated_arg(new_name=...)`` needs the old name in the signature or a ``**kwargs``, and
    keeps the new value.)

    Example::

        @renamed_args(use_cls_head="use_grade_head")
        def parse_stages(stages, use_grade_head=True): ...
    """

    def decorator(func: T) -> T:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in renamed.items():
                if old not in kwargs:
                    continue
                note = f" Both were given: the value of {old}= is used." if new in kwargs else ""
                warn_renamed(f"the argument {old}= of {func.__qualname__}", f"{new}=", note=note)
                kwargs[new] = kwargs.pop(old)
            return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorator


def _rename_keys(module: torch.nn.Module, state_dict: dict, prefix: str, *_: Any, renamed: Mapping[str, str]) -> None:
    """Load-state-dict pre-hook of :func:`rename_state_dict_keys`."""
    applied = []
    for old, new in renamed.items():
        old_path, new_path = prefix + old, prefix + new
        keys = [k for k in state_dict if k == old_path or k.startswith(old_path + ".")]
        keys = [k for k in keys if new_path + k[len(old_path) :] not in state_dict]
        for key in keys:
            state_dict[new_path + key[len(old_path) :]] = state_dict.pop(key)
        if keys:
            applied.append((old, new, len(keys)))
    if applied:
        warn_renamed(
            f"the {type(module).__name__} state-dict key prefix "
            + ", ".join(f"{old} ({count} keys, renamed on load)" for old, _, count in applied),
            ", ".join(new for _, new, _ in applied),
        )


def rename_state_dict_keys(module: torch.nn.Module, renamed: Mapping[str, str]) -> None:
    """Let ``module`` load state dicts written before some of its parameters were renamed.

    Registers a load-state-dict pre-hook that renames each ``old`` key (a submodule or parameter path relative to
    ``module``: ``"cls_head"`` renames ``cls_head.*``) to ``new``, with one warning per load. It runs wherever the
    state dict comes from: ``module.load_state_dict``, a wrapper's (``module.`` / ``_orig_mod.`` prefixes) or
    MONAI's ``CheckpointLoader``. A key whose new name is also present is left alone (``strict`` loading reports it).

    Args:
        module: the module whose keys were renamed.
        renamed: ``{old: new}`` paths.
    """
    module.register_load_state_dict_pre_hook(functools.partial(_rename_keys, renamed=dict(renamed)))


def moved_names(module: str, moved: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` resolving old names to the objects that moved or were renamed, with a warning.

    Args:
        module: the ``__name__`` of the module holding the old names.
        moved: ``{old name: "dotted.module.path.new_name"}``; the new module is imported at the first use.
    """

    def __getattr__(name: str) -> Any:
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        package, new_name = moved[name].rsplit(".", 1)
        if new_name == name:
            warnings.warn(
                f"{module}.{name} moved to {moved[name]}; import it from {package} (the old path is deprecated and "
                "will be removed in the next release).",
                DeprecatedNameWarning,
                stacklevel=2,
            )
        else:
            warn_renamed(f"{module}.{name}", moved[name])
        return getattr(importlib.import_module(package), new_name)

    return __getattr__


def moved_module(old: str, new: str) -> None:
    """Make the module path ``old`` an alias of the module ``new``, with a warning; the body of a module left at its
    old path for one release (``moved_module(__name__, "medsegdiff_monai.workflows.export")``).

    ``import old`` and ``from old import name`` then give the objects of ``new`` themselves.
    """
    warnings.warn(
        f"the module {old} moved to {new}; import {new} (the old path is deprecated and will be removed in the next "
        "release).",
        DeprecatedNameWarning,
        stacklevel=3,  # the import statement (warnings skips importlib's frames)
    )
    sys.modules[old] = importlib.import_module(new)
