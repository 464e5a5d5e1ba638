"""BraTS 2020, 2021 and 2023 layouts: synthetic writing, reading, checking, label conventions and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medsegdiff_monai.cli import main
from medsegdiff_monai.data import (
    BratsDataError,
    convert_label_convention,
    label_convention,
    patient_of,
    read_brats_folder,
    release_of_file,
    write_synthetic_brats,
)

SHAPE = (20, 20, 16)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three subjects (seed 3, LGG fraction 1/3) in each layout."""
    root = tmp_path_factory.mktemp("layouts")
    return {
        layout: write_synthetic_brats(
            root / layout, num_subjects=3, lgg_fraction=1 / 3, shape=SHAPE, seed=3, progress=False, layout=layout
        )
        for layout in ("brats2020", "brats2021", "brats2023")
    }


def _copy(layouts: dict[str, Path], layout: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(layouts[layout], tmp_path / layout))


def _voxels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def test_each_layout_is_written_with_its_names_and_labels(layouts):
    names = {layout: sorted(p.name for p in (folder.iterdir())) for layout, folder in layouts.items()}
    assert names["brats2020"] == ["BraTS20_Training_001", "BraTS20_Training_002", "BraTS20_Training_003"] + [
        "name_mapping.csv",
        "synthetic.json",
    ]
    assert names["brats2021"] == ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002", "synthetic.json"]
    assert names["brats2023"] == ["BraTS-GLI-00000-000", "BraTS-GLI-00001-000", "BraTS-GLI-00002-000", "synthetic.json"]
    subject = layouts["brats2023"] / "BraTS-GLI-00001-000"
    assert sorted(p.name for p in subject.iterdir()) == [
        f"BraTS-GLI-00001-000-{s}.nii.gz" for s in ("seg", "t1c", "t1n", "t2f", "t2w")
    ]
    label_2020 = _voxels(layouts["brats2020"] / "BraTS20_Training_002" / "BraTS20_Training_002_seg.nii")
    label_2021 = _voxels(layouts["brats2021"] / "BraTS2021_00001" / "BraTS2021_00001_seg.nii.gz")
    label_2023 = _voxels(subject / "BraTS-GLI-00001-000-seg.nii.gz")
    np.testing.assert_array_equal(label_2020, label_2021)
    assert 4 in label_2020 and set(np.unique(label_2023)) <= {0, 1, 2, 3} and 3 in label_2023
    np.testing.assert_array_equal(np.where(label_2020 == 4, 3, label_2020), label_2023)
    t1c = _voxels(subject / "BraTS-GLI-00001-000-t1c.nii.gz")
    np.testing.assert_array_equal(
        t1c, _voxels(layouts["brats2020"] / "BraTS20_Training_002" / "BraTS20_Training_002_t1ce.nii")
    )


def test_reader_finds_release_and_grades(layouts):
    graded = read_brats_folder(layouts["brats2020"], progress=False)
    assert [s.release for s in graded] == ["brats2020"] * 3 and sorted(s.grade for s in graded) == [0, 1, 1]
    for layout, release in (("brats2021", "brats2020"), ("brats2023", "brats2023")):
        subjects = read_brats_folder(layouts[layout], progress=False)
        assert [s.release for s in subjects] == [release] * 3 and all(s.grade is None for s in subjects)
        assert [release_of_file(p) for p in subjects[0].images] == [release] * 4
    t1c = read_brats_folder(layouts["brats2023"], progress=False)[0].images[1]
    assert t1c.name == "BraTS-GLI-00000-000-t1c.nii.gz"  # the t1ce channel


def test_user_grade_table_brings_grades_back(layouts, tmp_path):
    table = tmp_path / "grades.csv"
    table.write_text("subject_id,p_hgg,grade\nBraTS-GLI-00000-000,0.9,HGG\nBraTS-GLI-00001-000,0.2,LGG\n")
    report_dir = layouts["brats2023"]
    with pytest.raises(BratsDataError, match=r"BraTS-GLI-00002-000: folder .* has no row in .*grades.csv"):
        read_brats_folder(report_dir, csv_path=table, progress=False)
    subjects = read_brats_folder(report_dir, csv_path=table, skip_unmatched=True, progress=False)
    assert [(s.subject_id, s.grade) for s in subjects] == [("BraTS-GLI-00000-000", 1), ("BraTS-GLI-00001-000", 0)]


def test_label_outside_the_release_set_names_the_file(layouts, tmp_path):
    folder = _copy(layouts, "brats2023", tmp_path)
    label_path = folder / "BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-seg.nii.gz"
    image = nib.load(label_path)
    labels = np.asarray(image.dataobj).copy()
    labels[labels == 3] = 4
    nib.save(nib.Nifti1Image(labels, image.affine), label_path)
    with pytest.raises(BratsDataError) as error:
        read_brats_folder(folder, progress=False)
    message = str(error.value)
    assert f"label file {label_path} has values [4] outside the BraTS 2023+ label set [0, 1, 2, 3]" in message
    assert "4 is the enhancing tumour of BraTS 2018-2022" in message and "BraTS-GLI-00000-000" not in message


def test_missing_modality_under_either_naming(layouts, tmp_path):
    folder = _copy(layouts, "brats2023", tmp_path)
    (folder / "BraTS-GLI-00002-000" / "BraTS-GLI-00002-000-t1c.nii.gz").unlink()
    with pytest.raises(
        BratsDataError, match=r"missing modality 't1ce': expected a file BraTS-GLI-00002-000-t1c.nii.gz"
    ):
        read_brats_folder(folder, progress=False)
    subject = folder / "BraTS-GLI-00001-000"
    for path in subject.glob("*-t*.nii.gz"):
        path.unlink()
    with pytest.raises(BratsDataError, match=r"BraTS-GLI-00001-000_t1.nii.gz \(BraTS 2018-2022\) or "):
        read_brats_folder(folder, progress=False)


def test_check_of_a_release_with_bare_file_names_says_where_they_are_read(layouts, tmp_path, capsys):
    """A release whose subject folder holds ``t1n.nii.gz`` ... (the subject id not in the names) is refused by
    ``check``, each missing modality naming its bare-named file and the inputs that read such names."""
    folder = _copy(layouts, "brats2023", tmp_path)
    subject = folder / "BraTS-GLI-00001-000"
    for path in subject.glob("*.nii.gz"):
        path.rename(subject / path.name.removeprefix(f"{subject.name}-"))
    assert main(["check", "--data-dir", str(folder), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert (
        f"subject {subject.name}: missing modality 't1ce': expected a file {subject.name}_t1ce.nii.gz (BraTS "
        f"2018-2022) or {subject.name}-t1c.nii.gz (BraTS 2023+) (or .nii) in {subject}. t1c.nii.gz there is named as "
        "the modality alone, which is read only when the four files are given as a list, or this folder alone, as "
        "the inference input."
    ) in err
    assert err.count("named as the modality alone") == 4 and "4 problem(s) found." in err


def test_mixed_naming_in_a_subject_and_in_a_folder(layouts, tmp_path):
    folder = _copy(layouts, "brats2021", tmp_path)
    subject = folder / "BraTS2021_00001"
    shutil.move(subject / "BraTS2021_00001_t2.nii.gz", subject / "BraTS2021_00001-t2w.nii.gz")
    with pytest.raises(
        BratsDataError, match=r"subject BraTS2021_00001: mixed file naming .*BraTS2021_00001-t2w.nii.gz"
    ):
        read_brats_folder(folder, progress=False)
    shutil.rmtree(subject)
    shutil.copytree(layouts["brats2023"] / "BraTS-GLI-00000-000", folder / "BraTS-GLI-00000-000")
    with pytest.raises(
        BratsDataError, match=r"mixes BraTS layouts: 2 in BraTS 2018-2022 naming \(e.g. BraTS2021_00000\)"
    ):
        read_brats_folder(folder, progress=False)


def test_label_convention_detection_and_conversion():
    assert label_convention([0, 1, 2, 4], "a") == "brats2020"
    assert label_convention(np.array([0.0, 3.0]), "a") == "brats2023"
    assert label_convention([0, 1, 2], "a") is None
    with pytest.raises(ValueError, match=r"label file b.nii holds labels \[0, 3, 4\]: it mixes labels 3 and 4"):
        label_convention([0, 3, 4], "b.nii")
    with pytest.raises(ValueError, match=r"holds labels \[0, 6\]: values \[6\] are outside both"):
        label_convention([0, 6], "c.nii")
    # an interpolated label map is refused, not truncated to labels (1.4 -> 1, 3.9 -> 3)
    for values, fraction in (([0, 1.4, 2, 4], 1.4), ([0.0, 1.0, 2.0, 3.9], 3.9)):
        with pytest.raises(ValueError, match=rf"values \[{fraction}\] are outside both"):
            label_convention(np.array(values, dtype=np.float64), "d.nii")
    labels = np.array([0, 1, 2, 4], dtype=np.uint8)
    np.testing.assert_array_equal(convert_label_convention(labels, "brats2020", "brats2023"), [0, 1, 2, 3])
    assert convert_label_convention(labels, "brats2020", "brats2020") is labels


@pytest.mark.parametrize("layout", ["brats2021", "brats2023"])
def test_cli_synth_and_check(layout, tmp_path, capsys):
    out = tmp_path / layout
    args = ["--out", str(out), "--subjects", "2", "--shape", "16", "16", "16", "--layout", layout, "--no-progress"]
    assert main(["synth", *args]) == 0
    assert main(["check", "--data-dir", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "segmentation only" in printed and "2 subjects, no problem found" in printed


@pytest.mark.parametrize("layout", ["brats2021", "brats2023"])
def test_datalist_without_grades_is_segmentation_only(layouts, layout, tmp_path, capsys):
    out = tmp_path / "datalist.json"
    args = ["--data-dir", str(layouts[layout]), "--val-fraction", "0.34", "--out", str(out), "--no-progress"]
    assert main(["datalist", *args]) == 0
    assert "without grades (segmentation only)" in capsys.readouterr().out
    datalist = json.loads(out.read_text())
    entries = datalist["training"] + datalist["validation"]
    assert (len(datalist["training"]), len(datalist["validation"])) == (2, 1) and "class_balance" not in datalist
    assert all("grade" not in e for e in entries)
    assert sorted(e["subject_id"] for e in entries) == sorted(p.name for p in layouts[layout].iterdir() if p.is_dir())
    assert entries[0]["image"][0].endswith("_t1.nii.gz" if layout == "brats2021" else "-t1n.nii.gz")
    # a held-out testing list as in a graded folder; a split that leaves no training subject is refused
    args = ["--data-dir", str(layouts[layout]), "--val-fraction", "0.34", "--test-fraction", "0.34", "--out", str(out)]
    before = out.read_text()
    assert main(["datalist", *args, "--no-progress"]) == 1  # another split over the datalist: not without --overwrite
    assert "already holds another datalist" in capsys.readouterr().err and out.read_text() == before
    args.append("--overwrite")
    assert main(["datalist", *args, "--no-progress"]) == 0
    assert "1 training, 1 validation and 1 testing subjects" in capsys.readouterr().out
    held_out = json.loads(out.read_text())
    assert [len(held_out[key]) for key in ("training", "validation", "testing")] == [1, 1, 1]
    assert held_out["split"]["test_fraction"] == 0.34
    assert sorted(e["subject_id"] for key in ("training", "validation", "testing") for e in held_out[key]) == sorted(
        e["subject_id"] for e in entries
    )
    args[3] = "0.67"
    assert main(["datalist", *args, "--no-progress"]) == 1
    assert "leave none for training" in capsys.readouterr().err
    # with a grade table of one's own, the datalist is graded again (four subjects: every split needs both grades)
    folder = write_synthetic_brats(
        tmp_path / "four", num_subjects=4, lgg_fraction=0.5, shape=SHAPE, seed=3, progress=False, layout=layout
    )
    table = tmp_path / "grades.csv"
    ids = sorted(p.name for p in folder.iterdir() if p.is_dir())
    table.write_text("subject_id,grade\n" + "".join(f"{s},{g}\n" for s, g in zip(ids, ["LGG", "HGG", "HGG", "LGG"])))
    graded_args = [
        "--data-dir",
        str(folder),
        "--val-fraction",
        "0.5",
        "--out",
        str(tmp_path / "graded.json"),
        "--no-progress",
    ]
    assert main(["datalist", *graded_args, "--grades", str(table)]) == 0
    graded = json.loads((tmp_path / "graded.json").read_text())
    assert sorted(e["grade"] for e in graded["training"] + graded["validation"]) == [0, 0, 1, 1]
    assert {e["grade"] for e in graded["validation"]} == {0, 1}


def test_training_targets_of_brats2023_equal_those_of_brats2020(layouts):
    from medsegdiff_monai.data import subject_entry
    from medsegdiff_monai.transforms import get_val_transforms

    def sample(layout: str) -> dict:
        subject = read_brats_folder(layouts[layout], progress=False)[1]
        entry = subject_entry(subject, layouts[layout])
        entry.update(
            image=[str(layouts[layout] / p) for p in entry["image"]], label=str(layouts[layout] / entry["label"])
        )
        return get_val_transforms((32, 32))(entry)

    old, new = sample("brats2020"), sample("brats2023")
    assert "grade" not in new and int(old["grade"]) in (0, 1)  # no grade table: segmentation-only sample
    assert new["label"].shape[0] == 3 and new["label"][2].sum() > 0  # ET (label 3 on disk) is kept
    assert torch.equal(new["label"].as_tensor(), old["label"].as_tensor())
    assert torch.equal(new["image"].as_tensor(), old["image"].as_tensor())


@pytest.mark.parametrize("layout", ["brats2021", "brats2023"])
def test_training_input_check_reads_labels_in_the_release_of_the_file_names(layouts, layout, tmp_path):
    """The check before the cache fill accepts each release's own label set (ET = 3 in BraTS 2023 names) and still
    refuses ET = 3 in a file named as BraTS 2018-2022."""
    from medsegdiff_monai.data import BratsDataError, check_training_inputs

    folder = _copy(layouts, layout, tmp_path)
    datalist = folder / "datalist.json"
    split = ["--data-dir", str(folder), "--val-fraction", "0.34", "--out", str(datalist), "--no-progress"]
    assert main(["datalist", *split]) == 0
    check_training_inputs(datalist, folder, [16, 16], 8, require_grade=False, progress=False)
    if layout == "brats2021":  # a 2021 name with a label 3 voxel: the wrong release's label set
        label = next(folder.glob("*/*_seg.nii.gz"))
        image = nib.load(str(label))
        voxels = np.asarray(image.dataobj).copy()
        voxels[voxels == 4] = 3
        nib.save(nib.Nifti1Image(voxels, image.affine, image.header), str(label))
        with pytest.raises(BratsDataError, match=r"values \[3\]"):
            check_training_inputs(datalist, folder, [16, 16], 8, require_grade=False, progress=False)


def test_training_input_check_reads_bare_file_names(layouts, tmp_path):
    """Case folders with the modality names alone (``t1n.nii.gz`` ... as some BraTS 2023 tools write them) are read
    in their release's label set, as inference's output convention reads them: ET = 3 is accepted under bare 2023
    names and refused under bare 2018-2022 names (``t1.nii.gz`` ...)."""
    from medsegdiff_monai.data import BratsDataError, check_training_inputs
    from medsegdiff_monai.data.layout import MODALITY_FILE_SUFFIXES

    entries = []
    for case in sorted(p for p in layouts["brats2023"].iterdir() if p.is_dir()):
        folder = Path(shutil.copytree(case, tmp_path / "bare" / case.name))
        for path in list(folder.iterdir()):
            path.rename(folder / path.name.replace(f"{case.name}-", ""))
        names = [f"{case.name}/{suffix[1:]}.nii.gz" for suffix in MODALITY_FILE_SUFFIXES["brats2023"]]
        entries.append({"subject_id": case.name, "image": names, "label": f"{case.name}/seg.nii.gz"})
    assert any(3 in np.unique(_voxels(tmp_path / "bare" / e["label"])) for e in entries)
    datalist = tmp_path / "bare" / "datalist.json"
    datalist.write_text(json.dumps({"training": entries[:2], "validation": entries[2:]}))
    check_training_inputs(datalist, tmp_path / "bare", [16, 16], 8, require_grade=False, progress=False)

    for entry in entries:  # the same files under bare BraTS 2018-2022 names: ET = 3 is not in that set
        renamed = []
        for name, suffix in zip(entry["image"], MODALITY_FILE_SUFFIXES["brats2020"], strict=True):
            target = f"{entry['subject_id']}/{suffix[1:]}.nii.gz"
            (tmp_path / "bare" / name).rename(tmp_path / "bare" / target)
            renamed.append(target)
        entry["image"] = renamed
    datalist.write_text(json.dumps({"training": entries[:2], "validation": entries[2:]}))
    with pytest.raises(BratsDataError, match=r"values \[3\]"):
        check_training_inputs(datalist, tmp_path / "bare", [16, 16], 8, require_grade=False, progress=False)


def test_training_input_check_names_subjects_without_a_grade_among_graded_ones(synthetic_datalist, tmp_path):
    """Grades given for some training subjects only: each subject without one is named with both ways out, before
    any cache fill; grade names ("LGG", "HGG") are grades, other values are named."""
    from medsegdiff_monai.data import BratsDataError, check_training_inputs

    folder = synthetic_datalist.parent
    datalist = tmp_path / "datalist.json"
    content = json.loads(synthetic_datalist.read_text())
    content["training"][0]["grade"] = "LGG" if content["training"][0]["grade"] == 0 else "HGG"
    datalist.write_text(json.dumps(content))
    check_training_inputs(datalist, folder, [16, 16], 8, require_grade=True, progress=False)
    missing = content["training"][1].pop("grade")
    content["validation"][0]["grade"] = "G4"
    datalist.write_text(json.dumps(content))
    with pytest.raises(BratsDataError) as raised:
        check_training_inputs(datalist, folder, [16, 16], 8, require_grade=True, progress=False)
    message = str(raised.value)
    assert f"subject {content['training'][1]['subject_id']} (datalist.json 'training'[1]): no 'grade'" in message
    assert "--grades GRADES.csv" in message and "--use_grade_head false" in message
    assert f"subject {content['validation'][0]['subject_id']}: grade 'G4' is not valid" in message
    assert missing in (0, 1)


@pytest.mark.parametrize(
    ("subject_id", "patient"),
    [
        ("BraTS-GLI-00001-001", "BraTS-GLI-00001"),
        ("BraTS-MEN-00002-000", "BraTS-MEN-00002"),
        ("BraTS-SSA-00003-010", "BraTS-SSA-00003"),
        ("BraTS20_Training_001", "BraTS20_Training_001"),
        ("BraTS2021_00000", "BraTS2021_00000"),
        ("BraTS-GLI-00001", "BraTS-GLI-00001"),
    ],
)
def test_patient_of_a_subject_id(subject_id, patient):
    assert patient_of(subject_id) == patient


def _with_second_timepoints(layouts: dict[str, Path], tmp_path: Path) -> Path:
    """The three BraTS 2023 subjects (timepoint 000) and a copy of each as timepoint 001: three patients."""
    folder = _copy(layouts, "brats2023", tmp_path)
    for case in sorted(p for p in folder.iterdir() if p.is_dir()):
        later = f"{patient_of(case.name)}-001"
        (folder / later).mkdir()
        for path in case.iterdir():
            shutil.copy(path, folder / later / path.name.replace(case.name, later))
    return folder


def test_datalist_and_training_check_keep_a_patients_timepoints_in_one_list(layouts, tmp_path):
    from medsegdiff_monai.data import BratsDataError, check_training_inputs

    folder = _with_second_timepoints(layouts, tmp_path)
    datalist = folder / "datalist.json"
    split = ["--val-fraction", "0.34", "--test-fraction", "0.34", "--seed", "0", "--out", str(datalist)]
    assert main(["datalist", "--data-dir", str(folder), *split, "--no-progress"]) == 0
    content = json.loads(datalist.read_text())
    lists = {key: [e["subject_id"] for e in content[key]] for key in ("training", "validation", "testing")}
    # one patient (both of its timepoints) in each list
    assert {key: sorted({patient_of(s) for s in ids}) for key, ids in lists.items()} == {
        key: [ids[0][:-4]] for key, ids in lists.items()
    }
    assert all(len(ids) == 2 for ids in lists.values())
    check_training_inputs(datalist, folder, [16, 16], 8, require_grade=False, progress=False)

    for key in ("validation", "testing"):  # a timepoint moved to training: that patient is no longer held out
        moved = json.loads(datalist.read_text())
        moved["training"].append(moved[key].pop())
        edited = tmp_path / f"moved_{key}.json"
        edited.write_text(json.dumps(moved))
        with pytest.raises(BratsDataError) as error:
            check_training_inputs(edited, folder, [16, 16], 8, require_grade=False, progress=False)
        trained, held_out = sorted(lists[key], reverse=True)
        assert f"({trained} in 'training' and {held_out} in {key!r})" in str(error.value)
        # the advice, followed as given, writes the same split again over the edited file, testing list included
        command = str(error.value).split("Write the datalist again with `")[1].split("`")[0]
        assert command.endswith("--val-fraction 0.34 --test-fraction 0.34 --seed 0 --overwrite")
        assert main([*command.split()[1:], "--no-progress"]) == 0
        assert json.loads(edited.read_text())["testing"] == json.loads(datalist.read_text())["testing"]
        check_training_inputs(edited, folder, [16, 16], 8, require_grade=False, progress=False)
    # a validation timepoint moved to testing: the checkpoint was chosen on its patient
    moved = json.loads(datalist.read_text())
    moved["testing"].append(moved["validation"].pop())
    edited = tmp_path / "moved_to_testing.json"
    edited.write_text(json.dumps(moved))
    with pytest.raises(BratsDataError) as error:
        check_training_inputs(edited, folder, [16, 16], 8, require_grade=False, progress=False)
    first, second = sorted(lists["validation"])
    assert f"({first} in 'validation' and {second} in 'testing')" in str(error.value)
    # the very same subject in training and testing
    copied = json.loads(datalist.read_text())
    copied["testing"].append(copied["training"][0])
    edited.write_text(json.dumps(copied))
    with pytest.raises(BratsDataError) as error:
        check_training_inputs(edited, folder, [16, 16], 8, require_grade=False, progress=False)
    assert f"1 subject(s) in both 'training' and 'testing' ({lists['training'][0]})" in str(error.value)


@pytest.mark.parametrize("layout", ["brats2021", "brats2023"])
def test_datalist_without_grades_refuses_a_fraction_that_holds_out_no_subject(layouts, layout, tmp_path, capsys):
    out = tmp_path / "datalist.json"
    folder = ["--data-dir", str(layouts[layout]), "--out", str(out), "--no-progress"]
    assert main(["datalist", *folder, "--val-fraction", "0.34", "--test-fraction", "0.05"]) == 1
    assert "--test-fraction 0.05 of 3 subjects gives 0 testing subjects" in capsys.readouterr().err
    assert main(["datalist", *folder, "--val-fraction", "0.05"]) == 1
    error = capsys.readouterr().err
    assert "--val-fraction 0.05 of 3 subjects gives 0 validation subjects" in error
    assert "pass --val-fraction from 0.17 to 0.83" in error
    assert not out.exists()
