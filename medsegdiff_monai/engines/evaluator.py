"""Per-subject validation on whole volumes: diffusion sampling slice by slice, then MONAI metrics."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Events
from ignite.metrics import MeanSquaredError
from monai.engines import SupervisedEvaluator
from monai.handlers import ROCAUC, ConfusionMatrix, IgniteMetricHandler
from monai.metrics import DiceMetric, MeanIoU

from medsegdiff_monai.inferers import DiffusionSampler, sample_volume
from medsegdiff_monai.networks.calibration import logit
from medsegdiff_monai.utils import renamed_args, unwrap_module

__all__ = ["DiffusionEvaluator", "validation_metrics", "REGION_NAMES"]

REGION_NAMES = {3: ("TC", "WT", "ET"), 1: ("WT",)}


def _region_output(output: dict, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    return output["pred"][:, index : index + 1], output["label"][:, index : index + 1]


def _segmentation_output(output: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return output["pred"], output["label"]


def _grade_scores(output: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return output["p_hgg"], output["grade"]


def _grade_decisions(output: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return (output["p_hgg"] >= 0.5).float(), output["grade"]


def _brats_overlap(metric: type[DiceMetric] | type[MeanIoU], output_transform: Any) -> IgniteMetricHandler:
    """Dice or IoU in the BraTS convention (``ignore_empty=False``), as in ``segmentation_metrics``."""
    return IgniteMetricHandler(
        metric_fn=metric(include_background=True, reduction="mean", ignore_empty=False),
        output_transform=output_transform,
    )


@renamed_args(use_cls_head="use_grade_head")
def validation_metrics(mask_channels: int = 3, use_grade_head: bool = True) -> dict[str, Any]:
    """The per-epoch validation metrics as MONAI / Ignite metric handlers, keyed by the printed name.

    ``Dice``/``IoU`` are the means over subjects and regions in the BraTS convention of
    :func:`~medsegdiff_monai.metrics.segmentation_metrics` (an empty reference region scores 1 when the prediction
    is empty too, else 0); ``Dice_<region>``/``IoU_<region>`` per region (TC, WT, ET). With
    the grade head: subject-level ``AUC``, ``F1`` (HGG positive) and ``Acc`` at p(HGG) >= 0.5, and the ``Brier``
    score ``mean (p(HGG) - grade)^2`` (Ignite's ``MeanSquaredError``), which the checkpoint selection uses.
    """
    if mask_channels not in REGION_NAMES:
        raise ValueError(f"mask_channels={mask_channels}: expected 1 (WT) or 3 (TC, WT, ET).")
    metrics: dict[str, Any] = {
        "Dice": _brats_overlap(DiceMetric, _segmentation_output),
        "IoU": _brats_overlap(MeanIoU, _segmentation_output),
    }
    for index, region in enumerate(REGION_NAMES[mask_channels]):
        select = partial(_region_output, index=index)
        metrics[f"Dice_{region}"] = _brats_overlap(DiceMetric, select)
        metrics[f"IoU_{region}"] = _brats_overlap(MeanIoU, select)
    if use_grade_head:
        metrics["AUC"] = ROCAUC(output_transform=_grade_scores)
        metrics["F1"] = ConfusionMatrix(
            include_background=True, metric_name="f1 score", output_transform=_grade_decisions
        )
        metrics["Acc"] = ConfusionMatrix(
            include_background=True, metric_name="accuracy", output_transform=_grade_decisions
        )
        metrics["Brier"] = MeanSquaredError(output_transform=_grade_scores)
    return metrics


def _buffers_of_rank_zero(engine: SupervisedEvaluator) -> None:
    """Copy rank 0's network buffers to every rank (a collective: every rank's evaluator runs it); nothing without
    a process group of several ranks."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for buffer in unwrap_module(engine.network).buffers():
        dist.broadcast(buffer.data, src=0)


class DiffusionEvaluator(SupervisedEvaluator):
    """Validation over whole subjects: each batch item is one volume, segmented slice by slice by ``sampler``.

    Batch keys: ``"image"`` (B, 4, H, W, D), ``"label"`` (B, C_mask, H, W, D) regions, ``"grade"`` (B,). The
    iteration output holds ``"pred"`` (B, C_mask, H, W, D) binary at ``threshold``, ``"label"``, and, with a grade
    head, ``"p_hgg"`` (B, 1) subject-level p(HGG) (:func:`~medsegdiff_monai.inferers.subject_p_hgg`, the same
    function as inference), ``"grade_log_odds"`` (B, 1) float64 ``logit(p_hgg)`` (what the grade calibration is
    fitted on) and ``"grade"`` (B, 1).

    Args:
        device: where to run.
        val_data_loader: loader of whole-volume samples (batch size 1 is typical).
        network: the trained network (possibly wrapped; the sampler unwraps nothing, so pass the module).
        sampler: the diffusion sampler; a cheap one (few DDIM steps, one member) suits per-epoch validation.
        slice_batch_size: slices sampled together; None: the device's default
            (:func:`~medsegdiff_monai.inferers.default_slice_batch_size`).
        threshold: probability at which a voxel counts as tumour.
        mask_channels: 3 (TC, WT, ET) or 1 (WT); names the per-region metrics.
        use_grade_head: add the subject-level grade metrics.
        kwargs: passed to :class:`~monai.engines.SupervisedEvaluator`. Without ``key_val_metric`` the metrics of
            :func:`validation_metrics` are used, mean ``Dice`` as the key metric.

    Under DistributedDataParallel give each rank its share of the subjects (``monai.data.DistributedSampler`` with
    ``even_divisible=False``): the metric handlers gather the per-subject results of all ranks before reducing, so
    every rank ends with the figures of the whole validation split. Sampling uses the unwrapped network, so ranks
    with different numbers of subjects never wait on each other inside the network. Each validation starts by copying
    rank 0's buffers (the grade head's running statistics, which each rank's last training forward moved on its own)
    to every rank, so that all ranks validate the network rank 0 saves.

    Raises:
        ValueError: when ``val_data_loader`` is empty (e.g. fewer validation subjects than processes).
    """

    @renamed_args(use_cls_head="use_grade_head")
    def __init__(
        self,
        device: str | torch.device,
        val_data_loader: Any,
        network: torch.nn.Module,
        sampler: DiffusionSampler,
        slice_batch_size: int | None = None,
        threshold: float = 0.5,
        mask_channels: int = 3,
        use_grade_head: bool = True,
        **kwargs: Any,
    ) -> None:
        if hasattr(val_data_loader, "__len__") and len(val_data_loader) == 0:
            where = (
                f"rank {dist.get_rank()} of {dist.get_world_size()}"
                if dist.is_available() and dist.is_initialized()
                else "this process"
            )
            raise ValueError(
                f"the validation data loader of {where} is empty: expected at least one validation subject per "
                "process (check the datalist's validation split and the number of processes)."
            )
        if kwargs.get("key_val_metric") is None:
            metrics = validation_metrics(mask_channels, use_grade_head)
            kwargs["key_val_metric"] = {"Dice": metrics.pop("Dice")}
            kwargs["additional_metrics"] = {**metrics, **(kwargs.get("additional_metrics") or {})}
        super().__init__(device=device, val_data_loader=val_data_loader, network=network, decollate=False, **kwargs)
        self.add_event_handler(Events.STARTED, _buffers_of_rank_zero)
        self.sampler = sampler
        self.slice_batch_size = slice_batch_size
        self.threshold = threshold

    def _iteration(self, engine: DiffusionEvaluator, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        network = unwrap_module(engine.network)
        network.eval()
        device = engine.state.device
        images = batchdata["image"]
        preds, p_hgg = [], []
        with torch.inference_mode():
            for image in images:
                image = image.as_tensor() if hasattr(image, "as_tensor") else image
                volume = sample_volume(
                    network, image.to(device), engine.sampler, slice_batch_size=engine.slice_batch_size
                )
                preds.append((volume.probs > engine.threshold).float())
                p_hgg.append(volume.p_hgg)
        label = batchdata["label"]
        output = {
            "pred": torch.stack(preds),
            "label": (label.as_tensor() if hasattr(label, "as_tensor") else label).to(device).float(),
        }
        if p_hgg[0] is not None:
            output["p_hgg"] = torch.tensor(p_hgg, dtype=torch.float32, device=device).view(-1, 1)
            output["grade_log_odds"] = torch.tensor([logit(p) for p in p_hgg], dtype=torch.float64).view(-1, 1)
            output["grade"] = torch.as_tensor(batchdata["grade"], device=device).float().view(-1, 1)
        engine.state.output = output
        return output
