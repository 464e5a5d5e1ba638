"""Run folder fingerprint, random state, best score and pruning across a resume, and the epoch line's order, on
small Ignite engines (no training)."""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.transforms import Compose, RandAffined, RandFlipd, RandSpatialCropd

from medsegdiff_monai.handlers import (
    RUN_FILENAME,
    EpochReport,
    GradeCalibrationFit,
    RandomState,
    ResumeFromCheckpoint,
    RunFolderError,
    TrainingCheckpointSaver,
    prepare_run_folder,
    run_fingerprint,
)
from medsegdiff_monai.losses import UncertaintyWeightedLoss
from medsegdiff_monai.networks import get_network
from tests.networks.tiny_network import TINY, tiny_network


def draws(transform: Compose, generator: torch.Generator) -> list[float]:
    """One draw of every random source a training epoch uses."""
    values = [torch.rand(()).item(), float(np.random.rand()), random.random()]
    values += [float(t.R.rand()) for t in transform.transforms]
    values.append(torch.rand((), generator=generator).item())
    return values


def test_random_state_restores_every_source_through_a_checkpoint_file(tmp_path):
    transform = Compose(
        [
            RandFlipd("image", prob=0.5),
            RandAffined("image", prob=0.5, rotate_range=0.1),
            RandSpatialCropd("image", roi_size=(4, 4)),
        ]
    )
    transform.set_random_state(seed=3)
    generator = torch.Generator().manual_seed(5)
    state = RandomState(transform, generator)
    assert len(state.transforms) >= 4  # the Compose, the three transforms (and the inner croppers / resamplers)
    draws(transform, generator)
    torch.save({"random_state": state.state_dict()}, tmp_path / "state.pt")
    expected = draws(transform, generator)
    assert draws(transform, generator) != expected  # the sources moved on
    state.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True)["random_state"])
    assert draws(transform, generator) == expected


def test_ranks_that_load_rank_zeros_state_keep_drawing_apart():
    """Under DDP only rank 0's state is in the checkpoint: rank 0 continues it exactly, every other rank parts from it
    by its rank (as the ``seed + rank`` start did), reproducibly, with every source drawing apart."""
    transform = Compose([RandFlipd("image", prob=0.5), RandAffined("image", prob=0.5, rotate_range=0.1)])
    generator = torch.Generator().manual_seed(5)
    saved = RandomState(transform, generator, rank=0).state_dict()
    expected = draws(transform, generator)
    resumed = {}
    for rank in (0, 1, 2):
        RandomState(transform, generator, rank=rank).load_state_dict(saved)
        resumed[rank] = draws(transform, generator)
    assert resumed[0] == expected
    for rank in (1, 2):
        assert all(a != b for a, b in zip(resumed[rank], expected, strict=True)), rank
    assert all(a != b for a, b in zip(resumed[1], resumed[2], strict=True))
    # no stream is shared between ranks or sources (a seed + index scheme gives rank 1's second transform the
    # stream of rank 2's first)
    assert len({value for rank in (1, 2) for value in resumed[rank]}) == 2 * len(expected)
    RandomState(transform, generator, rank=1).load_state_dict(saved)
    assert draws(transform, generator) == resumed[1]  # reproducible


def test_random_state_of_another_transform_chain_is_refused():
    state = RandomState(Compose([RandFlipd("image", prob=0.5)])).state_dict()
    with pytest.raises(ValueError, match="another transform chain"):
        RandomState(Compose([RandFlipd("image"), RandFlipd("label")])).load_state_dict(state)


class ScoredRun:
    """An engine whose network weight is the epoch number and whose validation score is ``scores[epoch]``."""

    def __init__(self, folder, scores, max_epochs):
        self.network = torch.nn.Linear(1, 1, bias=False)
        self.evaluator = SimpleNamespace(state=SimpleNamespace(metrics={}))
        self.engine = Engine(lambda engine, batch: None)
        self.engine.state.max_epochs = max_epochs

        @self.engine.on(Events.EPOCH_COMPLETED)
        def _score(engine):
            self.network.weight.data.fill_(engine.state.epoch)
            self.evaluator.state.metrics = {"Dice": scores[engine.state.epoch]}

        self.saver = TrainingCheckpointSaver(
            folder / "checkpoints", {"network": self.network, "trainer": self.engine}, self.evaluator,
            best_dir=folder, score_names=("Dice",),
        )  # fmt: skip
        ResumeFromCheckpoint(folder / "checkpoints", self.saver.state_objects).attach(self.engine)
        self.saver.attach(self.engine)

    def run(self, max_epochs):
        self.engine.run([0], max_epochs=max_epochs)


def test_best_score_survives_resume_and_old_checkpoints_are_pruned(tmp_path):
    scores = {1: 0.7, 2: 0.2, 3: 0.21, 4: 0.1}
    ScoredRun(tmp_path, scores, 2).run(2)
    assert torch.load(tmp_path / "model.pt", weights_only=True)["weight"].item() == 1.0
    leftovers = [tmp_path / "checkpoints" / "checkpoint_epoch=0.pt", tmp_path / "checkpoints" / "tmpk2jd8f"]
    for path in leftovers:  # a checkpoint an earlier process kept, the temporary file of a killed save
        path.write_bytes(b"x")
    ScoredRun(tmp_path, scores, 4).run(4)
    # epoch 3 scores 0.21 > 0.2 (the last epoch before the resume) but < 0.7 (the best): the best network stays
    assert torch.load(tmp_path / "model.pt", weights_only=True)["weight"].item() == 1.0
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["checkpoint_epoch=3.pt", "checkpoint_epoch=4.pt"]


def test_epoch_line_is_printed_after_its_checkpoint(tmp_path):
    network = torch.nn.Linear(1, 1)

    def step(engine, batch):
        loss = torch.tensor(1.0)
        return {"L_seg": loss, "L_grade": loss, "L_total": loss, "finite": True}

    engine = Engine(step)
    engine.loss_function = UncertaintyWeightedLoss(tasks=("seg", "grade"))
    engine.optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    EpochReport(tmp_path, tensorboard=False).attach(engine)  # a training handler, attached before the saver
    TrainingCheckpointSaver(tmp_path / "checkpoints", {"network": network, "trainer": engine}).attach(engine)
    seen = []

    class Watch(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if message.startswith("epoch "):
                epoch = int(message.split()[1])
                seen.append((epoch, (tmp_path / "checkpoints" / f"checkpoint_epoch={epoch}.pt").exists()))

    logger = logging.getLogger("medsegdiff_monai")
    watch, level = Watch(), logger.level
    logger.addHandler(watch)
    logger.setLevel(logging.INFO)
    try:
        engine.run([0, 1], max_epochs=2)
    finally:
        logger.removeHandler(watch)
        logger.setLevel(level)
    assert seen == [(1, True), (2, True)]


def test_run_folder_is_recorded_once_and_resumed_with_the_same_fingerprint(tmp_path):
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": ["a"]}], "validation": []}))
    fingerprint = run_fingerprint(datalist, tmp_path, {"stages": [1, 2], "lr": 1e-3})
    run = tmp_path / "run"
    prepare_run_folder(run, run / "checkpoints", fingerprint)
    assert json.loads((run / RUN_FILENAME).read_text()) == fingerprint
    (run / "metrics.csv").write_text("epoch\n1\n")
    prepare_run_folder(run, run / "checkpoints", fingerprint)  # the same run: resumed
    # reformatting the datalist or adding other keys keeps its digest
    datalist.write_text(json.dumps({"validation": [], "training": [{"image": ["a"]}], "class_balance": {}}, indent=4))
    prepare_run_folder(run, run / "checkpoints", run_fingerprint(datalist, tmp_path, {"stages": [1, 2], "lr": 1e-3}))
    with pytest.raises(RunFolderError, match=r"lr: 0.001 then, 0.0001 now.*another --output_dir"):
        other = run_fingerprint(datalist, tmp_path, {"stages": [1, 2], "lr": 1e-4})
        prepare_run_folder(run, run / "checkpoints", other)


def test_a_run_whose_checkpoints_were_deleted_is_not_trained_again(tmp_path):
    """One logged epoch without a checkpoint is a stop between the two, and resumes (from epoch 1); more logged
    epochs without any checkpoint mean the checkpoints were deleted: refused, rather than trained over."""
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": ["a"]}], "validation": []}))
    fingerprint = run_fingerprint(datalist, tmp_path, {"stages": [1, 2], "lr": 1e-3})
    run = tmp_path / "run"
    prepare_run_folder(run, run / "checkpoints", fingerprint)
    (run / "metrics.csv").write_text("epoch,dice\n1,0.2\n")
    prepare_run_folder(run, run / "checkpoints", fingerprint)
    (run / "metrics.csv").write_text("epoch,dice\n1,0.2\n2,0.3\n3,0.4\n")
    with pytest.raises(
        RunFolderError, match=r"holds a run of 3 logged epochs but no checkpoint in .*another --output_dir"
    ):
        prepare_run_folder(run, run / "checkpoints", fingerprint)
    (run / "checkpoints").mkdir()
    torch.save({"epoch": 3}, run / "checkpoints" / "checkpoint_epoch=3.pt")
    prepare_run_folder(run, run / "checkpoints", fingerprint)  # with its checkpoint it resumes


def test_publishing_into_the_bundle_is_part_of_a_run_and_older_records_still_resume(tmp_path):
    """A finished run repeated with update_bundle_model true would not train again, so the bundle would keep its old
    network: that is refused with how to publish the run's network. A record written before the setting was recorded
    resumes as before."""
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": ["a"]}], "validation": []}))
    run = tmp_path / "run"
    settings = {"lr": 1e-3, "update_bundle_model": False, "val_sampling_steps": 2}
    prepare_run_folder(run, run / "checkpoints", run_fingerprint(datalist, tmp_path, settings))
    (run / "metrics.csv").write_text("epoch\n1\n")
    publish = run_fingerprint(datalist, tmp_path, {**settings, "update_bundle_model": True})
    with pytest.raises(RunFolderError, match=r"update_bundle_model: false then, true now.*copy .*model\.pt into"):
        prepare_run_folder(run, run / "checkpoints", publish)
    older = run_fingerprint(datalist, tmp_path, {"lr": 1e-3})
    (run / RUN_FILENAME).write_text(json.dumps(older))
    prepare_run_folder(run, run / "checkpoints", run_fingerprint(datalist, tmp_path, settings))
    with pytest.raises(RunFolderError, match=r"lr: 0.001 then, 0.01 now"):
        prepare_run_folder(run, run / "checkpoints", run_fingerprint(datalist, tmp_path, {**settings, "lr": 1e-2}))


def test_a_start_that_failed_before_its_first_epoch_does_not_block_the_corrected_command(tmp_path):
    """A failed start (bad learning rate, out of memory) leaves run.json but no checkpoint and no metrics.csv: the
    corrected command takes the folder over and records its own fingerprint; once the folder holds a run, another
    fingerprint is refused again."""
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": ["a"]}], "validation": []}))
    run = tmp_path / "run"
    prepare_run_folder(run, run / "checkpoints", run_fingerprint(datalist, tmp_path, {"lr": -1e-3}))
    corrected = run_fingerprint(datalist, tmp_path, {"lr": 1e-3})
    prepare_run_folder(run, run / "checkpoints", corrected)
    assert json.loads((run / RUN_FILENAME).read_text()) == corrected
    (run / "metrics.csv").write_text("epoch\n1\n")
    with pytest.raises(RunFolderError, match=r"lr: 0.001 then, -0.001 now"):
        prepare_run_folder(run, run / "checkpoints", run_fingerprint(datalist, tmp_path, {"lr": -1e-3}))


@pytest.mark.skipif(sys.platform == "win32", reason="folder locks need fcntl")
def test_a_second_training_process_on_a_run_folder_is_refused(tmp_path):
    """The folder is held for the rest of the process that prepared it; another process is refused with what to do,
    the holder itself may prepare it again (an in-process resume), and a process that ended released it."""
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": ["a"]}], "validation": []}))
    run = tmp_path / "run"
    arguments = (
        f"{str(run)!r}, {str(run / 'checkpoints')!r}, run_fingerprint({str(datalist)!r}, {str(tmp_path)!r}, {{}})"
    )
    holder = textwrap.dedent(
        f"""
        import sys
        from medsegdiff_monai.handlers import prepare_run_folder, run_fingerprint
        prepare_run_folder({arguments})
        print("held", flush=True)
        sys.stdin.readline()
        """
    )
    process = subprocess.Popen([sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    fingerprint = run_fingerprint(datalist, tmp_path, {})
    try:
        assert process.stdout.readline().strip() == "held"
        with pytest.raises(FileExistsError, match=r"another training process is running in .*run the command again"):
            prepare_run_folder(run, run / "checkpoints", fingerprint)
        prepare_run_folder(run, run / "checkpoints", fingerprint, hold=False)  # a DDP rank above 0
    finally:
        process.communicate("\n", timeout=60)
    prepare_run_folder(run, run / "checkpoints", fingerprint)  # the holder ended: released
    prepare_run_folder(run, run / "checkpoints", fingerprint)  # held by this process already


def test_an_output_dir_that_is_a_file_is_named(tmp_path):
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": ["a"]}], "validation": []}))
    (tmp_path / "run").write_text("a file")
    with pytest.raises(RunFolderError, match=r"output_dir .*run is a file, not a folder: choose another --output_dir"):
        prepare_run_folder(tmp_path / "run", tmp_path / "run" / "checkpoints", run_fingerprint(datalist, tmp_path, {}))


def test_a_run_written_before_the_grade_renames_resumes(tmp_path):
    """A run folder of before the ``cls`` -> ``grade`` renames (``run.json`` with ``use_cls_head`` and the stage
    spellings ``cls_head`` / ``cls``, ``metrics.csv`` with ``L_cls`` / ``sigma_cls``, a checkpoint with the keys
    ``cls_head.*`` and ``log_sigmas.cls``) is resumed by today's handlers."""
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": ["a"], "grade": 1}], "validation": []}))
    stage = {"name": "classification", "epochs": 1, "train": "grade_head", "losses": ["seg", "grade"]}
    old_stage = {**stage, "train": "cls_head", "losses": ["seg", "cls"]}
    run, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    old_settings = {"use_cls_head": True, "stages": [old_stage], "lr": 1e-3}
    (run / RUN_FILENAME).write_text(json.dumps(run_fingerprint(datalist, tmp_path, old_settings)))
    (run / "metrics.csv").write_text(
        "epoch,stage,L_seg,L_cls,L_total,sigma_seg,sigma_cls\n1,classification,1,0.5,2,1,0.9\n"
    )
    expected = tiny_network().state_dict()
    finished = Engine(lambda engine, batch: None)
    finished.run([0], max_epochs=1)
    torch.save(
        {
            "network": {k.replace("grade_head.", "cls_head."): v for k, v in expected.items()},
            "loss": {"log_sigmas.seg": torch.tensor(0.25), "log_sigmas.cls": torch.tensor(-0.5)},
            "trainer": finished.state_dict(),
        },
        checkpoints / "checkpoint_epoch=1.pt",
    )

    new_settings = {"use_grade_head": True, "stages": [stage], "lr": 1e-3}
    prepare_run_folder(run, checkpoints, run_fingerprint(datalist, tmp_path, new_settings))  # the same run
    with pytest.raises(RunFolderError, match="use_grade_head: true then, false now"):
        other = {**new_settings, "use_grade_head": False}
        prepare_run_folder(run, checkpoints, run_fingerprint(datalist, tmp_path, other))

    torch.manual_seed(1)
    network = get_network("small", **TINY)
    weighting = UncertaintyWeightedLoss(tasks=("seg", "grade"))
    loss = torch.tensor(1.0)
    engine = Engine(lambda engine, batch: {"L_seg": loss, "L_grade": loss, "L_total": loss, "finite": True})
    engine.loss_function = weighting
    engine.optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    # the grade calibration's state is saved since a later version: a checkpoint without it resumes all the rest
    calibration = GradeCalibrationFit(Engine(lambda engine, batch: None), run / "model.pt")
    objects = {"network": network, "loss": weighting, "trainer": engine, "grade_calibration": calibration}
    ResumeFromCheckpoint(checkpoints, objects, optional_keys=["grade_calibration"]).attach(engine)
    EpochReport(run, tensorboard=False).attach(engine)
    with pytest.warns(DeprecationWarning, match=r"cls_head|log_sigmas\.cls") as caught:
        engine.run([0], max_epochs=2)
    assert any("log_sigmas.cls" in str(w.message) for w in caught)
    assert all(torch.equal(network.state_dict()[k], v) for k, v in expected.items())
    assert weighting.sigmas() == pytest.approx({"seg": math.exp(0.25), "grade": math.exp(-0.5)})
    assert calibration.best is None and calibration.best_score == -math.inf
    with open(run / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert "L_cls" not in rows[0] and "sigma_cls" not in rows[0]
    assert [(r["epoch"], r["L_grade"], r["sigma_grade"]) for r in rows[:1]] == [("1", "0.5", "0.9")]
    assert rows[1]["epoch"] == "2" and float(rows[1]["sigma_grade"]) == pytest.approx(math.exp(-0.5))
