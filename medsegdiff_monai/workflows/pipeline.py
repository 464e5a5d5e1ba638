"""Whole-subject inference: NIfTI in, BraTS label map, uncertainty map and grade out, on the input's grid."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, ConvertToMultiChannelBasedOnBratsClasses, Invertd, Transform
from torch import nn
from tqdm.auto import tqdm

from medsegdiff_monai.data import (
    ENHANCING_LABEL,
    RELEASE_TITLES,
    RELEASES,
    convert_label_convention,
    release_of_file,
)
from medsegdiff_monai.data.files import lock_folder, write_text_atomically
from medsegdiff_monai.inferers.sampler import DiffusionSampler
from medsegdiff_monai.inferers.volume import sample_volume
from medsegdiff_monai.metrics.segmentation import BRATS_REGIONS
from medsegdiff_monai.metrics.uncertainty import QU_BRATS_MAP_KINDS, QU_BRATS_REGION_NAMES, qu_brats_region_map
from medsegdiff_monai.transforms import get_inference_transforms, regions_to_brats_labels, suppress_small_enhancing
from medsegdiff_monai.utils import quoted_names
from medsegdiff_monai.visualize import write_overlay_png
from medsegdiff_monai.workflows.inputs import InputSource, check_inference_inputs, is_datalist, resolve_entries
from medsegdiff_monai.workflows.writers import GRADES_CSV_COLUMNS, write_grades_csv, write_nifti_like

__all__ = [
    "BratsVolumeInferer",
    "SubjectOutput",
    "SubjectPrediction",
    "check_inference_run",
    "check_no_earlier_outputs",
    "check_output_folder",
    "partial_folders",
    "subjects_of_stopped_runs",
]

GRADES_FILENAME = "grades.csv"
REGION_UNCERTAINTY_KINDS = {region: f"unc_{name}" for region, name in QU_BRATS_REGION_NAMES.items()}
"""The kind (:attr:`SubjectOutput.files` key) of each region's QU-BraTS uncertainty map, by region."""
REGION_UNCERTAINTY_SUFFIXES = {region: f"_{kind}.nii.gz" for region, kind in REGION_UNCERTAINTY_KINDS.items()}
"""File-name ending of each region's QU-BraTS uncertainty map (``write_region_uncertainty``), by region."""
OUTPUT_SUFFIXES = ("_seg.nii.gz", "_uncertainty.nii.gz", "_overlay.png", *REGION_UNCERTAINTY_SUFFIXES.values())
"""File name endings of one subject's outputs (``<subject_id><suffix>``)."""
_FLAIR = 3


PARTIAL_PREFIX = ".partial-"
"""Name start of the temporary folder inside ``output_dir`` where a run writes before moving its files in."""
FINISHED_SUBJECTS_FILENAME = ".finished_subjects.json"
"""In the temporary folder: the subjects written there so far, with their input files' sizes and times."""


def _input_signature(entry: dict[str, Any]) -> list[list[Any]]:
    """Path, size and modification time of each input image of ``entry``."""
    signature = []
    for path in entry["image"]:
        status = os.stat(path)
        signature.append([str(Path(path).resolve()), status.st_size, status.st_mtime_ns])
    return signature


def _finished_subjects(staging: Path) -> dict[str, Any]:
    """The subjects an earlier run finished in ``staging`` (empty when none or unreadable)."""
    try:
        return json.loads((staging / FINISHED_SUBJECTS_FILENAME).read_text())
    except (OSError, ValueError):
        return {}


def _plain_settings(transform: Any) -> list[Any]:
    """A transform's class and the settings held in plain attributes (numbers, strings, tuples of them), and those
    of the transforms it wraps (a dict transform's array transform)."""
    plain = (int, float, str, bool, type(None))
    settings: dict[str, Any] = {}
    for name, value in sorted(vars(transform).items()):
        if isinstance(value, plain) or (isinstance(value, (tuple, list)) and all(isinstance(v, plain) for v in value)):
            settings[name] = value
        elif isinstance(value, Transform):
            settings[name] = _plain_settings(value)
    return [type(transform).__qualname__, settings]


def subjects_of_stopped_runs(output_dir: str | Path) -> set[str]:
    """The subjects that stopped runs finished in the temporary folders inside ``output_dir``; a stopped run may have
    begun to move their files (and an evaluation's report) in, after it had checked the folder."""
    return {subject_id for folder in partial_folders(output_dir) for subject_id in _finished_subjects(folder)}


def partial_folders(output_dir: str | Path) -> list[Path]:
    """The temporary ``.partial-*`` folders that interrupted runs left inside ``output_dir``."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    return sorted(p for p in output_dir.glob(f"{PARTIAL_PREFIX}*") if p.is_dir())


@contextlib.contextmanager
def _exclusive_output_folder(output_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the folder ``output_dir`` for one run's writing (:func:`lock_folder`).

    Raises:
        FileExistsError: when another run holds it.
    """
    in_use = (
        f"another run is writing into {output_dir}. Nothing was written. Wait for it to finish, or choose another "
        "--output_dir."
    )
    descriptor = lock_folder(output_dir, in_use)
    try:
        yield
    finally:
        if descriptor is not None:
            os.close(descriptor)  # releases the lock


def check_output_folder(
    output_dir: str | Path,
    source: Any = None,
    data_dir: str | Path | None = None,
    entries: Sequence[dict[str, Any]] = (),
) -> None:
    """Refuse an ``output_dir`` that a run could not write into at its end: a file, or a folder whose
    ``grades.csv`` is not a table of ``subject_id,p_hgg,grade`` rows (a run updates that table by subject); and one
    inside the input folder ``source`` (a release or a subject folder; for a datalist JSON its data root
    ``data_dir``, by default the JSON's folder; for ``entries``, every folder named by its subject and, for files
    named as in a BraTS release, the folder holding it), where a later read of that folder would take the outputs
    for a subject or a second label file; and one this process cannot write into (or create).

    Raises:
        FileExistsError / ValueError: naming the path and what to do.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"output_dir {output_dir} is a file, not a folder: choose another --output_dir.")
    folders = []
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        folders.append(Path(source))
    elif is_datalist(source):
        folders.append(Path(data_dir) if data_dir is not None else Path(source).parent)
    for entry in entries:  # a release's subject folder carries the subject's name; the release holds it
        subject_folder = Path(entry["image"][0]).parent
        if subject_folder.name == str(entry.get("subject_id")):
            folders.append(subject_folder)
            # files named as in a release (not bare t1.nii, whose subject id is the folder's name whatever holds it)
            if release_of_file(entry["image"][0]) is not None:
                folders.append(subject_folder.parent)
    resolved = output_dir.resolve()
    for folder in dict.fromkeys(folder.resolve() for folder in folders):
        if resolved == folder or folder in resolved.parents:
            raise ValueError(
                f"output_dir {output_dir} lies inside the input folder {folder}: a later read of that folder would "
                "take the outputs for a subject. Choose an --output_dir outside it."
            )
    writable = output_dir
    while not writable.exists() and writable != writable.parent:
        writable = writable.parent
    try:
        with tempfile.TemporaryFile(dir=writable):
            pass
    except OSError as error:
        raise PermissionError(
            f"output_dir {output_dir} cannot be written: {error.strerror} in {writable}. Choose another --output_dir "
            "or make it writable."
        ) from None
    grades = output_dir / GRADES_FILENAME
    if grades.is_file():
        with open(grades, newline="", encoding="utf-8-sig") as f:
            columns = next(csv.reader(f), [])
        if columns != list(GRADES_CSV_COLUMNS):
            raise ValueError(
                f"{grades} has the columns {columns}, not {list(GRADES_CSV_COLUMNS)}: a run rewrites that table with "
                "its three columns, so move the file away or choose another --output_dir."
            )


def check_no_earlier_outputs(output_dir: str | Path, subject_ids: Sequence[str]) -> None:
    """Refuse an output folder that already holds outputs (files or ``grades.csv`` rows) of ``subject_ids``.

    Raises:
        FileExistsError: naming the folder, the subjects and the files, and how to proceed.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return
    found: dict[str, list[str]] = {}
    for subject_id in subject_ids:
        names = [subject_id + suffix for suffix in OUTPUT_SUFFIXES if (output_dir / (subject_id + suffix)).exists()]
        if names:
            found[subject_id] = names
    grades = output_dir / GRADES_FILENAME
    if grades.is_file():
        with open(grades, newline="", encoding="utf-8-sig") as f:
            graded = {row.get("subject_id") for row in csv.DictReader(f)}
        for subject_id in subject_ids:
            if subject_id in graded:
                found.setdefault(subject_id, []).append(f"{GRADES_FILENAME} row")
    if found:
        listed = "; ".join(f"{s}: {', '.join(names)}" for s, names in found.items())
        raise FileExistsError(
            f"output folder {output_dir} already holds outputs of {len(found)} of these subject(s) ({listed}). "
            "Nothing was written. Pass --overwrite true to replace them, or choose another --output_dir."
        )


def check_inference_run(
    source: InputSource | Sequence[dict[str, Any]],
    output_dir: str | Path,
    checkpoint: str | Path | None,
    roi_size: Sequence[int],
    roi_multiple: int,
    datalist_key: str = "validation",
    data_dir: str | Path | None = None,
    num_cases: int | None = None,
    overwrite: bool = False,
    allow_empty_modality: bool = False,
) -> list[dict[str, Any]]:
    """Everything an inference run reads or would overwrite, checked before the network is loaded.

    In order: ``roi_size`` against the network's downsampling, the input (datalist JSON, folder or files) and the
    headers, label values and modality contents of every subject, the output folder (:func:`check_output_folder`;
    earlier outputs of the same subjects need ``overwrite``), and that ``checkpoint`` is a readable file.

    Returns:
        the subject entries.

    Raises:
        ValueError / FileNotFoundError / FileExistsError: naming the setting, file or folder and what to do.
    """
    from medsegdiff_monai.data.preflight import check_roi_size
    from medsegdiff_monai.handlers.run_state import check_checkpoint_readable

    check_roi_size(roi_size, roi_multiple)
    entries = resolve_entries(source, datalist_key, data_dir, num_cases)
    check_inference_inputs(entries, check_voxels=False, allow_empty_modality=allow_empty_modality)
    check_output_folder(output_dir, source, data_dir, entries)
    if not overwrite:  # the run itself checks the subjects a stopped run may have begun to move in
        begun = subjects_of_stopped_runs(output_dir)
        check_no_earlier_outputs(
            output_dir, [str(e["subject_id"]) for e in entries if str(e["subject_id"]) not in begun]
        )
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(
                f"checkpoint {os.path.abspath(checkpoint)} does not exist. Its default, models/model.pt, is relative "
                "to bundle_root ('.' unless given): run from inside the bundle folder or pass --bundle_root (e.g. "
                "--bundle_root bundle from the repository root), or pass your own network (the run folder's "
                "model.pt) with --checkpoint."
            )
        check_checkpoint_readable(checkpoint, remedy="Pass a complete file with --checkpoint.")
    return entries


@dataclass
class SubjectPrediction:
    """One subject's inference result, on the input's grid (what :meth:`BratsVolumeInferer.predict` returns).

    Attributes:
        subject_id: the subject.
        labels: (X, Y, Z) uint8 BraTS labels 0/1/2/4 (ET = 3 in the BraTS 2023+ convention: ``label_convention``).
        uncertainty: (X, Y, Z) float32 ensemble std reduced over the regions.
        p_hgg: subject-level p(HGG), or None without a grade head.
        reference: the input file whose affine and shape the outputs share (the t1 image).
        region_uncertainty: (3, X, Y, Z) uint8 QU-BraTS uncertainty map of each region (TC, WT, ET), 0 to 100,
            with ``write_region_uncertainty``; else None.
    """

    subject_id: str
    labels: np.ndarray
    uncertainty: np.ndarray
    p_hgg: float | None
    reference: Path
    region_uncertainty: np.ndarray | None = None


@dataclass
class SubjectOutput:
    """What :meth:`BratsVolumeInferer.run` wrote for one subject (the volumes stay on disk, not in memory).

    Attributes:
        subject_id: the subject.
        p_hgg: subject-level p(HGG), or None without a grade head.
        files: ``{"seg": ..., "uncertainty": ...[, "overlay": ...][, "unc_whole": ..., "unc_core": ...,
            "unc_enhance": ...]}`` paths in the output folder.
    """

    subject_id: str
    p_hgg: float | None
    files: dict[str, Path]


class BratsVolumeInferer:
    """
    Segment and grade whole BraTS subjects with the diffusion network, and write the results.

    Per subject: the inference transforms (RAS, crop to the brain, z-score, in-plane pad/crop to ``roi_size``),
    :func:`~medsegdiff_monai.inferers.sample_volume` over the axial slices, then MONAI ``Invertd`` of the same
    transforms, so the outputs lie exactly on the input's grid (shape and affine). Files written in ``output_dir``:

    - ``<subject_id>_seg.nii.gz``: uint8 BraTS labels (ET -> 4, or 3 in the BraTS 2023+ convention; TC \\ ET -> 1,
      WT \\ TC -> 2) at ``threshold``, an ET of fewer than ``min_enhancing_voxels`` voxels relabelled 1
      (:func:`suppress_small_enhancing`);
    - ``<subject_id>_uncertainty.nii.gz``: float32 std of the ensemble's probabilities, reduced over the regions
      by ``uncertainty_reduction`` (``"max"`` or ``"mean"``);
    - ``<subject_id>_overlay.png`` (with ``write_overlays``): FLAIR slice with the most tumour, without and with
      the labels;
    - ``<subject_id>_unc_whole.nii.gz``, ``_unc_core``, ``_unc_enhance`` (with ``write_region_uncertainty``): each
      region's QU-BraTS uncertainty map, uint8 0 (certain) to 100, of the kind ``region_uncertainty_map``
      (:func:`~medsegdiff_monai.metrics.qu_brats_region_map`);
    - ``grades.csv``: ``subject_id,p_hgg,grade`` (``grade`` HGG / LGG at p >= 0.5), when the network grades.

    Every input file is read and checked before inference starts, and outputs are first written to a temporary
    folder ``.partial-<settings digest>`` inside ``output_dir`` and moved into it only when every subject succeeded, so
    a failed run leaves no partial outputs. The subjects a stopped run finished stay in that folder, and a run of the
    same settings (see ``_run_key``: weights and their layout, sampler, compilation, slice batch, device, transforms,
    output settings) continues from them where their input files are unchanged, and moves in only its own subjects;
    a run of other settings removes the folder. Only ``output_dir`` itself must be writable, on whatever file system.
    One run at a time writes into a folder: a second one is refused while the first holds it. A folder that already
    holds outputs of the same subjects is refused unless ``overwrite``; ``grades.csv`` is updated by subject, so the
    grades of other subjects stay.

    Args:
        network: the trained network (``encode_condition`` / ``denoise``), e.g. ``DiffusionUNetWithGradeHead`` or
            :class:`~medsegdiff_monai.workflows.ExportedDiffusionNetwork`.
        sampler: the diffusion sampler (steps, scheduler, ensemble size, seed).
        roi_size: in-plane size of the transforms (the training ``roi_size``); a subject whose brain is wider is
            padded further, never cropped, with a warning.
        slice_batch_size: slices sampled together (times ``ensemble_size`` network inputs per step); None: the
            device's default (:func:`~medsegdiff_monai.inferers.default_slice_batch_size`).
        threshold: probability above which a voxel belongs to a region.
        min_enhancing_voxels: an ET prediction of fewer voxels becomes necrotic / non-enhancing core (label 1);
            0 (default) keeps every prediction.
        device: where to run the network (default: the network's device).
        uncertainty_reduction: ``"max"`` or ``"mean"`` of the per-region std.
        write_overlays: also write a PNG overlay per subject.
        write_region_uncertainty: also write the three per-region uncertainty maps of the BraTS uncertainty
            challenge (QU-BraTS).
        region_uncertainty_map: how those maps are made: ``"near_miss"`` (default; the voxels left out of the
            predicted region by a narrow margin of the ensemble's mean probability,
            :func:`~medsegdiff_monai.metrics.qu_brats_near_miss_map`) or ``"ensemble_std"`` (the members' spread
            on both sides of the border, :func:`~medsegdiff_monai.metrics.qu_brats_map`).
        progress: show a tqdm bar over subjects.
        transforms: the invertible inference chain; default ``get_inference_transforms(roi_size)``.
        overwrite: replace the outputs of subjects that ``output_dir`` already holds.
        allow_empty_modality: accept an all-zero or constant modality instead of refusing the subject.
        compile_min_volumes: with a compiling sampler (``sampler.compile``), a run of fewer volumes runs eagerly,
            since compilation (seconds, once per process) would cost more than it saves; 1 always compiles. Once
            this process holds the compiled denoiser, every run uses it.
        label_convention: label values of the written segmentations: ``"auto"`` follows the naming of each
            subject's T1 file (BraTS 2023+ names such as ``...-t1n.nii.gz`` or a bare ``t1n.nii.gz`` give ET = 3,
            any other name ET = 4), ``"brats2020"`` (ET = 4, BraTS 2018-2022, 2021 included) or ``"brats2023"``
            (ET = 3, BraTS 2023+); another value (a release year such as ``"brats2021"``) is refused, naming the
            release years of each convention.
    """

    def __init__(
        self,
        network: nn.Module,
        sampler: DiffusionSampler,
        roi_size: Sequence[int] = (192, 192),
        slice_batch_size: int | None = None,
        threshold: float = 0.5,
        min_enhancing_voxels: int = 0,
        device: str | torch.device | None = None,
        uncertainty_reduction: str = "max",
        write_overlays: bool = False,
        progress: bool = True,
        transforms: Compose | None = None,
        overwrite: bool = False,
        allow_empty_modality: bool = False,
        compile_min_volumes: int = 1,
        label_convention: str = "auto",
        write_region_uncertainty: bool = False,
        region_uncertainty_map: str = QU_BRATS_MAP_KINDS[0],
    ) -> None:
        if label_convention not in ("auto", *RELEASES):
            valid = quoted_names(("auto", *RELEASES), "or")
            conventions = ", ".join(
                f"{release!r} is the label convention of {RELEASE_TITLES[release]} (ET = {ENHANCING_LABEL[release]})"
                for release in RELEASES
            )
            raise ValueError(
                f"label_convention must be {valid}, got {label_convention!r}: {conventions}; 'auto' follows each "
                "subject's T1 file name."
            )
        if compile_min_volumes < 1:
            raise ValueError(f"compile_min_volumes must be >= 1, got {compile_min_volumes}.")
        if slice_batch_size is not None and slice_batch_size < 1:
            raise ValueError(
                f"slice_batch_size must be >= 1 (or None for the device's default), got {slice_batch_size}."
            )
        if min_enhancing_voxels < 0:
            raise ValueError(f"min_enhancing_voxels must be >= 0, got {min_enhancing_voxels}.")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold is a probability strictly between 0 and 1, got {threshold}.")
        if region_uncertainty_map not in QU_BRATS_MAP_KINDS:
            raise ValueError(
                f"region_uncertainty_map must be {quoted_names(QU_BRATS_MAP_KINDS, 'or')}, got "
                f"{region_uncertainty_map!r}."
            )
        if region_uncertainty_map != QU_BRATS_MAP_KINDS[0] and not write_region_uncertainty:
            warnings.warn(
                f"region_uncertainty_map {region_uncertainty_map!r} has no effect without write_region_uncertainty "
                "(--write_region_uncertainty true), which writes the maps.",
                stacklevel=2,
            )
        if uncertainty_reduction not in ("max", "mean"):
            raise ValueError(f"uncertainty_reduction must be 'max' or 'mean', got {uncertainty_reduction!r}.")
        if device is None:
            parameter = next(network.parameters(), None)
            device = parameter.device if parameter is not None else "cpu"
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.sampler = sampler
        self.slice_batch_size = slice_batch_size
        self.threshold = threshold
        self.min_enhancing_voxels = min_enhancing_voxels
        self.uncertainty_reduction = uncertainty_reduction
        self.write_overlays = write_overlays
        self.write_region_uncertainty = write_region_uncertainty
        self.region_uncertainty_map = region_uncertainty_map
        self.progress = progress
        self.overwrite = overwrite
        self.allow_empty_modality = allow_empty_modality
        self.compile_min_volumes = compile_min_volumes
        self.label_convention = label_convention
        self.roi_size = tuple(int(side) for side in roi_size)
        self.transforms = transforms if transforms is not None else get_inference_transforms(roi_size)
        inverted = ["probs", "uncertainty"] + (["region_uncertainty"] if write_region_uncertainty else [])
        self.inverter = Invertd(keys=inverted, transform=self.transforms, orig_keys="image", nearest_interp=False)
        self.logger = logging.getLogger(__name__)

    def _runs_eagerly(self, num_volumes: int) -> bool:
        """Switch a compiling sampler to eager for a run of ``num_volumes`` that compilation would slow down
        (``compile_min_volumes``); ``run`` switches it back. Returns whether it was switched."""
        if not self.sampler.compile or num_volumes >= self.compile_min_volumes:
            return False
        if self.sampler.is_compiled_for(self.network):
            return False
        self.logger.info(
            f"compile: {num_volumes} volume(s) run eagerly; compilation pays from compile_min_volumes="
            f"{self.compile_min_volumes} volumes in one run"
        )
        self.sampler.compile = False
        return True

    def predict(self, entry: dict[str, Any]) -> SubjectPrediction:
        """Segment and grade one subject entry (``{"image": [t1, t1ce, t2, flair], "subject_id": ...}``)."""
        sample = {key: entry[key] for key in ("image", "subject_id") if entry.get(key) is not None}
        data = self.transforms(sample)
        image: MetaTensor = data["image"]
        if any(side > roi for side, roi in zip(image.shape[1:3], self.roi_size)):
            self.logger.warning(
                f"subject {data['subject_id']}: the brain is wider than roi_size {list(self.roi_size)}; its slices "
                f"are padded to {list(image.shape[1:3])} instead (none of it is cropped; the network sees larger "
                "slices than roi_size, which should be the size it was trained on)"
            )
        with torch.no_grad():
            volume = sample_volume(
                self.network, image.as_tensor().to(self.device), self.sampler, slice_batch_size=self.slice_batch_size
            )
        reduce = torch.amax if self.uncertainty_reduction == "max" else torch.mean
        uncertainty = reduce(volume.uncertainty, dim=0, keepdim=True)
        outputs = {"probs": volume.probs, "uncertainty": uncertainty}
        if self.write_region_uncertainty:
            outputs["region_uncertainty"] = volume.uncertainty
        for key, value in outputs.items():
            data[key] = MetaTensor(value.float().cpu(), meta=image.meta, applied_operations=image.applied_operations)
        inverted = self.inverter(data)
        labels = regions_to_brats_labels(inverted["probs"].as_tensor(), self.threshold)[0]
        labels = suppress_small_enhancing(labels, self.min_enhancing_voxels)
        region_maps = self._region_maps(inverted, labels) if self.write_region_uncertainty else None
        labels = convert_label_convention(labels, "brats2020", self.output_release(entry["image"][0]))
        return SubjectPrediction(
            subject_id=str(data["subject_id"]),
            labels=labels.numpy().astype(np.uint8),
            uncertainty=inverted["uncertainty"].as_tensor()[0].numpy().astype(np.float32),
            p_hgg=volume.p_hgg,
            reference=Path(entry["image"][0]),
            region_uncertainty=region_maps,
        )

    def _region_maps(self, inverted: dict[str, Any], labels: torch.Tensor) -> np.ndarray:
        """(3, X, Y, Z) uint8 QU-BraTS maps of TC, WT and ET on the input grid, from the inverted probabilities and
        per-region std and the written labels (BraTS 2020 convention) as the predicted regions."""
        predicted = ConvertToMultiChannelBasedOnBratsClasses()(labels[None]).numpy().astype(bool)
        probs = inverted["probs"].as_tensor().numpy()
        std = inverted["region_uncertainty"].as_tensor().numpy()
        return np.stack(
            [qu_brats_region_map(self.region_uncertainty_map, probs[i], std[i], predicted[i]) for i in range(3)]
        )

    def _write_run(
        self,
        entries: list[dict[str, Any]],
        output_dir: Path,
        staging: Path,
        finalize: Callable[[Path, list[SubjectOutput]], None] | None,
    ) -> list[SubjectOutput]:
        """Sample every entry into ``staging`` (keeping the subjects an interrupted run of the same settings
        finished there, where their input files are unchanged), then move the files into ``output_dir``."""
        finished = _finished_subjects(staging)
        reused = {}
        for entry in entries:
            record = finished.get(str(entry["subject_id"]))
            if (
                record is not None
                and record["inputs"] == _input_signature(entry)
                and all((staging / name).is_file() for name in record["files"].values())
            ):
                reused[str(entry["subject_id"])] = record
        if reused:
            self.logger.info(
                f"continuing an interrupted run of the same settings: {len(reused)} of {len(entries)} subject(s) "
                f"were already sampled in {staging}"
            )
        outputs = []
        for entry in tqdm(entries, desc="subjects", unit="subject", disable=not self.progress):
            subject_id = str(entry["subject_id"])
            if subject_id in reused:
                names, p_hgg = reused[subject_id]["files"], reused[subject_id]["p_hgg"]
            else:
                prediction = self.predict(entry)
                names, p_hgg = self._write_subject(prediction, staging, entry), prediction.p_hgg
                finished[subject_id] = {"inputs": _input_signature(entry), "files": names, "p_hgg": p_hgg}
                write_text_atomically(staging / FINISHED_SUBJECTS_FILENAME, json.dumps(finished))
            files = {kind: output_dir / name for kind, name in names.items()}
            outputs.append(SubjectOutput(subject_id, p_hgg, files))
        graded = [(o.subject_id, o.p_hgg) for o in outputs if o.p_hgg is not None]
        earlier_grades = output_dir / GRADES_FILENAME
        if graded or earlier_grades.is_file():  # an earlier row of a subject run again is replaced or dropped
            ungraded = [o.subject_id for o in outputs if o.p_hgg is None]
            write_grades_csv(graded, staging / GRADES_FILENAME, update=earlier_grades, drop=ungraded)
        names = {path.name for output in outputs for path in output.files.values()} | {GRADES_FILENAME}
        if finalize is not None:
            finalize(staging, outputs)
            subject_files = {name for record in finished.values() for name in record["files"].values()}
            names |= {p.name for p in staging.iterdir() if not p.name.startswith(".")} - subject_files
        # only this run's files: a subject that a stopped run of other inputs finished there is left out
        for name in sorted(names):
            if (staging / name).is_file():
                os.replace(staging / name, output_dir / name)
        for output in outputs:  # a file of an earlier run (an overlay) that this run did not write again
            written = {path.name for path in output.files.values()}
            for suffix in OUTPUT_SUFFIXES:
                if (name := output.subject_id + suffix) not in written:
                    (output_dir / name).unlink(missing_ok=True)
        return outputs

    def _write_subject(self, prediction: SubjectPrediction, folder: Path, entry: dict[str, Any]) -> dict[str, str]:
        """Write one subject's files into ``folder``; returns their names by kind."""
        reference = nib.load(str(prediction.reference))
        names = {kind: f"{prediction.subject_id}_{kind}.nii.gz" for kind in ("seg", "uncertainty")}
        write_nifti_like(prediction.labels, reference, folder / names["seg"])
        write_nifti_like(prediction.uncertainty, reference, folder / names["uncertainty"])
        if self.write_overlays:
            names["overlay"] = f"{prediction.subject_id}_overlay.png"
            flair = nib.load(str(entry["image"][_FLAIR]))
            # the overlay slices axis 2 and puts anterior up for RAS arrays: both are turned to RAS axes first
            to_ras = nib.orientations.io_orientation(flair.affine)
            write_overlay_png(
                nib.orientations.apply_orientation(np.asarray(flair.dataobj, dtype=np.float32), to_ras),
                nib.orientations.apply_orientation(prediction.labels, to_ras),
                folder / names["overlay"],
            )
        if prediction.region_uncertainty is not None:
            for region, region_map in zip(BRATS_REGIONS, prediction.region_uncertainty, strict=True):
                kind = REGION_UNCERTAINTY_KINDS[region]
                names[kind] = prediction.subject_id + REGION_UNCERTAINTY_SUFFIXES[region]
                write_nifti_like(region_map, reference, folder / names[kind])
        return names

    def run(
        self,
        source: InputSource | Sequence[dict[str, Any]],
        output_dir: str | Path,
        datalist_key: str = "validation",
        data_dir: str | Path | None = None,
        num_cases: int | None = None,
        finalize: Callable[[Path, list[SubjectOutput]], None] | None = None,
    ) -> list[SubjectOutput]:
        """
        Run inference on every subject of ``source`` and write the outputs into ``output_dir``.

        Args:
            source: a BraTS folder, a datalist JSON, four modality files (see
                :func:`~medsegdiff_monai.workflows.collect_inference_inputs`), or a list of subject entries.
            output_dir: output folder (created if needed); earlier outputs of the same subjects are replaced only
                with ``overwrite``.
            datalist_key: list of a datalist to run on.
            data_dir: data root of a datalist's relative paths (default: the JSON's folder).
            num_cases: only the first ``num_cases`` subjects (None: all).
            finalize: called with the temporary folder and the outputs once every subject is written there, before
                anything moves into ``output_dir`` (the outputs' ``files`` name their final paths; the same names
                lie in the temporary folder); what it writes into that folder moves in with them, and an error in
                it leaves ``output_dir`` as it was (e.g. :func:`~medsegdiff_monai.workflows.run_evaluation`'s
                report).

        Returns:
            one :class:`SubjectOutput` per subject, in input order.

        Raises:
            FileNotFoundError / ValueError: for bad inputs, naming the file, before anything is written.
            FileExistsError: when ``output_dir`` holds outputs of the same subjects and ``overwrite`` is False, or
                another run is writing into it.
        """
        entries = resolve_entries(source, datalist_key, data_dir, num_cases)
        check_inference_inputs(entries, allow_empty_modality=self.allow_empty_modality)
        output_dir = Path(output_dir)
        check_output_folder(output_dir, source, data_dir, entries)
        created = not output_dir.exists()
        output_dir.mkdir(parents=True, exist_ok=True)
        eager = self._runs_eagerly(len(entries))
        try:
            with _exclusive_output_folder(output_dir):
                staging = output_dir / f"{PARTIAL_PREFIX}{self._run_key()}"
                if not self.overwrite:  # a subject that a stopped run of these settings had begun to move in is its own
                    moved = set(_finished_subjects(staging))
                    check_no_earlier_outputs(
                        output_dir, [str(e["subject_id"]) for e in entries if str(e["subject_id"]) not in moved]
                    )
                for leftover in partial_folders(output_dir):
                    if leftover != staging:
                        count = len(_finished_subjects(leftover))
                        self.logger.warning(
                            f"removing {leftover}, what an interrupted run of other settings had written ({count} "
                            "subject(s)); it cannot be continued with these settings"
                        )
                        shutil.rmtree(leftover, ignore_errors=True)
                staging.mkdir(exist_ok=True)
                succeeded = False
                try:
                    outputs = self._write_run(entries, output_dir, staging, finalize)
                    succeeded = True
                    left_out = set(_finished_subjects(staging)) - {output.subject_id for output in outputs}
                    if left_out:
                        self.logger.warning(
                            f"removing {len(left_out)} subject(s) that an interrupted run of these settings had "
                            f"sampled and this run does not list ({', '.join(sorted(left_out)[:5])})"
                        )
                finally:
                    if succeeded or not _finished_subjects(staging):
                        shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            if created and output_dir.is_dir() and not any(output_dir.iterdir()):
                output_dir.rmdir()
            raise
        finally:
            if eager:
                self.sampler.compile = True
        self.logger.info(f"wrote {len(outputs)} subject(s) to {output_dir}")
        return outputs

    def output_release(self, t1_file: str | Path) -> str:
        """The label convention (one of :data:`~medsegdiff_monai.data.RELEASES`) of a subject's written labels."""
        if self.label_convention != "auto":
            return self.label_convention
        return release_of_file(t1_file, bare=True) or "brats2020"

    def _run_key(self) -> str:
        """A digest of everything besides the input that shapes a subject's outputs: the network's weights and
        their layout, the sampler (compiled or not, as this run will run it), the slice batch, the device kind and
        the inferer's settings. A run of the same key continues what an interrupted one left in its temporary
        folder."""
        digest = hashlib.sha256()
        for name, tensor in self.network.state_dict().items():
            digest.update(f"{name} {tensor.dtype} {tensor.stride()}".encode())  # the layout (channels-last) too
            digest.update(memoryview(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()))
        sampler = self.sampler
        settings = {
            "sampler": [sampler.scheduler_name, sampler.timesteps, sampler.ensemble_size, sampler.seed, sampler.eta],
            "sampler_options": [sampler.shared_steps, str(sampler.amp_dtype), sampler.cpu_amp, sampler.compile],
            "slice_batch_size": self.slice_batch_size,
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else self.device.type,
            "transforms": [_plain_settings(transform) for transform in self.transforms.transforms],
            "outputs": [
                self.threshold,
                self.min_enhancing_voxels,
                self.uncertainty_reduction,
                self.write_overlays,
                self.label_convention,
                self.write_region_uncertainty,
                self.region_uncertainty_map,
            ],
        }
        scheduler = sampler.scheduler
        settings["noise"] = [type(scheduler).__name__, str(getattr(scheduler, "prediction_type", ""))]
        digest.update(json.dumps(settings, default=str).encode())
        digest.update(memoryview(scheduler.alphas_cumprod.double().cpu().contiguous().numpy()))
        return digest.hexdigest()[:16]
