"""What a training run folder belongs to (its fingerprint) and the random state a resumed run continues from."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Randomizable

from medsegdiff_monai.data.files import lock_folder, write_text_atomically
from medsegdiff_monai.engines.stages import current_stage_spelling
from medsegdiff_monai.networks.checkpoint import read_checkpoint

__all__ = [
    "RUN_FILENAME",
    "RandomState",
    "RunFolderError",
    "check_checkpoint_readable",
    "datalist_digest",
    "prepare_run_folder",
    "prune_checkpoints",
    "run_fingerprint",
]

RUN_FILENAME = "run.json"
"""File of a run folder recording the fingerprint of the run it holds."""

_CHECKPOINT_GLOB = "checkpoint_epoch=*.pt"
_RENAMED_SETTINGS = {"use_cls_head": "use_grade_head"}
_LATER_SETTINGS = ("update_bundle_model", "val_sampling_steps")
"""Settings that records of older runs lack: such a record is compared on the others."""


def _current_spelling(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` with the spellings of before the grade renames (``use_cls_head``, the stages' ``"cls_head"`` and
    ``"cls"``) replaced by today's, so that a run recorded before them compares equal and resumes."""
    renamed = {_RENAMED_SETTINGS.get(key, key): value for key, value in settings.items()}
    if isinstance(renamed.get("stages"), list):
        renamed["stages"] = [
            current_stage_spelling(stage) if isinstance(stage, Mapping) else stage for stage in renamed["stages"]
        ]
    return renamed


class RunFolderError(ValueError):
    """A run folder holds a different run, or a file of it cannot be read; the message says what to do."""


def datalist_digest(datalist: str | Path) -> str:
    """SHA-256 of the ``training`` and ``validation`` lists of a datalist JSON (formatting and other keys ignored)."""
    with open(datalist) as handle:
        content = json.load(handle)
    lists = {key: content.get(key) for key in ("training", "validation")}
    return hashlib.sha256(json.dumps(lists, sort_keys=True).encode()).hexdigest()


def run_fingerprint(datalist: str | Path, dataset_dir: str | Path, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The fingerprint of a run: its data and the settings that shape the network and the training plan.

    Args:
        datalist: the datalist JSON the run trains on.
        dataset_dir: the data root its paths are relative to.
        settings: JSON-serialisable settings (preset, heads, roi size, stages, learning rate, seed, ...).

    Returns:
        ``{"datalist": path, "datalist_sha256": ..., "dataset_dir": absolute path, "settings": {...}}``.
    """
    return {
        "datalist": str(datalist),
        "datalist_sha256": datalist_digest(datalist),
        "dataset_dir": str(Path(dataset_dir).resolve()),
        "settings": json.loads(json.dumps(settings)),
    }


def _differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    found = []
    if recorded.get("datalist_sha256") != current["datalist_sha256"]:
        found.append(
            f"the datalist: the run trained on {recorded.get('datalist')} (sha256 "
            f"{str(recorded.get('datalist_sha256'))[:12]}), this command gives {current['datalist']} "
            f"(sha256 {current['datalist_sha256'][:12]})"
        )
    if recorded.get("dataset_dir") != current["dataset_dir"]:
        found.append(f"dataset_dir: {recorded.get('dataset_dir')} then, {current['dataset_dir']} now")
    old, new = _current_spelling(recorded.get("settings", {})), _current_spelling(current["settings"])
    for key in sorted(set(old) | set(new)):
        if key in _LATER_SETTINGS and key not in old:  # a record written before the setting was recorded
            continue
        if old.get(key) != new.get(key):
            found.append(f"{key}: {json.dumps(old.get(key))} then, {json.dumps(new.get(key))} now")
    return found


def check_checkpoint_readable(path: str | Path, what: str = "checkpoint", remedy: str = "") -> None:
    """Load ``path`` once on the CPU so that a truncated or foreign file is reported by name before any work.

    Raises:
        RunFolderError: naming the file and what to do.
    """
    try:
        read_checkpoint(path, what=what, remedy=remedy)
    except ValueError as error:
        raise RunFolderError(str(error)) from None


def _epoch_of(path: Path) -> int:
    return int(path.stem.split("=", 1)[1])


_HELD_RUN_FOLDERS: dict[Path, int | None] = {}
"""Run folders this process holds, with the descriptors that keep them locked until it ends."""


def _hold_run_folder(output_dir: Path) -> None:
    """Lock ``output_dir`` (created if needed) until this process ends; a folder it holds already is kept."""
    output_dir.mkdir(parents=True, exist_ok=True)
    key = output_dir.resolve()
    if key not in _HELD_RUN_FOLDERS:
        _HELD_RUN_FOLDERS[key] = lock_folder(
            output_dir,
            f"another training process is running in {output_dir}: a second one would write the same epochs and "
            "checkpoints. Wait for it to end (or stop it), then run the command again to resume; or pass another "
            "--output_dir.",
        )


def _logged_epochs(metrics_csv: Path) -> int:
    """The rows of a run's ``metrics.csv`` below its header (0 without the file)."""
    if not metrics_csv.is_file():
        return 0
    return max(0, len([line for line in metrics_csv.read_text().splitlines() if line.strip()]) - 1)


def prepare_run_folder(
    output_dir: str | Path,
    ckpt_dir: str | Path,
    fingerprint: Mapping[str, Any],
    resume: bool = True,
    initial_checkpoint: str | Path | None = None,
    hold: bool = True,
) -> None:
    """Make sure a run folder belongs to this run before any work starts, and record the fingerprint of a new run.

    - With ``hold``, the folder is locked for the rest of the process (:func:`~medsegdiff_monai.data.files.
      lock_folder`): a second training process started on it (the same command run twice, a requeued job beside a
      live one) is refused instead of writing the same epochs and checkpoints. Under DDP only the main rank holds it.
    - A folder without a run (no checkpoint, no ``metrics.csv``) gets ``run.json`` with ``fingerprint``, also when it
      holds the ``run.json`` of a start that failed before its first epoch ended.
    - A folder holding a run is resumed only when ``resume`` and its ``run.json`` matches ``fingerprint``; otherwise
      this stops with the differences and how to start fresh, so no file of another run is overwritten.
    - The newest checkpoint (which resume loads) and ``initial_checkpoint`` must be readable.

    Args:
        output_dir: the run folder (``metrics.csv``, ``run.json``, the best network).
        ckpt_dir: the folder of the ``checkpoint_epoch=N.pt`` files.
        fingerprint: from :func:`run_fingerprint`.
        resume: whether the command continues a run found in the folder.
        initial_checkpoint: weights loaded before training (None: none).
        hold: lock the folder for the rest of this process.

    Raises:
        RunFolderError: naming the folder or file and what to do.
        FileExistsError: another process holds the folder.
    """
    output_dir, ckpt_dir = Path(output_dir), Path(ckpt_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise RunFolderError(f"output_dir {output_dir} is a file, not a folder: choose another --output_dir.")
    fresh = f"To start a new run, pass another --output_dir (or delete {output_dir})."
    if initial_checkpoint is not None:
        if not Path(initial_checkpoint).is_file():
            raise RunFolderError(f"initial checkpoint {initial_checkpoint} does not exist: check --initial_checkpoint.")
        check_checkpoint_readable(initial_checkpoint, "initial checkpoint", "Give another --initial_checkpoint.")
    if hold:
        _hold_run_folder(output_dir)
    checkpoints = sorted(ckpt_dir.glob(_CHECKPOINT_GLOB), key=_epoch_of) if ckpt_dir.is_dir() else []
    record = output_dir / RUN_FILENAME
    has_run = bool(checkpoints) or (output_dir / "metrics.csv").is_file()
    if not has_run:
        # a run.json alone is left by a start that failed before its first epoch: the folder holds nothing to keep
        recorded = None
    elif record.is_file():
        try:
            recorded = json.loads(record.read_text())
        except json.JSONDecodeError as error:
            raise RunFolderError(f"{record} is not valid JSON ({error}). {fresh}") from None
    else:
        raise RunFolderError(f"{output_dir} holds a run without a {RUN_FILENAME}, so it cannot be checked. {fresh}")
    epochs_logged = _logged_epochs(output_dir / "metrics.csv")
    if has_run and resume and not checkpoints and epochs_logged > 1:
        # one logged epoch may precede its first checkpoint (a stop between the two); more mean they were deleted
        raise RunFolderError(
            f"{output_dir} holds a run of {epochs_logged} logged epochs but no checkpoint in {ckpt_dir} to resume it "
            f"from: it would be trained again from epoch 1 over its model.pt and metrics.csv. {fresh}"
        )
    if has_run and not resume:
        raise RunFolderError(
            f"{output_dir} already holds a run and this command does not resume it (resume off or --run_stage "
            f"given), so it would overwrite its files. {fresh}"
        )
    if recorded is not None:
        differences = _differences(recorded, fingerprint)
        if differences:
            raise RunFolderError(
                f"{output_dir} holds a run of other data or settings; resuming it would mix two runs. Differences: "
                + "; ".join(differences)
                + f". To continue that run, repeat its settings. {fresh}"
                + (
                    f" To publish a finished run's best network, copy {output_dir / 'model.pt'} into the bundle's "
                    "models folder and run the bundle's export with --overwrite true."
                    if any(difference.startswith("update_bundle_model:") for difference in differences)
                    else ""
                )
            )
    if checkpoints:
        previous = f"resume from {checkpoints[-2].name} by deleting it" if len(checkpoints) > 1 else "delete it"
        check_checkpoint_readable(checkpoints[-1], "newest checkpoint", f"To {previous}, or: {fresh}")
    if recorded is None:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomically(record, json.dumps(dict(fingerprint), indent=2) + "\n")  # DDP ranks write it too
    logging.getLogger("medsegdiff_monai").info(f"run folder {output_dir}: {'resuming' if has_run else 'new run'}")


def _randomizables(root: Any) -> Iterator[Randomizable]:
    """Every MONAI ``Randomizable`` reachable from ``root`` through attributes, lists, tuples and dicts, in a fixed
    order (depth first, attribute order), each once."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or obj is None or isinstance(obj, str | bytes | int | float | torch.Tensor | np.ndarray):
            continue
        seen.add(id(obj))
        if isinstance(obj, Randomizable):
            yield obj
        if isinstance(obj, Mapping):
            children = list(obj.values())
        elif isinstance(obj, list | tuple):
            children = list(obj)
        elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("monai", "medsegdiff_monai"):
            children = list(vars(obj).values())
        else:
            children = []
        stack.extend(reversed(children))


def _numpy_state(state: tuple) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}  # fmt: skip


def _numpy_tuple(state: Mapping[str, Any]) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return (state["name"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"])


class RandomState:
    """Every random state a training epoch draws from, with ``state_dict`` / ``load_state_dict`` for checkpoints.

    Saved: torch's CPU generator (and CUDA generators when present), NumPy's and Python's global generators, the
    ``R`` of every MONAI ``Randomizable`` in ``transform`` (the per-sample augmentations), and ``generator`` (a
    data loader's or sampler's own ``torch.Generator``). A run resumed from a checkpoint holding this state
    continues with exactly the draws the uninterrupted run would have made (on one process). The state holds only
    tensors and numbers, so checkpoints still load with ``weights_only=True``.

    Under DDP only rank 0's state is saved. Every other rank that loads it then seeds each generator with a seed drawn
    from that state plus its rank, so the ranks keep drawing different timesteps, noise and augmentations after a
    resume, as they did from their ``seed + rank`` start (the resumed draws are reproducible, not those of the
    uninterrupted run).

    Args:
        transform: the training transform chain (or the dataset holding it).
        generator: an extra generator, e.g. the training data loader's ``generator`` (None: none).
        rank: this process's rank; None reads it from ``torch.distributed`` (0 when it is not initialised).
    """

    def __init__(
        self, transform: Any = None, generator: torch.Generator | None = None, rank: int | None = None
    ) -> None:
        self.transforms = list(_randomizables(transform))
        self.generator = generator
        self.rank = rank

    def state_dict(self) -> dict[str, Any]:
        python_version, python_keys, python_gauss = random.getstate()
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state(np.random.get_state()),
            "python": {
                "version": python_version,
                "keys": torch.tensor(python_keys, dtype=torch.int64),
                "gauss": python_gauss,
            },  # fmt: skip
            "transforms": [_numpy_state(t.R.get_state()) for t in self.transforms],
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if len(state["transforms"]) != len(self.transforms):
            raise ValueError(
                f"the checkpoint holds the random state of {len(state['transforms'])} random transforms, the "
                f"training chain has {len(self.transforms)}: it was written by another transform chain."
            )
        torch.set_rng_state(state["torch"])
        np.random.set_state(_numpy_tuple(state["numpy"]))
        python = state["python"]
        random.setstate((python["version"], tuple(int(k) for k in python["keys"]), python["gauss"]))
        for transform, saved in zip(self.transforms, state["transforms"], strict=True):
            transform.R.set_state(_numpy_tuple(saved))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        if self.generator is not None and "generator" in state:
            self.generator.set_state(state["generator"])
        rank = self.rank
        if rank is None:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if rank > 0:  # rank 0's state: part from it, as the ranks' seed + rank starts did
            # one seed per source from (a draw of the loaded state, rank): no two ranks or sources share a stream
            drawn = int(torch.randint(0, 2**31 - 1, ()))
            torch_seed, numpy_seed, python_seed, generator_seed, *transform_seeds = np.random.SeedSequence(
                [drawn, rank]
            ).generate_state(4 + len(self.transforms))
            torch.manual_seed(int(torch_seed))  # CUDA generators too
            np.random.seed(numpy_seed)
            random.seed(int(python_seed))
            for transform, seed in zip(self.transforms, transform_seeds, strict=True):
                transform.set_random_state(seed=int(seed))
            if self.generator is not None:
                self.generator.manual_seed(int(generator_seed))


def prune_checkpoints(ckpt_dir: str | Path, keep: int) -> list[Path]:
    """Remove all but the ``keep`` newest ``checkpoint_epoch=N.pt`` of ``ckpt_dir`` (e.g. those an earlier process of
    the same run left behind) and the temporary files of a killed atomic save; returns the removed files."""
    files = sorted(Path(ckpt_dir).glob(_CHECKPOINT_GLOB), key=_epoch_of)
    removed = files[:-keep] if keep > 0 else files
    removed += [p for p in Path(ckpt_dir).glob("tmp*") if p.is_file()]  # temporaries of a save that was killed
    for path in removed:
        path.unlink(missing_ok=True)
    return removed
