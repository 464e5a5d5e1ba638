"""StagedTraining on training data without grades: the grade stages are skipped with one message."""

from __future__ import annotations

import logging

import torch
from ignite.engine import Engine, Events
from monai.data import Dataset
from torch import nn

from medsegdiff_monai.engines import parse_stages
from medsegdiff_monai.handlers import StagedTraining

STAGES = [
    {"name": "segmentation", "epochs": 1, "train": "backbone", "losses": ["seg"]},
    {"name": "classification", "epochs": 2, "train": "grade_head", "losses": ["grade"]},
    {"name": "joint", "epochs": 1, "train": "all", "losses": ["seg", "grade"], "uncertainty_weighting": True},
]


def _engine(entries: list[dict]) -> tuple[Engine, list]:
    """A bare Ignite engine with the attributes StagedTraining sets (no network step)."""
    engine = Engine(lambda e, batch: None)
    network = nn.ModuleDict({"backbone": nn.Linear(2, 2), "grade_head": nn.Linear(2, 1)})
    engine.unwrapped_network = network
    engine.loss_function = nn.Module()
    engine.optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    seen: list = []
    StagedTraining(parse_stages(STAGES)).attach(engine)
    engine.add_event_handler(Events.EPOCH_STARTED, lambda e: seen.append((e.stage.name, e.stage.losses)))
    return engine, seen


def test_ungraded_dataset_skips_the_grade_stage(caplog):
    dataset = Dataset([{"image": "a", "label": "a_seg"}, {"image": "b", "label": "b_seg"}])
    engine, seen = _engine(dataset.data)
    with caplog.at_level(logging.WARNING):
        engine.run(torch.utils.data.DataLoader(dataset, batch_size=1, collate_fn=list), max_epochs=4)
    assert seen == [("segmentation", ("seg",)), ("joint", ("seg",))] and engine.state.epoch == 2
    messages = [r.message for r in caplog.records if "no grades" in r.message]
    assert len(messages) == 1 and "['classification'] skipped" in messages[0] and "--grades" in messages[0]


def test_graded_dataset_keeps_the_plan(caplog):
    dataset = Dataset([{"image": "a", "grade": 0}, {"image": "b", "grade": 1}])
    engine, seen = _engine(dataset.data)
    with caplog.at_level(logging.WARNING):
        engine.run(torch.utils.data.DataLoader(dataset, batch_size=1, collate_fn=list), max_epochs=4)
    assert [name for name, _ in seen] == ["segmentation", "classification", "classification", "joint"]
    assert seen[-1][1] == ("seg", "grade") and not [r for r in caplog.records if "no grades" in r.message]
