"""A bundle training run killed with SIGKILL at two points and resumed ends exactly as an uninterrupted run (CPU)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medsegdiff_monai.data import build_datalist, read_brats_folder, write_datalist, write_synthetic_brats

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundle" / "configs"
TINY = {
    "network_def#channels": "[8,8,16]", "network_def#condition_channels": "[8,8,16]",
    "network_def#attention_levels": "[False,False,False]", "network_def#num_head_channels": "8",
    "network_def#norm_num_groups": "4", "network_def#grade_hidden_channels": "8",
    "roi_size": "[16,16]", "slices_per_volume": "2", "val_sampling_steps": "1",
    "stages#0#epochs": "1", "stages#1#epochs": "1", "stages#2#epochs": "1",
    "train#grade_calibration#min_auc": "-1",  # a head this short-trained may rank the 2 subjects backwards
    "train#grade_calibration#min_subjects": "2",  # the 2 validation subjects (1 LGG, 1 HGG) get a fitted grade
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = write_synthetic_brats(
        tmp_path_factory.mktemp("resume_brats"), num_subjects=6, lgg_fraction=0.5, shape=(32, 32, 16), progress=False
    )
    subjects = read_brats_folder(out, progress=False)
    write_datalist(build_datalist(subjects, out, val_fraction=0.34), out / "datalist.json")
    return out


def command(data: Path, bundle_root: Path) -> list[str]:
    overrides = [item for key, value in TINY.items() for item in (f"--{key}", value)]
    return [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--meta_file", str(CONFIGS / "metadata.json"), "--config_file", str(CONFIGS / "train.json"),
        "--logging_file", str(CONFIGS / "logging.conf"), "--bundle_root", str(bundle_root),
        "--dataset_dir", str(data), *overrides,
    ]  # fmt: skip


ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def start(data: Path, root: Path) -> subprocess.Popen:
    return subprocess.Popen(command(data, root), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_when(process: subprocess.Popen, path: Path, delay: float) -> None:
    deadline = time.time() + 400
    while not path.exists():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()


def figures(root: Path) -> list[dict]:
    with open(root / "runs" / "train" / "metrics.csv", newline="") as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def network(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)
    return state.get("network", state)


def test_killed_twice_and_resumed_matches_the_uninterrupted_run(tiny_release, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run = subprocess.run(command(tiny_release, straight), cwd=REPO, env=ENV, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "grade calibration fitted on 1 LGG + 1 HGG" in run.stdout + run.stderr
    checkpoints = killed / "runs" / "train" / "checkpoints"
    # first kill: in the middle of epoch 2; second: the moment epoch 2's checkpoint appears (before its line)
    kill_when(start(tiny_release, killed), checkpoints / "checkpoint_epoch=1.pt", delay=0.3)
    kill_when(start(tiny_release, killed), checkpoints / "checkpoint_epoch=2.pt", delay=0.0)
    resumed = subprocess.run(command(tiny_release, killed), cwd=REPO, env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume: loading" in resumed.stdout + resumed.stderr
    assert figures(killed) == figures(straight)
    assert [int(row["epoch"]) for row in figures(killed)] == [1, 2, 3]
    for name in ("model.pt", "checkpoints/checkpoint_epoch=3.pt"):
        expected, got = network(straight / "runs" / "train" / name), network(killed / "runs" / "train" / name)
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected), name
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint_epoch=2.pt", "checkpoint_epoch=3.pt"]
    # the finished run once more: nothing to train, and the fitted calibration is not composed a second time
    again = subprocess.run(command(tiny_release, killed), cwd=REPO, env=ENV, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already holds this run's fitted calibration" in again.stdout + again.stderr
    expected, got = network(straight / "runs" / "train" / "model.pt"), network(killed / "runs" / "train" / "model.pt")
    assert all(torch.equal(expected[k], got[k]) for k in expected)
