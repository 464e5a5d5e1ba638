"""Catalogue of bad inputs (listed in docs/bad_input.md): each one stops with its exit code and a message naming the
culprit, and leaves every file as it was.

Each case prepares a private copy of a tiny BraTS folder (with its datalist), then runs what a user would run, in
process: the ``medsegdiff-monai`` command line, or the checks the training and inference bundles run before any work
(through ``exit_on_bad_input``, as the configs do). Every file under the case's folder is hashed before and after.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medsegdiff_monai import cli
from medsegdiff_monai.data import build_datalist, read_brats_folder, write_datalist, write_synthetic_brats
from medsegdiff_monai.data.preflight import check_training_inputs, exit_on_bad_input
from medsegdiff_monai.handlers import RUN_FILENAME, prepare_run_folder, run_fingerprint
from medsegdiff_monai.workflows import check_inference_run

REPO = Path(__file__).resolve().parents[1]
S1, S2, S3 = "BraTS20_Training_001", "BraTS20_Training_002", "BraTS20_Training_003"
SETTINGS = {"preset": "small", "roi_size": [64, 64], "stages": [{"name": "segmentation", "epochs": 2}]}


@pytest.fixture(scope="module")
def tiny_brats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 subjects (2 LGG, 2 HGG) of shape (32, 32, 16) and their datalist (1 + 1 training, 1 + 1 validation)."""
    out = write_synthetic_brats(
        tmp_path_factory.mktemp("tiny_brats"), num_subjects=4, lgg_fraction=0.5, shape=(32, 32, 16), progress=False
    )
    write_datalist(build_datalist(read_brats_folder(out, progress=False), out, val_fraction=0.5), out / "datalist.json")
    return out


@dataclass
class Work:
    """A case's folder: ``data`` (copy of the tiny release with ``datalist.json``), ``run`` (a training run folder),
    ``out`` (an inference output folder) and ``model`` (a readable checkpoint)."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def datalist(self) -> Path:
        return self.data / "datalist.json"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def model(self) -> Path:
        return self.root / "model.pt"

    def nifti(self, subject: str, suffix: str) -> Path:
        return self.data / subject / f"{subject}_{suffix}.nii"

    def edit(self, subject: str, suffix: str, change: Callable[[np.ndarray], np.ndarray], affine=None) -> Path:
        path = self.nifti(subject, suffix)
        image = nib.load(path, mmap=False)
        array = change(np.asarray(image.dataobj).copy())
        nib.save(nib.Nifti1Image(array, image.affine if affine is None else affine), path)
        return path

    def entries(self, key: str = "training") -> list[dict]:
        return json.loads(self.datalist.read_text())[key]

    def rewrite_datalist(self, change: Callable[[dict], None]) -> None:
        content = json.loads(self.datalist.read_text())
        change(content)
        self.datalist.write_text(json.dumps(content, indent=2))

    def rewrite_csv(self, change: Callable[[list[list[str]]], list[list[str]]]) -> None:
        path = self.data / "name_mapping.csv"
        with open(path, newline="") as handle:
            rows = list(csv.reader(handle))
        with open(path, "w", newline="") as handle:
            csv.writer(handle).writerows(change(rows))

    def files(self, subject: str) -> list[str]:
        return [str(self.nifti(subject, m)) for m in ("t1", "t1ce", "t2", "flair")]

    def record_run(self, **settings) -> None:
        """A run folder of the unchanged datalist with one checkpoint and ``metrics.csv``."""
        (self.run / "checkpoints").mkdir(parents=True)
        torch.save({"network": {"w": torch.zeros(2)}}, self.run / "checkpoints" / "checkpoint_epoch=1.pt")
        (self.run / "metrics.csv").write_text("epoch,Dice\n1,0.5\n")
        fingerprint = run_fingerprint(self.datalist, self.data, {**SETTINGS, **settings})
        (self.run / RUN_FILENAME).write_text(json.dumps(fingerprint))


# --- what a user runs ------------------------------------------------------------------------------------------------


def check(w: Work, *extra: str) -> Callable[[], int]:
    return lambda: cli.main(["check", "--data-dir", str(w.data), "--no-progress", *extra])


def datalist(w: Work) -> Callable[[], int]:
    return lambda: cli.main(["datalist", "--data-dir", str(w.data), "--out", str(w.root / "new.json"), "--no-progress"])


def train(w: Work, roi=(64, 64), datalist_path: Path | None = None, **kwargs) -> Callable[[], object]:
    path = datalist_path or w.datalist
    return lambda: exit_on_bad_input(check_training_inputs, path, w.data, roi, 8, progress=False, **kwargs)


def resume(w: Work, resume_run: bool = True, initial_checkpoint=None, **settings) -> Callable[[], object]:
    def action():
        fingerprint = run_fingerprint(w.datalist, w.data, {**SETTINGS, **settings})
        return exit_on_bad_input(
            prepare_run_folder, w.run, w.run / "checkpoints", fingerprint, resume_run, initial_checkpoint
        )

    return action


def infer(w: Work, source=None, checkpoint=None, roi=(64, 64), **kwargs) -> Callable[[], object]:
    source = w.datalist if source is None else source
    checkpoint = w.model if checkpoint is None else checkpoint
    kwargs.setdefault("data_dir", w.data)
    return lambda: exit_on_bad_input(check_inference_run, source, w.out, checkpoint, roi, 8, **kwargs)


# --- the cases: each prepares its folder and returns (action, expected exit code, culprit named) -------------------


def missing_modality(w):
    w.nifti(S1, "t2").unlink()
    return check(w), 1, f"{S1}: missing modality 't2'"


def two_files_for_one_modality(w):
    shutil.copy(w.nifti(S1, "t2"), w.data / S1 / f"{S1}_copy_t2.nii")
    return check(w), 1, "several files for modality 't2'"


def two_label_files(w):
    shutil.copy(w.nifti(S1, "seg"), w.data / S1 / f"{S1}_seg_old.nii")
    return check(w), 1, f"{S1}: several label candidates"


def missing_label(w):
    w.nifti(S1, "seg").unlink()
    return check(w), 1, f"{S1}: missing label file"


def truncated_nifti(w):
    path = w.nifti(S1, "t1")
    path.write_bytes(path.read_bytes()[:5000])
    return check(w, "--headers-only"), 1, f"{path} is truncated: 5000 bytes, where its header describes"


def not_a_nifti(w):
    w.nifti(S1, "t1ce").write_bytes(b"not a nifti file")
    return check(w), 1, f"{S1}_t1ce.nii is not a readable NIfTI"


def nan_voxels(w):
    w.edit(S1, "flair", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 7, np.nan, a.astype(np.float32)))
    return check(w), 1, f"{S1}_flair.nii has 1 non-finite voxel"


def inf_voxels(w):
    w.edit(S1, "t2", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 7, np.inf, a.astype(np.float32)))
    return check(w), 1, f"{S1}_t2.nii has 1 non-finite voxel"


def shape_mismatch(w):
    w.edit(S1, "t2", lambda a: a[:, :, :-2])
    named = f"{S1}_t2.nii has shape (32, 32, 14), but {S1}_t1.nii has shape (32, 32, 16)."
    return check(w), 1, f"{named} A subject's modalities and label must lie on one voxel grid"


def affine_mismatch(w):
    w.edit(S1, "t1ce", lambda a: a, affine=np.diag([2.0, 1.0, 1.0, 1.0]))
    return check(w), 1, f"{S1}_t1ce.nii has an affine different"


def four_d_image(w):
    w.edit(S1, "t1", lambda a: np.stack([a, a], axis=-1))
    return check(w), 1, f"{S1}_t1.nii has shape (32, 32, 16, 2): expected a 3D volume (one volume per file: split"


def label_value_3(w):
    w.edit(S1, "seg", lambda a: np.where(a == 4, 3, a).astype(np.uint8))
    return check(w), 1, f"{S1}_seg.nii has values [3]"


def label_value_5(w):
    w.edit(S1, "seg", lambda a: np.where(a == 4, 5, a).astype(np.uint8))
    return check(w), 1, f"{S1}_seg.nii has values [5]"


def label_value_1_4(w):
    w.edit(S1, "seg", lambda a: np.where(a == 1, 1.4, a).astype(np.float32))
    return check(w), 1, f"{S1}_seg.nii has values [1.39"  # 1.4 as float32


def csv_missing(w):
    # without a grade table a folder is segmentation-only; a grade table that is asked for must exist
    (w.data / "name_mapping.csv").unlink()
    return check(w, "--grades", str(w.data / "name_mapping.csv")), 1, "name_mapping.csv not found"


def csv_without_grade_column(w):
    w.rewrite_csv(lambda rows: [r[1:] for r in rows])
    return check(w), 1, "Grade"


def csv_unknown_grade(w):
    w.rewrite_csv(lambda rows: [r if r[-1] != S2 else ["GBM", *r[1:]] for r in rows])
    return check(w), 1, f"{S2}"


def csv_row_without_folder(w):
    w.rewrite_csv(lambda rows: [*rows, ["HGG", "", "", "", "", "BraTS20_Training_099"]])
    return check(w), 1, "BraTS20_Training_099: listed in"


def folder_without_csv_row(w):
    w.rewrite_csv(lambda rows: [r for r in rows if r[-1] != S3])
    return check(w), 1, f"{S3}: folder"


def csv_repeated_subject(w):
    w.rewrite_csv(lambda rows: [*rows, next(r for r in rows if r[-1] == S2)])
    return check(w), 1, S2


def empty_data_folder(w):
    for folder in w.data.iterdir():
        shutil.rmtree(folder) if folder.is_dir() else folder.unlink()
    return check(w), 1, f"{w.data} holds no subject folder"


def missing_data_folder(w):
    shutil.rmtree(w.data)
    return check(w), 1, f"{w.data} does not exist"


def single_grade_split(w):
    w.rewrite_csv(lambda rows: [rows[0]] + [["HGG", *r[1:]] for r in rows[1:]])
    return datalist(w), 1, "LGG"


def all_zero_modality(w):
    w.edit(S1, "t1ce", np.zeros_like)
    return check(w), 1, f"{S1}_t1ce.nii is all zero"


def constant_modality(w):
    w.edit(S2, "t2", lambda a: np.full_like(a, 7))
    return check(w), 1, f"{S2}_t2.nii is constant (7)"


def empty_modality_allowed(w):
    w.edit(S1, "t1ce", np.zeros_like)
    return check(w, "--allow-empty-modality"), 0, f"{S1}_t1ce.nii is all zero"


def empty_modality_blocks_datalist(w):
    w.edit(S1, "flair", np.zeros_like)
    return datalist(w), 1, f"{S1}_flair.nii is all zero"


def notes_folder_is_skipped(w):
    (w.data / "notes").mkdir()
    (w.data / "notes" / "README.txt").write_text("scanner notes")
    return check(w), 0, f"{w.data / 'notes'} holds no NIfTI file: skipped"


def train_missing_datalist(w):
    return train(w, datalist_path=w.data / "absent.json"), 1, "medsegdiff-monai datalist --data-dir"


def train_malformed_datalist(w):
    w.datalist.write_text(w.datalist.read_text()[:-20])
    return train(w), 1, f"datalist {w.datalist} is not valid JSON"


def train_datalist_without_validation(w):
    w.rewrite_datalist(lambda c: c.pop("validation"))
    return train(w), 1, "list 'validation' is missing or empty"


def train_entry_with_three_images(w):
    w.rewrite_datalist(lambda c: c["training"][0]["image"].pop())
    return train(w), 1, "'image' must list the 4 modality files"


def train_entry_without_grade(w):
    w.rewrite_datalist(lambda c: c["training"][0].pop("grade"))
    return train(w), 1, "no 'grade'; the grade head needs one for every training and validation subject"


def train_modalities_in_wrong_order(w):
    w.rewrite_datalist(lambda c: c["training"][0]["image"].reverse())
    subject = w.entries()[0]["subject_id"]
    return train(w), 1, f"subject {subject}: image file 1"


def train_file_deleted_after_datalist(w):
    subject = w.entries()[0]["subject_id"]
    w.nifti(subject, "t2").unlink()
    return train(w), 1, f"{subject}_t2.nii does not exist"


def train_file_truncated_after_datalist(w):
    subject = w.entries()[0]["subject_id"]
    path = w.nifti(subject, "flair")
    path.write_bytes(path.read_bytes()[:4000])
    return train(w), 1, f"{subject}_flair.nii"


def train_file_cut_at_its_end_after_datalist(w):
    """Cut where no check reads voxels (the end of the last axial slices): the file's size gives it away."""
    subject = w.entries()[0]["subject_id"]
    path = w.nifti(subject, "t2")
    path.write_bytes(path.read_bytes()[:-2000])
    return train(w), 1, f"{subject}_t2.nii is truncated"


def train_subject_in_both_lists(w):
    w.rewrite_datalist(lambda c: c["validation"].append(c["training"][0]))
    subject = w.entries()[0]["subject_id"]
    return train(w), 1, f"1 subject(s) in both 'training' and 'validation' ({subject})"


def train_shape_mismatch_after_datalist(w):
    subject = w.entries("validation")[0]["subject_id"]
    w.edit(subject, "t1ce", lambda a: a[:-4])
    return train(w), 1, f"subject {subject}: modality file"


def train_label_value_after_datalist(w):
    subject = w.entries()[0]["subject_id"]
    w.edit(subject, "seg", lambda a: np.where(a == 2, 3, a).astype(np.uint8))
    return train(w), 1, f"{subject}_seg.nii has values [3]"


def train_all_zero_modality(w):
    subject = w.entries()[0]["subject_id"]
    w.edit(subject, "t1", np.zeros_like)
    return train(w), 1, f"{subject}_t1.nii is all zero"


def train_roi_not_a_multiple(w):
    w.datalist.unlink()  # the roi is checked first: even a missing datalist is not reached
    return (
        train(w, roi=(50, 50)),
        1,
        "roi_size=[50, 50]: expected two positive in-plane sizes, each a multiple of 8 "
        '(the network halves the size 3 times); e.g. --roi_size "[48,48]".',
    )  # one shell word, ready to paste


def train_roi_of_one_side(w):
    return train(w, roi=(64,)), 1, "roi_size=[64]"


def resume_other_datalist(w):
    w.record_run()
    w.rewrite_datalist(lambda c: c["training"].pop())
    return resume(w), 1, "the datalist: the run trained on"


def resume_other_plan(w):
    w.record_run()
    return resume(w, stages=[{"name": "segmentation", "epochs": 3}]), 1, "stages:"


def resume_off_on_an_existing_run(w):
    w.record_run()
    return resume(w, resume_run=False), 1, f"{w.run} already holds a run"


def run_folder_without_fingerprint(w):
    w.record_run()
    (w.run / RUN_FILENAME).unlink()
    return resume(w), 1, f"{w.run} holds a run without a run.json"


def malformed_run_record(w):
    w.record_run()
    (w.run / RUN_FILENAME).write_text("{")
    return resume(w), 1, f"{w.run / RUN_FILENAME} is not valid JSON"


def truncated_resume_checkpoint(w):
    w.record_run()
    path = w.run / "checkpoints" / "checkpoint_epoch=1.pt"
    path.write_bytes(path.read_bytes()[:100])
    return resume(w), 1, f"newest checkpoint {path} cannot be read"


def truncated_initial_checkpoint(w):
    w.model.write_bytes(w.model.read_bytes()[:50])
    return resume(w, initial_checkpoint=w.model), 1, f"initial checkpoint {w.model} cannot be read"


def infer_missing_datalist(w):
    return infer(w, source=w.data / "absent.json"), 1, "medsegdiff-monai datalist --data-dir"


def infer_malformed_datalist(w):
    w.datalist.write_text("{'training': }")
    return infer(w), 1, f"datalist {w.datalist} is not valid JSON"


def infer_files_in_wrong_order(w):
    files = w.files(S1)
    return infer(w, source=[files[3], *files[:3]]), 1, f"image file 1 ({files[3]}) is named as 'flair'"


def infer_bare_modality_names_in_wrong_order(w):
    bare = w.root / "bare"
    bare.mkdir()
    for modality, name in zip(("flair", "t1ce", "t2", "t1"), ("FLAIR.nii", "T1CE.nii", "T2.nii", "T1.nii")):
        shutil.copy(w.nifti(S1, modality), bare / name)
    source = [bare / name for name in ("FLAIR.nii", "T1CE.nii", "T2.nii", "T1.nii")]
    return infer(w, source=source), 1, f"image file 1 ({bare / 'FLAIR.nii'}) is named as 'flair'"


def infer_all_zero_modality(w):
    w.edit(S1, "t2", np.zeros_like)
    return infer(w, source=w.files(S1)), 1, f"{S1}_t2.nii is all zero"


def infer_missing_checkpoint(w):
    return (
        infer(w, checkpoint=w.root / "absent.pt"),
        1,
        f"checkpoint {w.root / 'absent.pt'} does not exist. Its default, models/model.pt, is relative to bundle_root",
    )


def infer_truncated_checkpoint(w):
    w.model.write_bytes(w.model.read_bytes()[:50])
    return infer(w), 1, f"checkpoint {w.model} cannot be read"


def infer_into_earlier_outputs(w):
    subject = w.entries("validation")[0]["subject_id"]
    w.out.mkdir()
    (w.out / f"{subject}_seg.nii.gz").write_bytes(b"earlier output")
    return infer(w), 1, f"{subject}: {subject}_seg.nii.gz"


def infer_subject_already_graded(w):
    subject = w.entries("validation")[1]["subject_id"]
    w.out.mkdir()
    (w.out / "grades.csv").write_text(f"subject_id,p_hgg,grade\n{subject},0.900000,HGG\n")
    return infer(w), 1, f"{subject}: grades.csv row"


def infer_roi_not_a_multiple(w):
    return infer(w, roi=(60, 60)), 1, "roi_size=[60, 60]"


def infer_notes_folder_is_skipped(w):
    (w.data / "notes").mkdir()
    return infer(w, source=w.data, data_dir=None), 0, ""


CASES = [
    missing_modality, two_files_for_one_modality, two_label_files, missing_label, truncated_nifti, not_a_nifti,
    nan_voxels, inf_voxels, shape_mismatch, affine_mismatch, four_d_image, label_value_3, label_value_5,
    label_value_1_4, csv_missing, csv_without_grade_column, csv_unknown_grade, csv_row_without_folder,
    folder_without_csv_row, csv_repeated_subject, empty_data_folder, missing_data_folder, single_grade_split,
    all_zero_modality, constant_modality, empty_modality_allowed, empty_modality_blocks_datalist,
    notes_folder_is_skipped, train_missing_datalist, train_malformed_datalist, train_datalist_without_validation,
    train_entry_with_three_images, train_entry_without_grade, train_modalities_in_wrong_order,
    train_file_deleted_after_datalist, train_file_truncated_after_datalist, train_file_cut_at_its_end_after_datalist,
    train_subject_in_both_lists, train_shape_mismatch_after_datalist,
    train_label_value_after_datalist, train_all_zero_modality, train_roi_not_a_multiple, train_roi_of_one_side,
    resume_other_datalist, resume_other_plan, resume_off_on_an_existing_run, run_folder_without_fingerprint,
    malformed_run_record, truncated_resume_checkpoint, truncated_initial_checkpoint, infer_missing_datalist,
    infer_malformed_datalist, infer_files_in_wrong_order, infer_bare_modality_names_in_wrong_order,
    infer_all_zero_modality, infer_missing_checkpoint,
    infer_truncated_checkpoint, infer_into_earlier_outputs, infer_subject_already_graded, infer_roi_not_a_multiple,
    infer_notes_folder_is_skipped,
]  # fmt: skip


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones included) with the SHA-256 of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def exit_code(action: Callable[[], object]) -> int:
    try:
        result = action()
    except SystemExit as stop:
        return int(stop.code)
    return result if isinstance(result, int) else 0


@pytest.mark.parametrize("case", CASES, ids=[case.__name__ for case in CASES])
def test_bad_input_is_named_and_harmless(case, tiny_brats, tmp_path, capsys):
    work = Work(tmp_path)
    shutil.copytree(tiny_brats, work.data)
    torch.save({"w": torch.zeros(2)}, work.model)
    action, expected_code, culprit = case(work)
    before = snapshot(tmp_path)
    capsys.readouterr()
    code = exit_code(action)
    captured = capsys.readouterr()
    message = captured.out + captured.err
    assert code == expected_code, message
    assert culprit in message, message
    assert "Traceback" not in message
    if expected_code != 0:
        assert "error:" in message or "problem:" in message, message
    assert snapshot(tmp_path) == before, "a file was written or changed"


def test_catalogue_is_listed_in_the_docs():
    listed = (REPO / "docs" / "bad_input.md").read_text()
    assert len(CASES) >= 40
    missing = [case.__name__ for case in CASES if f"`{case.__name__}`" not in listed]
    assert not missing, f"cases not listed in docs/bad_input.md: {missing}"


def test_training_bundle_stops_on_a_bad_file_before_the_cache_fill(tiny_brats, tmp_path):
    """A file that went bad after ``datalist`` ends the bundle run with exit code 1 and one message naming it: no
    abort, no traceback, no run folder written."""
    data = tmp_path / "data"
    shutil.copytree(tiny_brats, data)
    subject = json.loads((data / "datalist.json").read_text())["training"][0]["subject_id"]
    w = Work(tmp_path)
    w.edit(subject, "t1ce", lambda a: a[:-2])
    command = [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--meta_file", str(REPO / "bundle" / "configs" / "metadata.json"),
        "--config_file", str(REPO / "bundle" / "configs" / "train.json"),
        "--logging_file", str(REPO / "bundle" / "configs" / "logging.conf"),
        "--bundle_root", str(tmp_path / "bundle"), "--dataset_dir", str(data),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"subject {subject}: modality file" in result.stderr and f"{subject}_t1ce.nii" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "bundle").exists()
