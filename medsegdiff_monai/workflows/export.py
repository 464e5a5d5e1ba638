"""Export the diffusion network with ``torch.export`` as two programs (condition encoder, denoiser) and reload it."""

from __future__ import annotations

import copy
import glob
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from medsegdiff_monai.networks import ConditionFeatures, get_network
from medsegdiff_monai.networks.checkpoint import load_network_weights

__all__ = [
    "ExportedDiffusionNetwork",
    "export_from_checkpoint",
    "export_network",
    "exported_program_paths",
    "load_exported_network",
]


class _ConditionEncoder(nn.Module):
    """``image -> (features, calib_map, grade_logits)`` as plain tensors (``grade_logits`` absent without a head)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, image: Tensor) -> tuple[Any, ...]:
        condition = self.network.encode_condition(image)
        outputs: tuple[Any, ...] = (tuple(condition.features), condition.calib_map)
        return outputs if condition.grade_logits is None else (*outputs, condition.grade_logits)


class _MaskDenoiser(nn.Module):
    """``(x_t, t, features, calib_map) -> seg_logits``."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x_t: Tensor, t: Tensor, features: tuple[Tensor, ...], calib_map: Tensor) -> Tensor:
        return self.network.denoise(x_t, t, ConditionFeatures(tuple(features), calib_map, None))


def exported_program_paths(directory: str | Path, prefix: str = "model") -> tuple[Path, Path]:
    """Files of an exported network: ``<prefix>_condition.pt2`` and ``<prefix>_denoise.pt2`` in ``directory``."""
    directory = Path(directory)
    return directory / f"{prefix}_condition.pt2", directory / f"{prefix}_denoise.pt2"


def export_network(
    network: nn.Module,
    directory: str | Path,
    image_size: Sequence[int],
    prefix: str = "model",
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """
    Export ``network`` with ``torch.export`` for inference without the Python package.

    Two programs are written because sampling runs the condition network once per slice and the denoiser at every
    step: ``<prefix>_condition.pt2`` (``image (B, 4, H, W) -> (features, calib_map[, grade_logits])``) and
    ``<prefix>_denoise.pt2`` (``(x_t, t, features, calib_map) -> seg_logits``). The batch size is dynamic; the
    in-plane size is fixed to ``image_size`` (the bundle's ``roi_size``). Reload with :func:`load_exported_network`.

    Args:
        network: a ``DiffusionUNetWithGradeHead`` (or a module with the same ``encode_condition`` / ``denoise``).
        directory: output folder (created if needed).
        image_size: (H, W) of the slices the programs will take.
        prefix: file name prefix.
        overwrite: replace programs of the same names; without it, existing ones stop the export before any work.

    Returns:
        the paths of the condition and denoiser programs (each written to a temporary file, then renamed).

    Raises:
        FileExistsError: naming the existing programs, unless ``overwrite``.
    """
    directory = Path(directory)
    paths = exported_program_paths(directory, prefix)
    existing = [str(path) for path in paths if path.exists()]
    if existing and not overwrite:
        verb, pronoun = ("exist", "them") if len(existing) > 1 else ("exists", "it")
        raise FileExistsError(
            f"{' and '.join(existing)} already {verb}. Pass --overwrite true to replace {pronoun}, or choose another "
            "--export_dir."
        )
    directory.mkdir(parents=True, exist_ok=True)
    if any(p.ndim == 4 and not p.is_contiguous() for p in network.parameters()):
        network = copy.deepcopy(network).to(memory_format=torch.contiguous_format)
    was_training = network.training
    network.eval()
    parameter = next(network.parameters())
    image = torch.zeros(2, network.in_channels, *image_size, device=parameter.device, dtype=parameter.dtype)
    batch = torch.export.Dim("batch", min=1, max=65536)
    encoder, denoiser = _ConditionEncoder(network), _MaskDenoiser(network)
    with torch.no_grad():
        condition = encoder(image)
        features, calib_map = condition[0], condition[1]
        x_t = torch.zeros_like(calib_map)
        t = torch.zeros(x_t.shape[0], dtype=torch.long, device=x_t.device)
        encoder_program = torch.export.export(encoder, (image,), dynamic_shapes={"image": {0: batch}})
        denoiser_program = torch.export.export(
            denoiser,
            (x_t, t, features, calib_map),
            dynamic_shapes={
                "x_t": {0: batch},
                "t": {0: batch},
                "features": tuple({0: batch} for _ in features),
                "calib_map": {0: batch},
            },
        )
    network.train(was_training)
    # both programs are written first and then renamed one right after the other, so that an interrupted export
    # leaves the earlier pair, not a new program beside an old one
    for path in paths:  # what a killed export left
        for leftover in path.parent.glob(f".{glob.escape(path.stem)}.partial-*{path.suffix}"):
            leftover.unlink(missing_ok=True)
    partials = [path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}") for path in paths]  # .pt2 kept
    try:
        for program, partial in zip((encoder_program, denoiser_program), partials, strict=True):
            torch.export.save(program, partial)
        for partial, path in zip(partials, paths, strict=True):
            os.replace(partial, path)
    finally:
        for partial in partials:
            partial.unlink(missing_ok=True)
    logging.getLogger("medsegdiff_monai").info(f"exported the network to {paths[0]} and {paths[1]}")
    return paths


class ExportedDiffusionNetwork(nn.Module):
    """The exported programs behind the ``encode_condition`` / ``denoise`` interface of the package's network,
    so that :class:`~medsegdiff_monai.inferers.DiffusionSampler`, :func:`~medsegdiff_monai.inferers.sample_volume`
    and :class:`~medsegdiff_monai.workflows.BratsVolumeInferer` use it unchanged.

    Args:
        condition_program: the loaded ``<prefix>_condition.pt2`` module.
        denoise_program: the loaded ``<prefix>_denoise.pt2`` module.
    """

    def __init__(self, condition_program: nn.Module, denoise_program: nn.Module) -> None:
        super().__init__()
        self.condition_program = condition_program
        self.denoise_program = denoise_program

    def train(self, mode: bool = True) -> ExportedDiffusionNetwork:
        """Exported programs always run as exported (in eval mode), and an exported program refuses ``train()``:
        only the flag is set, so that ``.eval()`` (as :class:`~medsegdiff_monai.workflows.BratsVolumeInferer`
        calls it) works."""
        self.training = mode
        return self

    def encode_condition(self, image: Tensor) -> ConditionFeatures:
        """See ``DiffusionUNetWithGradeHead.encode_condition``.

        Raises:
            ValueError: for slices of another height and width than the programs were exported for (e.g. a brain
                wider than ``roi_size``, padded further), naming both.
        """
        try:
            outputs = self.condition_program(image)
        except AssertionError as error:  # torch.export's guard on the static slice size
            if "Guard failed" not in str(error):
                raise
            raise ValueError(
                f"the exported network takes slices of the size it was exported for ({error}); got slices of "
                f"{list(image.shape[2:])}. A brain wider than roi_size is padded beyond it: run such subjects with "
                "the checkpoint instead, or export for a larger image_size."
            ) from error
        grade_logits = outputs[2] if len(outputs) > 2 else None
        return ConditionFeatures(features=tuple(outputs[0]), calib_map=outputs[1], grade_logits=grade_logits)

    def denoise(self, x_t: Tensor, t: Tensor | int, condition: ConditionFeatures) -> Tensor:
        """See ``DiffusionUNetWithGradeHead.denoise``; ``t`` (B,) or a scalar (0-d tensor or int) for the batch."""
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        return self.denoise_program(x_t, t, tuple(condition.features), condition.calib_map)

    def forward(self, x_t: Tensor, t: Tensor, image: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """``(seg_logits, grade_logits, calib_map)``, as ``DiffusionUNetWithGradeHead.forward``."""
        condition = self.encode_condition(image)
        return self.denoise(x_t, t, condition), condition.grade_logits, condition.calib_map


def load_exported_network(directory: str | Path, prefix: str = "model") -> ExportedDiffusionNetwork:
    """Load the programs written by :func:`export_network` (needs only ``torch``).

    Raises:
        FileNotFoundError: naming the missing program file.
    """
    programs = []
    for path in exported_program_paths(directory, prefix):
        if not path.is_file():
            raise FileNotFoundError(f"exported network file {path} does not exist; run export_network first.")
        programs.append(torch.export.load(path).module())
    return ExportedDiffusionNetwork(*programs).eval()


def export_from_checkpoint(
    checkpoint: str | Path,
    directory: str | Path,
    image_size: Sequence[int],
    preset: str = "small",
    prefix: str = "model",
    overwrite: bool = False,
    **network_kwargs: Any,
) -> tuple[Path, Path]:
    """Build the network of ``preset`` (and ``network_kwargs``), load ``checkpoint`` and export it.

    Args:
        checkpoint: trained weights (see :func:`~medsegdiff_monai.networks.load_network_weights`).
        directory: output folder of the programs.
        image_size: (H, W) of the exported slices.
        preset: network preset the checkpoint was trained with.
        prefix: file name prefix.
        overwrite: replace existing programs (see :func:`export_network`).
        network_kwargs: other arguments of ``get_network`` (``use_grade_head``, ``mask_channels``, ...).
    """
    network = load_network_weights(get_network(preset, **network_kwargs), checkpoint)
    return export_network(network, directory, image_size, prefix, overwrite=overwrite)
