"""The per-epoch validation Dice and the evaluation Dice follow one convention (BraTS: empty regions count)."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine

from medsegdiff_monai.engines.evaluator import validation_metrics
from medsegdiff_monai.metrics import segmentation_metrics


def _subjects() -> list[tuple[torch.Tensor, torch.Tensor]]:
    label = torch.zeros(3, 6, 6, 4)
    label[:2, 1:5, 1:5, 1:3] = 1  # TC, WT present; ET empty
    exact = label.clone()
    stray = label.clone()
    stray[2, 0, 0, 0] = 1  # ET predicted where the reference has none
    both_empty = torch.zeros_like(label)
    return [(exact, label), (stray, label), (both_empty, both_empty)]


def test_validation_dice_equals_evaluation_dice_on_empty_regions():
    metrics = validation_metrics(mask_channels=3, use_grade_head=False)
    subjects = _subjects()
    engine = Engine(lambda _engine, batch: {"pred": batch[0][None], "label": batch[1][None]})
    for name, metric in metrics.items():
        metric.attach(engine, name)
    state = engine.run(subjects, max_epochs=1)
    reference = [segmentation_metrics(pred, label) for pred, label in subjects]
    # hand-checked: ET scores 1, 0, 1 (both empty counts as perfect, a stray prediction as 0)
    assert [r["dice_ET"] for r in reference] == [1.0, 0.0, 1.0]
    for region in ("TC", "WT", "ET"):
        expected = sum(r[f"dice_{region}"] for r in reference) / len(reference)
        assert state.metrics[f"Dice_{region}"] == pytest.approx(expected)
        assert state.metrics[f"IoU_{region}"] == pytest.approx(sum(r[f"iou_{region}"] for r in reference) / 3)
    assert state.metrics["Dice"] == pytest.approx(sum(r["dice_mean"] for r in reference) / len(reference))
