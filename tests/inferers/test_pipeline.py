from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from medsegdiff_monai.data import BratsDataError, load_brats_datalist
from medsegdiff_monai.inferers import DiffusionSampler
from medsegdiff_monai.workflows import BratsVolumeInferer, check_inference_run

ROI = (64, 64)


def _inferer(network, **kwargs) -> BratsVolumeInferer:
    return BratsVolumeInferer(
        network, DiffusionSampler(num_inference_steps=2, ensemble_size=2), roi_size=ROI, progress=False, **kwargs
    )


def _read(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def test_outputs_lie_on_the_input_grid_and_invert_the_crop_exactly(brain_oracle, synthetic_datalist, tmp_path):
    entries = load_brats_datalist(synthetic_datalist, "validation")
    out = tmp_path / "out"
    outputs = _inferer(brain_oracle(hgg_logit=2.0), write_overlays=True).run(synthetic_datalist, out)
    assert [o.subject_id for o in outputs] == [e["subject_id"] for e in entries]
    for output in outputs:
        assert {kind: path.name for kind, path in output.files.items()} == {
            kind: f"{output.subject_id}_{kind}.{ext}"
            for kind, ext in (("seg", "nii.gz"), ("uncertainty", "nii.gz"), ("overlay", "png"))
        }
    for entry in entries:
        subject_id, t1 = entry["subject_id"], nib.load(entry["image"][0])
        seg = nib.load(str(out / f"{subject_id}_seg.nii.gz"))
        uncertainty = nib.load(str(out / f"{subject_id}_uncertainty.nii.gz"))
        for written in (seg, uncertainty):
            assert written.shape == t1.shape
            np.testing.assert_allclose(written.affine, t1.affine)
        assert seg.get_data_dtype() == np.uint8 and uncertainty.get_data_dtype() == np.float32
        labels = np.asarray(seg.dataobj)
        assert set(np.unique(labels).tolist()) <= {0, 1, 2, 4}
        # the oracle puts every region (so label 4) on every brain voxel: the inverted map is the input's brain mask
        brain = np.stack([_read(p) for p in entry["image"]]).any(axis=0)
        np.testing.assert_array_equal(labels, np.where(brain, 4, 0))
        assert float(np.abs(np.asarray(uncertainty.dataobj)).max()) == 0.0  # members agree
        png = (out / f"{subject_id}_overlay.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with open(out / "grades.csv") as f:
        rows = list(csv.reader(f))
    p_hgg = 1 / (1 + np.exp(-2.0))
    assert rows == [["subject_id", "p_hgg", "grade"]] + [[e["subject_id"], f"{p_hgg:.6f}", "HGG"] for e in entries]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left


def test_a_brain_wider_than_the_roi_is_segmented_whole_with_a_warning(
    brain_oracle, synthetic_datalist, tmp_path, caplog
):
    entry = load_brats_datalist(synthetic_datalist, "validation")[0]
    brain = np.stack([_read(p) for p in entry["image"]]).any(axis=0)
    inferer = BratsVolumeInferer(
        brain_oracle(), DiffusionSampler(num_inference_steps=2, ensemble_size=2), roi_size=(16, 16), progress=False
    )
    with caplog.at_level("WARNING", logger="medsegdiff_monai.workflows.pipeline"):
        inferer.run([entry], tmp_path / "out")
    labels = _read(tmp_path / "out" / f"{entry['subject_id']}_seg.nii.gz")
    np.testing.assert_array_equal(labels, np.where(brain, 4, 0))  # every brain voxel, none cropped away
    assert f"subject {entry['subject_id']}: the brain is wider than roi_size [16, 16]" in caplog.text


def test_min_enhancing_voxels_relabels_a_small_enhancing_prediction(brain_oracle, synthetic_datalist, tmp_path):
    # the oracle predicts ET on every brain voxel: kept at a threshold of 1 voxel, core (1) above the brain's size
    entry = load_brats_datalist(synthetic_datalist, "validation")[0]
    brain = np.stack([_read(p) for p in entry["image"]]).any(axis=0)
    for min_voxels, label in ((1, 4), (int(brain.sum()) + 1, 1)):
        out = tmp_path / f"min_{min_voxels}"
        _inferer(brain_oracle(), min_enhancing_voxels=min_voxels).run([entry], out)
        np.testing.assert_array_equal(_read(out / f"{entry['subject_id']}_seg.nii.gz"), np.where(brain, label, 0))
    with pytest.raises(ValueError, match="min_enhancing_voxels must be >= 0"):
        _inferer(brain_oracle(), min_enhancing_voxels=-1)
    # a bad slice batch is named when the inferer is built, before any subject is read
    with pytest.raises(ValueError, match="slice_batch_size must be >= 1 .*got 0"):
        _inferer(brain_oracle(), slice_batch_size=0)
    for threshold in (0.0, 1.0, 1.5):  # a probability threshold outside (0, 1) labels every voxel alike
        with pytest.raises(ValueError, match=f"threshold is a probability strictly between 0 and 1, got {threshold}"):
            _inferer(brain_oracle(), threshold=threshold)


def test_four_modality_files_of_one_subject(brain_oracle, synthetic_brats_dir, tmp_path):
    subject = synthetic_brats_dir / "BraTS20_Training_003"
    files = [subject / f"BraTS20_Training_003_{m}.nii" for m in ("t1", "t1ce", "t2", "flair")]
    (output,) = _inferer(brain_oracle(hgg_logit=-3.0)).run(files, tmp_path / "out")
    assert output.subject_id == "BraTS20_Training_003"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "BraTS20_Training_003_seg.nii.gz",
        "BraTS20_Training_003_uncertainty.nii.gz",
        "grades.csv",
    ]
    assert (tmp_path / "out" / "grades.csv").read_text().splitlines()[1].endswith(",LGG")


def test_folder_input_and_num_cases(stand_in_network, brats_copy, tmp_path):
    outputs = _inferer(stand_in_network(use_grade_head=False)).run(brats_copy, tmp_path / "out", num_cases=2)
    assert [o.subject_id for o in outputs] == ["BraTS20_Training_001", "BraTS20_Training_002"]
    assert all(o.p_hgg is None for o in outputs)
    assert not (tmp_path / "out" / "grades.csv").exists()  # nothing to grade without a head


def test_a_nifti_file_beside_the_subject_folders_leaves_a_release_a_release(stand_in_network, brats_copy, tmp_path):
    """A release folder with a stray NIfTI at its top (an atlas) is still read subject folder by subject folder; a
    folder of one subject's modality files is one subject."""
    shutil.copy(brats_copy / "BraTS20_Training_001" / "BraTS20_Training_001_t1.nii", brats_copy / "atlas.nii")
    inferer = _inferer(stand_in_network(use_grade_head=False))
    outputs = inferer.run(brats_copy, tmp_path / "out", num_cases=2)
    assert [o.subject_id for o in outputs] == ["BraTS20_Training_001", "BraTS20_Training_002"]
    # also an atlas named after a modality: the subject folders' files carry their ids, so the folder is a release
    (brats_copy / "atlas.nii").rename(brats_copy / "sri24_t1.nii")
    outputs = inferer.run(brats_copy, tmp_path / "out2", num_cases=2)
    assert [o.subject_id for o in outputs] == ["BraTS20_Training_001", "BraTS20_Training_002"]
    single = inferer.run(brats_copy / "BraTS20_Training_003", tmp_path / "single")
    assert [o.subject_id for o in single] == ["BraTS20_Training_003"]


def test_an_output_folder_inside_the_input_folder_is_refused(brain_oracle, brats_copy):
    subject = brats_copy / "BraTS20_Training_003"
    before = sorted(p.name for p in brats_copy.rglob("*"))
    for source, output_dir in ((brats_copy, brats_copy / "preds"), (subject, subject / "out"), (subject, subject)):
        with pytest.raises(ValueError, match=f"output_dir {output_dir} lies inside the input folder {source}"):
            _inferer(brain_oracle()).run(source, output_dir)
    assert sorted(p.name for p in brats_copy.rglob("*")) == before


def test_a_datalist_given_without_its_data_root_names_the_root_to_pass(brain_oracle, synthetic_datalist, tmp_path):
    """A datalist whose relative paths are missing under the given data root but present next to the datalist (the
    bundle's default dataset_dir with --input <other datalist>) is refused with the --dataset_dir to pass."""
    with pytest.raises(FileNotFoundError, match=rf"pass --dataset_dir {synthetic_datalist.parent}\.$"):
        _inferer(brain_oracle()).run(synthetic_datalist, tmp_path / "out", data_dir=tmp_path / "elsewhere")
    # another data folder that holds some of the subjects: the others are missing there
    entries = json.loads(synthetic_datalist.read_text())["validation"]
    other = tmp_path / "other_data"
    shutil.copytree(
        synthetic_datalist.parent / Path(entries[0]["image"][0]).parent, other / Path(entries[0]["image"][0]).parent
    )
    with pytest.raises(FileNotFoundError, match=rf"where {len(entries) - 1} of its {len(entries)} subjects' files are"):
        _inferer(brain_oracle()).run(synthetic_datalist, tmp_path / "out", data_dir=other)
    _assert_nothing_written(tmp_path)


def test_a_datalist_whose_files_lie_in_two_data_roots_is_refused(brain_oracle, synthetic_datalist, tmp_path):
    """Where the given data root and the datalist's own folder both hold files of its relative names (another data
    set with the same subject ids), which images are meant is not known: refused, naming both roots."""
    other = shutil.copytree(synthetic_datalist.parent, tmp_path / "other_data")
    with pytest.raises(ValueError, match=rf"pass --dataset_dir {synthetic_datalist.parent} to read those beside it"):
        _inferer(brain_oracle()).run(synthetic_datalist, tmp_path / "out", data_dir=other)
    _assert_nothing_written(tmp_path)
    # either way out runs: the datalist's own folder as the data root, or the datalist moved into the other root
    moved = other / synthetic_datalist.name
    shutil.copy(synthetic_datalist, moved)
    for datalist, root in ((synthetic_datalist, synthetic_datalist.parent), (moved, other)):
        out = tmp_path / f"out_{root.name}"
        _inferer(brain_oracle()).run(datalist, out, data_dir=root, num_cases=1)
        assert len(list(out.glob("*_seg.nii.gz"))) == 1
    # the same files reached through a link are one data root
    link = tmp_path / "link"
    link.symlink_to(synthetic_datalist.parent)
    (output, *_) = _inferer(brain_oracle()).run(synthetic_datalist, tmp_path / "out", data_dir=link, num_cases=1)
    assert (tmp_path / "out" / f"{output.subject_id}_seg.nii.gz").is_file()


def test_four_files_naming_two_subjects_are_refused(brain_oracle, synthetic_brats_dir, tmp_path):
    one, two = (synthetic_brats_dir / f"BraTS20_Training_00{i}" for i in (1, 2))
    files = [one / "BraTS20_Training_001_t1.nii", two / "BraTS20_Training_002_t1ce.nii"]
    files += [one / f"BraTS20_Training_001_{m}.nii" for m in ("t2", "flair")]
    with pytest.raises(
        ValueError, match=r"name different subjects: .*BraTS20_Training_002_t1ce.nii \(BraTS20_Training_002\)"
    ):
        _inferer(brain_oracle()).run(files, tmp_path / "out")
    _assert_nothing_written(tmp_path)


def _assert_nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists()  # the run's temporary folder lay inside it


def test_nan_from_the_sampler_is_named_and_writes_nothing(stand_in_network, brats_copy, tmp_path, monkeypatch):
    network = stand_in_network()
    monkeypatch.setattr(network, "denoise", lambda x_t, t, condition: torch.full_like(x_t, float("nan")))
    sampler = DiffusionSampler(num_inference_steps=2, scheduler="dpmpp_2m", ensemble_size=2)
    inferer = BratsVolumeInferer(network, sampler, roi_size=ROI, progress=False)
    with pytest.raises(FloatingPointError, match="scheduler 'dpmpp_2m' with 2 steps produced NaN"):
        inferer.run(brats_copy, tmp_path / "out", num_cases=1)
    _assert_nothing_written(tmp_path)


def test_missing_modality_fails_naming_it_and_writes_nothing(brain_oracle, brats_copy, tmp_path):
    (brats_copy / "BraTS20_Training_004" / "BraTS20_Training_004_flair.nii").unlink()
    with pytest.raises(BratsDataError, match="BraTS20_Training_004.*flair"):
        _inferer(brain_oracle()).run(brats_copy, tmp_path / "out")
    _assert_nothing_written(tmp_path)


def test_truncated_file_fails_naming_it_and_writes_nothing(brain_oracle, brats_copy, tmp_path):
    broken = brats_copy / "BraTS20_Training_006" / "BraTS20_Training_006_t2.nii"
    broken.write_bytes(broken.read_bytes()[:1000])
    with pytest.raises(BratsDataError, match="BraTS20_Training_006_t2.nii"):
        _inferer(brain_oracle()).run(brats_copy, tmp_path / "out")
    _assert_nothing_written(tmp_path)


def test_wrong_shape_fails_naming_the_file(brain_oracle, brats_copy, tmp_path):
    target = brats_copy / "BraTS20_Training_002" / "BraTS20_Training_002_t1ce.nii"
    original = nib.load(str(target))
    nib.save(nib.Nifti1Image(np.zeros((40, 48, 32), dtype=np.int16), original.affine), str(target))
    with pytest.raises(BratsDataError, match="BraTS20_Training_002_t1ce.nii has shape"):
        _inferer(brain_oracle()).run(brats_copy, tmp_path / "out")
    _assert_nothing_written(tmp_path)


def test_missing_file_among_four(brain_oracle, synthetic_brats_dir, tmp_path):
    folder = synthetic_brats_dir / "BraTS20_Training_001"
    files = [folder / f"BraTS20_Training_001_{m}.nii" for m in ("t1", "t1ce")]
    files += [tmp_path / "nowhere_t2.nii", folder / "BraTS20_Training_001_flair.nii"]
    with pytest.raises(FileNotFoundError, match="nowhere_t2.nii"):
        _inferer(brain_oracle()).run(files, tmp_path / "out")
    with pytest.raises(ValueError, match="4 modality files"):
        _inferer(brain_oracle()).run(files[:3], tmp_path / "out")
    _assert_nothing_written(tmp_path)


def test_an_output_folder_a_run_could_not_finish_in_is_refused_before_sampling(brain_oracle, brats_copy, tmp_path):
    """A file as output_dir, and a grades.csv of other columns (that the end of the run would update), stop the run
    before the first subject is sampled, naming the path."""
    inferer = _inferer(brain_oracle())
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(FileExistsError, match=r"output_dir .*out is a file"):
        inferer.run(brats_copy, tmp_path / "out", num_cases=1)
    (tmp_path / "out").unlink()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "grades.csv").write_text("id;prob\nfoo;0.3\n")
    for overwrite in (False, True):
        inferer.overwrite = overwrite
        with pytest.raises(ValueError, match=r"grades.csv has the columns \['id;prob'\], not \['subject_id', 'p_hgg'"):
            inferer.run(brats_copy, tmp_path / "out", num_cases=1)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["grades.csv"]
    noted = "subject_id,p_hgg,grade,reviewer_note\nBraTS20_Training_001,0.9,HGG,checked by hand\n"
    (tmp_path / "out" / "grades.csv").write_text(noted)  # a column the rewrite would drop
    with pytest.raises(ValueError, match=r"columns \['subject_id', 'p_hgg', 'grade', 'reviewer_note'\], not"):
        inferer.run(brats_copy, tmp_path / "out", num_cases=1)
    assert (tmp_path / "out" / "grades.csv").read_text() == noted


def test_an_input_without_subjects_is_named(brain_oracle, synthetic_datalist, tmp_path):
    """An empty list of a datalist, an empty list of entries and num_cases 0 each stop the run with what to do."""
    datalist = tmp_path / "no_validation.json"
    content = json.loads(synthetic_datalist.read_text())
    datalist.write_text(json.dumps({**content, "validation": []}))
    inferer = _inferer(brain_oracle())
    with pytest.raises(ValueError, match=r"has an empty list 'validation': choose another with --datalist_key"):
        inferer.run(datalist, tmp_path / "out", data_dir=synthetic_datalist.parent)
    with pytest.raises(ValueError, match="the input lists no subject"):
        inferer.run([], tmp_path / "out")
    with pytest.raises(ValueError, match="num_cases must be >= 1"):
        inferer.run(synthetic_datalist, tmp_path / "out", num_cases=0)
    _assert_nothing_written(tmp_path)


def test_two_subjects_under_one_id_are_refused_before_sampling(brain_oracle, synthetic_datalist, tmp_path):
    first, second = load_brats_datalist(synthetic_datalist, "validation")[:2]
    merged = json.loads(synthetic_datalist.read_text())
    merged["validation"][1]["subject_id"] = first["subject_id"]  # two sites' folders under one name
    datalist = tmp_path / "merged.json"
    datalist.write_text(json.dumps(merged))
    with pytest.raises(
        ValueError, match=rf"name more than one subject .*{first['subject_id']}: .*{second['image'][0]}"
    ):
        _inferer(brain_oracle()).run(datalist, tmp_path / "out", data_dir=synthetic_datalist.parent)
    _assert_nothing_written(tmp_path)


def test_failure_during_inference_leaves_earlier_outputs_untouched(brain_oracle, brats_copy, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    earlier = "subject_id,p_hgg,grade\nearlier_subject,0.100000,LGG\n"
    (out / "grades.csv").write_text(earlier)

    class FailingOnThirdSubject(BratsVolumeInferer):
        calls = 0

        def predict(self, entry):
            type(self).calls += 1
            if type(self).calls == 3:
                raise RuntimeError("simulated failure")
            return super().predict(entry)

    inferer = FailingOnThirdSubject(brain_oracle(), DiffusionSampler(2, ensemble_size=1), roi_size=ROI, progress=False)
    with pytest.raises(RuntimeError, match="simulated"):
        inferer.run(brats_copy, out)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["grades.csv"]
    assert (out / "grades.csv").read_text() == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["brats", "out"]


def test_an_interrupted_run_is_continued_by_the_same_command(stand_in_network, brats_copy, tmp_path, caplog):
    """The subjects an interrupted run finished are kept in its temporary folder and reused by a run of the same
    settings, whose outputs are those of an uninterrupted run; other settings, or a changed input, sample again."""

    def inferer(seed=0):
        return _stopping(stand_in_network(), seed=seed)

    reference = inferer().run(brats_copy, tmp_path / "reference")
    ids = [o.subject_id for o in reference]
    first = inferer()
    first.stop_at = 2
    with pytest.raises(KeyboardInterrupt):
        first.run(brats_copy, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")] == []
    again = inferer()
    with caplog.at_level("INFO", logger="medsegdiff_monai.workflows.pipeline"):
        again.run(brats_copy, tmp_path / "out")
    assert again.predicted == ids[2:]  # only the subjects the interrupted run had not finished
    assert f"2 of {len(ids)} subject(s) were already sampled" in caplog.text
    written = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert written == {p.name: p.read_bytes() for p in (tmp_path / "reference").iterdir()}  # all files, no folder

    stopped = inferer()
    stopped.stop_at = 2
    with pytest.raises(KeyboardInterrupt):
        stopped.overwrite = True
        stopped.run(brats_copy, tmp_path / "out")
    other_seed = inferer(seed=1)
    other_seed.overwrite = True
    other_seed.run(brats_copy, tmp_path / "out")
    assert other_seed.predicted == ids  # other settings: nothing reused
    stopped = inferer(seed=1)
    stopped.stop_at, stopped.overwrite = 2, True
    with pytest.raises(KeyboardInterrupt):
        stopped.run(brats_copy, tmp_path / "out")
    changed = brats_copy / ids[0] / f"{ids[0]}_flair.nii"
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    resumed = inferer(seed=1)
    resumed.overwrite = True
    resumed.run(brats_copy, tmp_path / "out")
    assert resumed.predicted == [ids[0], *ids[2:]]  # the subject whose file changed is sampled again


def test_second_run_refuses_earlier_outputs_then_updates_them_on_request(brain_oracle, synthetic_datalist, tmp_path):
    """A run into a folder holding outputs of the same subjects is refused unless ``overwrite``; the grades of the
    other subjects stay in ``grades.csv``; the partial folder of a killed run is removed."""
    entries = load_brats_datalist(synthetic_datalist, "validation")
    out = tmp_path / "out"
    _inferer(brain_oracle(hgg_logit=2.0)).run(entries, out)
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    killed = out / ".partial-x1y2"  # what a run killed while writing leaves
    killed.mkdir()
    (killed / "half.nii.gz").write_bytes(b"")
    with pytest.raises(FileExistsError, match=rf"{entries[0]['subject_id']}_seg.nii.gz.*--overwrite true"):
        _inferer(brain_oracle(hgg_logit=-2.0)).run(entries[:1], out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == first and killed.exists()
    _inferer(brain_oracle(hgg_logit=-2.0), overwrite=True).run(entries[:1], out)
    with open(out / "grades.csv") as f:
        rows = {row["subject_id"]: row for row in csv.DictReader(f)}
    assert list(rows) == [e["subject_id"] for e in entries]  # the other subject's row kept, in its place
    assert rows[entries[0]["subject_id"]]["grade"] == "LGG" and rows[entries[1]["subject_id"]]["grade"] == "HGG"
    assert float(rows[entries[0]["subject_id"]]["p_hgg"]) == pytest.approx(1 / (1 + np.exp(2.0)), abs=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert not killed.exists() and all(p.is_file() for p in out.iterdir())  # the killed run's folder is gone


def test_overwriting_a_subject_leaves_none_of_its_earlier_outputs(
    brain_oracle, stand_in_network, synthetic_datalist, tmp_path
):
    """Run again with ``overwrite`` by a network without the grade head and without overlays, a subject keeps no
    earlier file or grades.csv row (they would belong to the other network); the other subject keeps all of its."""
    entries = load_brats_datalist(synthetic_datalist, "validation")
    out = tmp_path / "out"
    _inferer(brain_oracle(hgg_logit=2.0), write_overlays=True).run(entries, out)
    rerun, kept = (entry["subject_id"] for entry in entries[:2])
    _inferer(stand_in_network(use_grade_head=False), overwrite=True).run(entries[:1], out)
    names = sorted(p.name for p in out.iterdir())
    assert f"{rerun}_overlay.png" not in names and f"{kept}_overlay.png" in names
    assert {f"{rerun}_seg.nii.gz", f"{rerun}_uncertainty.nii.gz", f"{kept}_seg.nii.gz"} <= set(names)
    with open(out / "grades.csv") as f:
        assert [row["subject_id"] for row in csv.DictReader(f)] == [kept]


def test_compile_waits_for_runs_that_it_pays_for(brain_oracle, synthetic_datalist, tmp_path, monkeypatch):
    import medsegdiff_monai.inferers.sampler as sampler_module

    compiled, compiled_calls = [], []

    def counting_compile(function, **kwargs):  # stands in for torch.compile: records the call, runs eagerly
        compiled.append(kwargs)

        def run(*args, **kw):
            compiled_calls.append(1)
            return function(*args, **kw)

        return run

    monkeypatch.setattr(torch, "compile", counting_compile)
    monkeypatch.setattr(sampler_module, "_COMPILED_DENOISE", {})
    entries = load_brats_datalist(synthetic_datalist, "validation")
    assert len(entries) >= 2
    network = brain_oracle(hgg_logit=1.0)
    sampler = DiffusionSampler(num_inference_steps=2, ensemble_size=2, compile=True)
    inferer = BratsVolumeInferer(network, sampler, roi_size=ROI, progress=False, compile_min_volumes=2)
    eager = BratsVolumeInferer(network, DiffusionSampler(num_inference_steps=2, ensemble_size=2), roi_size=ROI,
                               progress=False)  # fmt: skip

    inferer.run(entries[:1], tmp_path / "one")  # one volume: below compile_min_volumes, eager
    assert compiled == [] and compiled_calls == [] and sampler.compile
    eager.run(entries[:1], tmp_path / "reference")
    name = f"{entries[0]['subject_id']}_seg.nii.gz"
    np.testing.assert_array_equal(_read(tmp_path / "one" / name), _read(tmp_path / "reference" / name))

    inferer.run(entries[:2], tmp_path / "two")  # enough volumes: compiled, with static shapes
    assert compiled == [{"dynamic": False}] and compiled_calls
    calls = len(compiled_calls)
    inferer.run(entries[:1], tmp_path / "again")  # the process holds the compiled denoiser: it is used
    assert sampler.is_compiled_for(network) and len(compiled) == 1 and len(compiled_calls) > calls
    with pytest.raises(ValueError, match="compile_min_volumes must be >= 1"):
        BratsVolumeInferer(network, sampler, roi_size=ROI, compile_min_volumes=0)


@pytest.mark.skipif(fcntl is None, reason="folder locks need fcntl")
def test_a_run_into_a_folder_another_run_is_writing_into_is_refused(brain_oracle, synthetic_datalist, tmp_path):
    entries = load_brats_datalist(synthetic_datalist, "validation")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".partial-live").mkdir()  # the running run's temporary folder
    descriptor = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a run in another process holds it
        with pytest.raises(FileExistsError, match=f"another run is writing into {out}"):
            _inferer(brain_oracle()).run(entries, out)
        assert [p.name for p in out.iterdir()] == [".partial-live"]  # its temporary folder is left alone
    finally:
        os.close(descriptor)
    _inferer(brain_oracle()).run(entries, out)  # once released, the folder is free
    assert not (out / ".partial-live").exists()


def test_outputs_are_staged_inside_the_output_folder_and_finalize_is_all_or_nothing(
    brain_oracle, synthetic_datalist, tmp_path
):
    entries = load_brats_datalist(synthetic_datalist, "validation")
    out = tmp_path / "out"
    seen = {}

    def finalize(staging, outputs):
        seen["staging"] = staging
        seen["files"] = sorted(p.name for p in staging.iterdir() if not p.name.startswith("."))
        (staging / "report.txt").write_text("written with the outputs")

    outputs = _inferer(brain_oracle()).run(entries, out, finalize=finalize)
    assert seen["staging"].parent == out  # one file system: the final moves are renames
    assert seen["files"] == sorted({path.name for o in outputs for path in o.files.values()} | {"grades.csv"})
    assert (out / "report.txt").read_text() == "written with the outputs"
    first = {p.name: p.read_bytes() for p in out.iterdir()}

    def failing(staging, outputs):
        raise RuntimeError("the report could not be written")

    with pytest.raises(RuntimeError, match="could not be written"):
        _inferer(brain_oracle(hgg_logit=-3.0), overwrite=True).run(entries, out, finalize=failing)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == first  # nothing moved in
    with pytest.raises(RuntimeError, match="could not be written"):
        _inferer(brain_oracle()).run(entries, tmp_path / "new", finalize=failing)
    assert [p.name for p in (tmp_path / "new").iterdir() if not p.name.startswith(".partial-")] == []


class _Stopping(BratsVolumeInferer):
    """Records the subjects it samples; raises KeyboardInterrupt before the ``stop_at``-th one."""

    stop_at: int | None = None

    def predict(self, entry):
        if len(self.predicted) == self.stop_at:
            raise KeyboardInterrupt
        self.predicted.append(entry["subject_id"])
        return super().predict(entry)


def _stopping(network, stop_at=None, seed=0, **kwargs) -> _Stopping:
    sampler = DiffusionSampler(2, ensemble_size=2, seed=seed)
    made = _Stopping(network, sampler, roi_size=ROI, progress=False, **kwargs)
    made.predicted, made.stop_at = [], stop_at
    return made


def test_a_continued_run_moves_in_only_its_own_subjects(stand_in_network, synthetic_datalist, tmp_path):
    entries = load_brats_datalist(synthetic_datalist, "training")
    with pytest.raises(KeyboardInterrupt):
        _stopping(stand_in_network(), stop_at=3).run(entries, tmp_path / "out")
    later = _stopping(stand_in_network())
    later.run(entries[2:4], tmp_path / "out")  # the third was finished before the stop, the fourth was not
    assert later.predicted == [entries[3]["subject_id"]]
    visible = sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith("."))
    expected = sorted(
        f"{e['subject_id']}{suffix}" for e in entries[2:4] for suffix in ("_seg.nii.gz", "_uncertainty.nii.gz")
    )
    assert visible == sorted([*expected, "grades.csv"])


def test_settings_that_change_the_outputs_are_not_continued(stand_in_network, brats_copy, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _stopping(stand_in_network(), stop_at=2).run(brats_copy, tmp_path / "out")
    other = _stopping(stand_in_network(), slice_batch_size=4)  # another batching draws other noise
    other.run(brats_copy, tmp_path / "out")
    assert len(other.predicted) == len([p for p in brats_copy.iterdir() if p.is_dir()])  # nothing reused


def test_a_run_stopped_while_moving_its_files_in_is_continued(
    stand_in_network, synthetic_datalist, tmp_path, monkeypatch
):
    entries = load_brats_datalist(synthetic_datalist, "validation")
    replace, moves = os.replace, []

    def stopped_on_the_third_move(src, dst):
        if Path(dst).parent == tmp_path / "out":  # a move into the output folder, not a record's update
            moves.append(dst)
            if len(moves) == 3:
                raise KeyboardInterrupt
        replace(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", stopped_on_the_third_move)
        with pytest.raises(KeyboardInterrupt):
            _stopping(stand_in_network()).run(entries, tmp_path / "out")
    assert len([p for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")]) == 2  # two moved in
    check_inference_run(entries, tmp_path / "out", None, ROI, 8)  # the bundle's pre-check lets the run decide
    again = _stopping(stand_in_network())
    again.run(entries, tmp_path / "out")  # not refused: those files are this run's own
    reference = _stopping(stand_in_network()).run(entries, tmp_path / "reference")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == {
        p.name: p.read_bytes() for p in (tmp_path / "reference").iterdir()
    }
    assert len(reference) == len(entries)


def test_an_output_folder_in_the_data_root_of_a_datalist_is_refused(brain_oracle, synthetic_datalist, tmp_path):
    out = synthetic_datalist.parent / "preds"
    with pytest.raises(ValueError, match=f"output_dir {out} lies inside the input folder {synthetic_datalist.parent}"):
        _inferer(brain_oracle()).run(synthetic_datalist, out)
    assert not out.exists()


def test_an_output_folder_that_cannot_be_written_is_named_before_sampling(
    brain_oracle, brats_copy, tmp_path, monkeypatch
):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    inferer = _inferer(brain_oracle())
    inferer.predict = None  # never reached
    monkeypatch.setattr("medsegdiff_monai.workflows.pipeline.tempfile.TemporaryFile", denied)
    with pytest.raises(
        PermissionError,
        match=f"output_dir {tmp_path / 'new' / 'out'} cannot be written: Permission denied in {tmp_path}",
    ):
        inferer.run(brats_copy, tmp_path / "new" / "out")
    assert not (tmp_path / "new").exists()


def test_a_grades_table_saved_with_a_byte_order_mark_is_updated(brain_oracle, synthetic_datalist, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "grades.csv").write_text("subject_id,p_hgg,grade\nearlier,0.100000,LGG\n", encoding="utf-8-sig")
    _inferer(brain_oracle()).run(synthetic_datalist, out)
    with open(out / "grades.csv", newline="") as f:
        assert [row["subject_id"] for row in csv.DictReader(f)][0] == "earlier"


def test_another_noise_schedule_is_not_continued(stand_in_network, brats_copy, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _stopping(stand_in_network(), stop_at=2).run(brats_copy, tmp_path / "out")
    other = _stopping(stand_in_network())
    other.sampler = DiffusionSampler(2, ensemble_size=2, seed=0, schedule="scaled_linear_beta")  # same timesteps
    assert other.sampler.timesteps == _stopping(stand_in_network()).sampler.timesteps
    other.run(brats_copy, tmp_path / "out")
    assert len(other.predicted) == len([p for p in brats_copy.iterdir() if p.is_dir()])


def test_an_output_folder_in_the_release_a_datalist_points_into_is_refused(brain_oracle, synthetic_datalist, tmp_path):
    entries = load_brats_datalist(synthetic_datalist, "validation")  # absolute paths, as a datalist written elsewhere
    release = Path(entries[0]["image"][0]).parent.parent
    with pytest.raises(ValueError, match=f"output_dir {release / 'preds'} lies inside the input folder {release}"):
        _inferer(brain_oracle()).run(entries, release / "preds")
    assert not (release / "preds").exists()


def test_subjects_a_stopped_run_sampled_and_a_later_run_drops_are_named(stand_in_network, brats_copy, tmp_path, caplog):
    with pytest.raises(KeyboardInterrupt):
        _stopping(stand_in_network(), stop_at=2).run(brats_copy, tmp_path / "out")
    with caplog.at_level("WARNING", logger="medsegdiff_monai.workflows.pipeline"):
        _stopping(stand_in_network()).run(brats_copy / "BraTS20_Training_005", tmp_path / "out")
    assert "removing 2 subject(s) that an interrupted run of these settings had sampled" in caplog.text
    assert "BraTS20_Training_001, BraTS20_Training_002" in caplog.text


def test_region_uncertainty_maps_in_the_qu_brats_format(stand_in_network, brats_copy, tmp_path):
    """With ``region_uncertainty_map="ensemble_std"``, each region's ensemble std as uint8 0-100 on the input grid
    (QU-BraTS names); their maximum over regions is the float map (up to the rounding to 1/200); a later run without
    them removes them."""
    out = tmp_path / "out"
    inferer = _inferer(stand_in_network(), write_region_uncertainty=True, region_uncertainty_map="ensemble_std")
    outputs = inferer.run(brats_copy, out)
    regions = ("whole", "core", "enhance")
    for output in outputs:
        assert sorted(output.files) == sorted(["seg", "uncertainty", *(f"unc_{r}" for r in regions)])
        t1 = nib.load(str(next(brats_copy.glob(f"*/{output.subject_id}_t1.nii*"))))
        maps = []
        for region in regions:
            written = nib.load(str(out / f"{output.subject_id}_unc_{region}.nii.gz"))
            assert written.shape == t1.shape and written.get_data_dtype() == np.uint8
            np.testing.assert_allclose(written.affine, t1.affine)
            maps.append(np.asarray(written.dataobj))
        maps = np.stack(maps)
        assert maps.max() <= 100
        std = _read(out / f"{output.subject_id}_uncertainty.nii.gz")
        assert std.max() > 0  # the stand-in's members differ
        np.testing.assert_allclose(maps.max(axis=0) / 200, std, atol=1 / 400 + 1e-6)
    _inferer(stand_in_network(), overwrite=True).run(brats_copy, out)
    assert not list(out.glob("*_unc_*.nii.gz"))


def test_near_miss_region_maps_by_default(stand_in_network, brats_copy, tmp_path):
    """The default QU-BraTS maps are 100 (1 - |2p - 1|) of each region's mean probability on the input grid outside
    the written segmentation's region, and 0 inside it; another kind is refused, naming the valid ones."""
    # at threshold 0.7 the stand-in's voxels of probability 0.5-0.7 stay outside the regions, so some are flagged
    inferer = _inferer(stand_in_network(), write_region_uncertainty=True, threshold=0.7)
    probabilities = {}
    invert = inferer.inverter

    def keep_probabilities(data):
        inverted = invert(data)
        probabilities[data["subject_id"]] = inverted["probs"].as_tensor().numpy()
        return inverted

    inferer.inverter = keep_probabilities
    out = tmp_path / "out"
    outputs = inferer.run(brats_copy, out)
    flagged = 0
    for output in outputs:
        seg = _read(out / f"{output.subject_id}_seg.nii.gz")
        predicted = {"core": np.isin(seg, (1, 4)), "whole": seg > 0, "enhance": seg == 4}
        for index, region in enumerate(("core", "whole", "enhance")):  # TC, WT, ET: the network's channels
            written = _read(out / f"{output.subject_id}_unc_{region}.nii.gz")
            margin = 1 - np.abs(2 * probabilities[output.subject_id][index].astype(np.float64) - 1)
            expected = np.rint(100 * np.where(predicted[region], 0, margin))
            np.testing.assert_array_equal(written, expected)
            flagged += int((written > 0).sum())
    assert flagged > 0
    with pytest.raises(ValueError, match=r"region_uncertainty_map must be 'near_miss' or 'ensemble_std', got 'std'"):
        _inferer(stand_in_network(), region_uncertainty_map="std")
    with pytest.warns(UserWarning, match=r"'ensemble_std' has no effect without write_region_uncertainty"):
        _inferer(stand_in_network(), region_uncertainty_map="ensemble_std")


def test_overlays_are_drawn_from_ras_arrays_whatever_the_storage_order(brain_oracle, brats_copy, tmp_path, monkeypatch):
    """The overlay slices axis 2 and puts anterior up for RAS arrays: a subject stored in another axis order and
    direction gets the same overlay, drawn from the arrays nibabel's closest canonical (RAS) image holds."""
    drawn = []
    monkeypatch.setattr(
        "medsegdiff_monai.workflows.pipeline.write_overlay_png",
        lambda image, labels, path: drawn.append((np.asarray(image), np.asarray(labels))),
    )
    stored = brats_copy / "BraTS20_Training_001"
    canonical = tmp_path / "canonical" / stored.name
    canonical.mkdir(parents=True)
    for path in stored.iterdir():  # the same voxels, stored in RAS axis order
        nib.save(nib.as_closest_canonical(nib.load(str(path))), str(canonical / path.name))
    for source in (stored, canonical):
        _inferer(brain_oracle(), write_overlays=True).run(source, tmp_path / f"out_{source.parent.name}")
    (flair_stored, labels_stored), (flair_canonical, labels_canonical) = drawn
    expected = nib.as_closest_canonical(nib.load(str(stored / "BraTS20_Training_001_flair.nii"))).get_fdata()
    assert not np.array_equal(np.asarray(nib.load(str(stored / "BraTS20_Training_001_flair.nii")).dataobj), expected)
    np.testing.assert_array_equal(flair_stored, expected)
    np.testing.assert_array_equal(flair_canonical, expected)
    np.testing.assert_array_equal(labels_stored, labels_canonical)
