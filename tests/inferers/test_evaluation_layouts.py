"""Inference and evaluation on BraTS 2020 folders (grades from name_mapping.csv) and BraTS 2023 folders (ET = 3)."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from medsegdiff_monai.data import MODALITIES, BratsDataError, write_synthetic_brats
from medsegdiff_monai.inferers import DiffusionSampler
from medsegdiff_monai.workflows import (
    BratsVolumeInferer,
    check_inference_inputs,
    check_output_folder,
    collect_inference_inputs,
    run_evaluation,
)

SHAPE = (32, 32, 16)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_layouts")
    return {
        layout: write_synthetic_brats(
            root / layout, num_subjects=2, lgg_fraction=0.5, shape=SHAPE, seed=1, progress=False, layout=layout
        )
        for layout in ("brats2020", "brats2023")
    }


def test_folder_inputs_take_grades_from_name_mapping(folders):
    entries = collect_inference_inputs(folders["brats2020"])
    rows = (folders["brats2020"] / "name_mapping.csv").read_text().splitlines()[1:]
    expected = {row.split(",")[-1]: {"LGG": 0, "HGG": 1}[row.split(",")[0]] for row in rows}
    assert {e["subject_id"]: e["grade"] for e in entries} == expected and sorted(expected.values()) == [0, 1]
    assert all("grade" not in e for e in collect_inference_inputs(folders["brats2023"]))


def test_mixed_layout_folder_is_refused(folders, tmp_path):
    mixed = shutil.copytree(folders["brats2023"], tmp_path / "mixed")
    shutil.copytree(folders["brats2020"] / "BraTS20_Training_001", mixed / "BraTS20_Training_001")
    with pytest.raises(BratsDataError, match=r"mixes BraTS layouts"):
        collect_inference_inputs(mixed)


@pytest.mark.parametrize(
    "layout, suffixes, names, extension",
    [
        ("brats2023", ("t1n", "t1c", "t2w", "t2f"), ("t1n", "t1c", "t2w", "t2f"), ".nii.gz"),  # BraTS 2023 tools
        ("brats2020", ("t1", "t1ce", "t2", "flair"), ("T1", "T1CE", "T2", "FLAIR"), ".nii"),
    ],
)
def test_a_case_folder_of_bare_file_names_is_one_subject(folders, tmp_path, layout, suffixes, names, extension):
    """A folder holding one subject's files named as the modality alone is that subject, the folder's name its id,
    the files in modality order; in a release's subject folders such names stay refused, naming where they are
    read; and an output folder beside the case folder is accepted (bare names do not make the parent a release)."""
    subject = sorted(p for p in folders[layout].iterdir() if p.is_dir())[0]
    separator = "-" if layout == "brats2023" else "_"
    case = tmp_path / "cases" / "case01"
    case.mkdir(parents=True)
    for suffix, name in zip((*suffixes, "seg"), (*names, "seg")):
        shutil.copy(subject / f"{subject.name}{separator}{suffix}{extension}", case / f"{name}{extension}")
    (entry,) = collect_inference_inputs(case)
    assert entry == {
        "image": [str(case / f"{name}{extension}") for name in names],
        "subject_id": "case01",
        "label": str(case / f"seg{extension}"),
    }
    check_inference_inputs([entry])
    check_output_folder(tmp_path / "cases" / "out", case, entries=[entry])
    with pytest.raises(ValueError, match="lies inside the input folder"):
        check_output_folder(case / "out", case, entries=[entry])
    with pytest.raises(BratsDataError, match=r"named as the modality alone, which is read only when the four files"):
        collect_inference_inputs(case.parent)
    # beside one file named with the subject id, the case's bare-named files are read too: the same modality
    # named both ways is named as such, not said to be read elsewhere
    named = case / f"{subject.name}{separator}{suffixes[1]}{extension}"
    shutil.move(case / f"{names[1]}{extension}", named)
    assert collect_inference_inputs(case)[0]["image"] == [
        str(named if i == 1 else case / f"{name}{extension}") for i, name in enumerate(names)
    ]
    shutil.copy(named, case / f"{names[1]}{extension}")
    with pytest.raises(BratsDataError, match=rf"several files for modality '{MODALITIES[1]}'") as error:
        collect_inference_inputs(case)
    assert "read only when" not in str(error.value)
    named.unlink()
    # a folder of NIfTI files inside the case (earlier outputs, a mask) does not make the case a release
    (case / "masks").mkdir()
    shutil.copy(case / f"seg{extension}", case / "masks" / f"brain{extension}")
    assert collect_inference_inputs(case) == [entry]
    # four bare-named files beside a release's subject folders (an atlas) leave the release a release
    release = tmp_path / "release"
    shutil.copytree(folders[layout], release)
    for name in names:
        shutil.copy(case / f"{name}{extension}", release / f"{name}{extension}")
    subjects = sorted(p.name for p in folders[layout].iterdir() if p.is_dir())
    assert [e["subject_id"] for e in collect_inference_inputs(release)] == subjects
    # ... also where its subject folders lost their files: those are named, the atlas is not read as a subject
    for subject_dir in (release / name for name in subjects):
        shutil.rmtree(subject_dir)
        subject_dir.mkdir()
    with pytest.raises(BratsDataError, match=rf"subject {subjects[0]}: missing modality"):
        collect_inference_inputs(release)


def test_brats2023_evaluation_writes_and_scores_label_3(brain_oracle, folders, tmp_path):
    inferer = BratsVolumeInferer(brain_oracle(), DiffusionSampler(2, ensemble_size=1), (32, 32), progress=False)
    result = run_evaluation(inferer, folders["brats2023"], tmp_path / "eval", print_table=False)
    for row in result.rows:
        folder = folders["brats2023"] / row["subject_id"]
        written = np.asarray(nib.load(tmp_path / "eval" / f"{row['subject_id']}_seg.nii.gz").dataobj)
        assert set(np.unique(written)) <= {0, 3}  # the oracle calls every brain voxel enhancing tumour
        truth = np.asarray(nib.load(folder / f"{row['subject_id']}-seg.nii.gz").dataobj)
        et = truth == 3
        assert et.any() and row["dice_ET"] == pytest.approx(
            2 * (et & (written == 3)).sum() / (et.sum() + (written == 3).sum())
        )
        if et.sum() <= 50:  # a lesion of at most 50 mm^3 is not scored, and the prediction touching it is no FP
            assert row["lesion_dice_ET"] == 1.0 and row["lesion_fp_ET"] == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["grade"] is None and summary["dice_ET"]["ci95"][0] <= summary["dice_ET"]["mean"]


def test_brats2020_folder_evaluation_scores_the_grade(brain_oracle, folders, tmp_path):
    inferer = BratsVolumeInferer(brain_oracle(hgg_logit=1.0), DiffusionSampler(2, ensemble_size=1), (32, 32))
    inferer.progress = False
    result = run_evaluation(inferer, folders["brats2020"], tmp_path / "eval", include_hd95=False, print_table=False)
    assert sorted(row["grade"] for row in result.rows) == [0, 1]
    assert result.summary["grade"]["brier"] == pytest.approx(
        ((1 / (1 + np.exp(-1))) ** 2 + (1 / (1 + np.exp(1))) ** 2) / 2
    )
    assert (tmp_path / "eval" / "reliability.png").is_file()


@pytest.mark.parametrize(
    "names, label_convention, enhancing",
    [
        (("t1n", "t1c", "t2w", "t2f"), "auto", 3),  # bare BraTS 2023+ names, as a user renames them
        (("t1", "t1ce", "t2", "flair"), "auto", 4),
        (("t1", "t1ce", "t2", "flair"), "brats2023", 3),
        (("t1n", "t1c", "t2w", "t2f"), "brats2020", 4),
    ],
)
def test_the_label_convention_of_bare_names_and_on_request(
    brain_oracle, folders, tmp_path, names, label_convention, enhancing
):
    subject = sorted(p for p in folders["brats2023"].iterdir() if p.is_dir())[0]
    suffixes = ("t1n", "t1c", "t2w", "t2f")
    (tmp_path / "case").mkdir()
    files = [
        shutil.copy(subject / f"{subject.name}-{suffix}.nii.gz", tmp_path / "case" / f"{name}.nii.gz")
        for suffix, name in zip(suffixes, names)
    ]
    inferer = BratsVolumeInferer(
        brain_oracle(),
        DiffusionSampler(2, ensemble_size=1),
        (32, 32),
        progress=False,
        label_convention=label_convention,
    )
    (output,) = inferer.run(files, tmp_path / "out")  # beside the subject's folder, which holds no release
    written = np.asarray(nib.load(output.files["seg"]).dataobj)
    assert set(np.unique(written)) == {0, enhancing}  # the oracle calls every brain voxel enhancing tumour


def test_an_unknown_label_convention_is_named(brain_oracle):
    """A release year (``brats2021``) is refused with the releases whose labels each convention is."""
    with pytest.raises(ValueError) as raised:
        BratsVolumeInferer(brain_oracle(), DiffusionSampler(2, ensemble_size=1), (32, 32), label_convention="brats2021")
    assert str(raised.value) == (
        "label_convention must be 'auto', 'brats2020' or 'brats2023', got 'brats2021': 'brats2020' is the label "
        "convention of BraTS 2018-2022 (ET = 4), 'brats2023' is the label convention of BraTS 2023+ (ET = 3); 'auto' "
        "follows each subject's T1 file name."
    )
