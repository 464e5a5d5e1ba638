"""Distributed (DDP) training through the bundle: 2 CPU processes under torchrun with the gloo backend.

A test-only config file adds recorders on top of ``train.json`` + ``multi_gpu_train.json``: each rank appends every
training step (epoch, ``L_seg``/``L_total``, skipped flag, subject ids) and every validation subject to its own file,
and saves its final network and loss-module weights.
"""

import csv
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from monai.data import DataLoader, Dataset

from medsegdiff_monai.data import load_brats_datalist
from medsegdiff_monai.engines import DiffusionEvaluator
from medsegdiff_monai.inferers import DiffusionSampler
from medsegdiff_monai.networks import get_network

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
WORLD_SIZE = 2

RECORDERS = {
    "+initialize": [
        "$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_COMPLETED, lambda engine, "
        "path=os.path.join(@output_dir, 'train_rank' + os.environ['RANK'] + '.tsv'): open(path, 'a').write("
        "'\\t'.join([str(engine.state.epoch), str(float(engine.state.output['L_seg'])), "
        "str(float(engine.state.output['L_total'])), str(not bool(engine.state.output['finite'])), "
        "','.join(engine.state.batch['subject_id'])]) + '\\n'))",
        "$@validate#evaluator.add_event_handler(ignite.engine.Events.ITERATION_COMPLETED, lambda engine, "
        "path=os.path.join(@output_dir, 'val_rank' + os.environ['RANK'] + '.tsv'): open(path, 'a').write("
        "str(engine.state.epoch) + '\\t' + ','.join(engine.state.batch['subject_id']) + '\\n'))",
    ],
    "+finalize": [
        "$torch.save({'network': @network.module.state_dict(), 'loss': @task_weighting.module.state_dict()}, "
        "os.path.join(@output_dir, 'final_rank' + os.environ['RANK'] + '.pt'))"
    ],
}


def read_rows(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()]


def load_network(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["network"]


def split_head(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    head = {k: v for k, v in state.items() if k.startswith("grade_head.")}
    return head, {k: v for k, v in state.items() if k not in head}


def all_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, synthetic_brats_dir, synthetic_datalist):
    """One 3-epoch run (one epoch per stage) on 2 ranks, started from saved initial weights."""
    root = tmp_path_factory.mktemp("ddp_bundle")
    recorders = root / "recorders.json"
    recorders.write_text(json.dumps(RECORDERS))
    initial = root / "initial.pt"
    torch.manual_seed(0)
    torch.save({"network": get_network("small").state_dict()}, initial)
    config_files = [str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json"), str(recorders)]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD_SIZE}",
        "-m", "monai.bundle", "run", "training",
        "--meta_file", str(CONFIGS / "metadata.json"),
        "--config_file", json.dumps(config_files),
        "--logging_file", str(CONFIGS / "logging.conf"),
        "--bundle_root", str(root),
        "--dataset_dir", str(synthetic_brats_dir),
        "--datalist", str(synthetic_datalist),
        "--initial_checkpoint", str(initial),
        "--roi_size", "[32,32]",
        "--slices_per_volume", "2",
        "--val_sampling_steps", "1",
        "--stages#0#epochs", "1",
        "--stages#1#epochs", "1",
        "--stages#2#epochs", "1",
        "--train#checkpoint_saver#n_saved", "3",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return root, result.stdout, initial


def test_ranks_train_and_validate_on_disjoint_subjects(ddp_run, synthetic_brats_dir, synthetic_datalist):
    root, _, _ = ddp_run
    output = root / "runs" / "train"
    train_ids = {e["subject_id"] for e in load_brats_datalist(synthetic_datalist, "training", synthetic_brats_dir)}
    val_ids = {e["subject_id"] for e in load_brats_datalist(synthetic_datalist, "validation", synthetic_brats_dir)}
    seen: dict[str, list[set]] = {"train": [], "val": []}
    for rank in range(WORLD_SIZE):
        train_by_epoch, val_by_epoch = defaultdict(set), defaultdict(set)
        for epoch, _, _, _, ids in read_rows(output / f"train_rank{rank}.tsv"):
            train_by_epoch[int(epoch)].update(ids.split(","))
        for epoch, ids in read_rows(output / f"val_rank{rank}.tsv"):
            val_by_epoch[int(epoch)].update(ids.split(","))
        assert sorted(train_by_epoch) == sorted(val_by_epoch) == [1, 2, 3]
        seen["train"].append(train_by_epoch)
        seen["val"].append(val_by_epoch)
    for epoch in (1, 2, 3):
        for split, expected in (("train", train_ids), ("val", val_ids)):
            rank0, rank1 = seen[split][0][epoch], seen[split][1][epoch]
            assert not rank0 & rank1, (split, epoch, rank0, rank1)
            assert rank0 | rank1 == expected, (split, epoch)


def test_ranks_end_with_identical_weights_and_frozen_parts_untouched(ddp_run):
    root, _, initial = ddp_run
    finals = [torch.load(root / "runs" / "train" / f"final_rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    # parameters agree, and so do the buffers: each rank's last training forward moves the grade head's running
    # statistics on its own, and each validation starts from rank 0's (the network rank 0 saves)
    networks = [final["network"] for final in finals]
    assert any(".feature_norm.running_mean" in k for k in networks[0]) and all_equal(networks[0], networks[1])
    assert all_equal(finals[0]["loss"], finals[1]["loss"])
    assert all(value.item() != 0.0 for value in finals[0]["loss"].values()), "the log-sigmas did not train"

    checkpoints = root / "runs" / "train" / "checkpoints"
    epochs = [load_network(checkpoints / f"checkpoint_epoch={e}.pt") for e in (1, 2, 3)]
    assert all_equal(epochs[2], finals[0]["network"])  # saved unwrapped: no "module." prefix
    heads, backbones = zip(*(split_head(state) for state in [load_network(initial), *epochs]))
    assert all_equal(heads[0], heads[1]) and not all_equal(backbones[0], backbones[1])  # stage 1: backbone only
    assert all_equal(backbones[1], backbones[2]) and not all_equal(heads[1], heads[2])  # stage 2: grade head only
    assert not all_equal(backbones[2], backbones[3]) and not all_equal(heads[2], heads[3])  # stage 3: everything


def test_one_report_writer_with_losses_averaged_over_ranks(ddp_run):
    root, stdout, _ = ddp_run
    output = root / "runs" / "train"
    epoch_lines = [line for line in stdout.splitlines() if " - INFO - epoch " in line]
    assert len(epoch_lines) == 3, epoch_lines
    assert stdout.count("n_LGG=") == 1
    with open(output / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(int(r["epoch"]), r["stage"]) for r in rows] == [(1, "segmentation"), (2, "classification"), (3, "joint")]
    # each rank validates one subject of a different grade: a defined AUC needs the results of both ranks
    assert all(0.0 <= float(r["AUC"]) <= 1.0 for r in rows)
    losses = defaultdict(lambda: defaultdict(list))  # epoch -> rank -> L_total of the applied steps
    for rank in range(WORLD_SIZE):
        for epoch, _, l_total, skipped, _ in read_rows(output / f"train_rank{rank}.tsv"):
            if skipped == "False":
                losses[int(epoch)][rank].append(float(l_total))
    for epoch, by_rank in losses.items():
        applied = [value for values in by_rank.values() for value in values]
        assert float(rows[epoch - 1]["L_total"]) == pytest.approx(sum(applied) / len(applied), rel=1e-5)
    rank_means = [[sum(v) / len(v) for v in by_rank.values()] for by_rank in losses.values()]
    assert any(means[0] != pytest.approx(means[1], rel=1e-3) for means in rank_means), "ranks saw the same batches"


def test_rank_without_validation_subjects_is_an_error(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        empty = DataLoader(Dataset([]), batch_size=1)
        with pytest.raises(ValueError, match="rank 0 of 1 is empty"):
            DiffusionEvaluator("cpu", empty, get_network("small"), DiffusionSampler(num_inference_steps=1))
    finally:
        torch.distributed.destroy_process_group()


def test_more_processes_than_validation_subjects_are_refused_before_any_work(synthetic_brats_dir, synthetic_datalist):
    """The pre-check names the list, the counts and what to do, before the samplers (whose own error says neither)."""
    from medsegdiff_monai.data import BratsDataError, check_training_inputs

    count = len(load_brats_datalist(synthetic_datalist, "validation", synthetic_brats_dir))
    arguments = (synthetic_datalist, synthetic_brats_dir, (32, 32), 8)
    check_training_inputs(*arguments, progress=False, num_processes=count)
    with pytest.raises(BratsDataError, match=rf"'validation' has {count} subject\(s\) for {count + 1} processes.*"
                       rf"--nproc_per_node {count}\)"):  # fmt: skip
        check_training_inputs(*arguments, progress=False, num_processes=count + 1)
    config = json.loads((CONFIGS / "multi_gpu_train.json").read_text())
    assert any("num_processes=dist.get_world_size()" in step for step in config["initialize"])


def test_an_ungraded_training_list_is_named_on_the_main_rank(tmp_path, caplog):
    """As ``train.json`` alone, the distributed run says once that a training list without grades trains
    segmentation only."""
    from monai.bundle import ConfigParser

    from medsegdiff_monai.cli import main

    data_dir = tmp_path / "brats2021"
    synth = ["--out", str(data_dir), "--subjects", "4", "--shape", "32", "32", "16", "--layout", "brats2021"]
    assert main(["synth", *synth, "--no-progress"]) == 0
    datalist = data_dir / "datalist.json"
    assert main(["datalist", "--data-dir", str(data_dir), "--val-fraction", "0.5", "--no-progress"]) == 0
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "multi_gpu_train.json")])
    parser.update({"bundle_root": str(tmp_path), "dataset_dir": str(data_dir), "datalist": str(datalist)})
    steps = [index for index, step in enumerate(parser["initialize"]) if "has no grades" in step]
    assert len(steps) == 1
    for is_main_process, expected in ((False, ""), (True, f"the training list of {datalist} has no grades")):
        parser["is_main_process"] = is_main_process
        caplog.clear()
        with caplog.at_level("WARNING", logger="medsegdiff_monai"):
            parser.get_parsed_content(f"initialize#{steps[0]}", lazy=False)
        assert expected in caplog.text and (expected or not caplog.text)
