import itertools
import json
import re
from pathlib import Path

import pytest
from monai.data import load_decathlon_datalist

from medsegdiff_monai.data import (
    BratsSubject,
    build_datalist,
    load_brats_datalist,
    patient_of,
    read_brats_folder,
    write_datalist,
)


def test_datalist_entries(synthetic_brats_dir, synthetic_datalist):
    datalist = json.loads(Path(synthetic_datalist).read_text())
    train, val = datalist["training"], datalist["validation"]
    assert (len(train), len(val)) == (6, 2)
    assert sorted(e["grade"] for e in val) == [0, 1]
    assert datalist["class_balance"] == {"n_LGG": 2, "n_HGG": 4, "alpha_LGG": 1.5, "alpha_HGG": 0.75}
    assert "testing" not in datalist and datalist["split"]["test_fraction"] == 0.0
    ids = [e["subject_id"] for e in train + val]
    assert len(set(ids)) == 8
    for entry in train + val:
        sid = entry["subject_id"]
        assert entry["image"] == [f"{sid}/{sid}_{m}.nii" for m in ("t1", "t1ce", "t2", "flair")]
        assert entry["label"] == f"{sid}/{sid}_seg.nii"
        assert all((synthetic_brats_dir / p).is_file() for p in [*entry["image"], entry["label"]])


def test_loading_with_monai_and_with_the_helper(synthetic_brats_dir, synthetic_datalist):
    monai_entries = load_decathlon_datalist(synthetic_datalist, data_list_key="training", base_dir=synthetic_brats_dir)
    assert all(Path(p).is_absolute() and Path(p).is_file() for e in monai_entries for p in [*e["image"], e["label"]])
    entries = load_brats_datalist(synthetic_datalist, "validation", synthetic_brats_dir)
    assert [Path(e["label"]).is_file() for e in entries] == [True, True]
    assert all(e["subject_id"].startswith("BraTS20_Training_") for e in entries)


def test_datalist_without_labels(brats_copy, tmp_path):
    for seg in brats_copy.glob("*/*_seg.nii"):
        seg.unlink()
    subjects = read_brats_folder(brats_copy, require_label=False, progress=False)
    out = write_datalist(build_datalist(subjects, brats_copy, val_fraction=0.25), tmp_path / "deep" / "list.json")
    entries = json.loads(out.read_text())["training"]
    assert all("label" not in e and e["grade"] in (0, 1) for e in entries)
    assert sorted(p.name for p in out.parent.iterdir()) == ["list.json"]  # no partial file left behind


def test_datalist_with_a_held_out_test_split(synthetic_brats_dir):
    subjects = read_brats_folder(synthetic_brats_dir, progress=False)  # 3 LGG, 5 HGG
    datalist = build_datalist(subjects, synthetic_brats_dir, val_fraction=0.25, seed=0, test_fraction=0.25)
    ids = {key: [e["subject_id"] for e in datalist[key]] for key in ("training", "validation", "testing")}
    # per grade round(3 * 0.25) = 1 LGG and round(5 * 0.25) = 1 HGG in each held-out split
    assert [sorted(e["grade"] for e in datalist[key]) for key in ("validation", "testing")] == [[0, 1], [0, 1]]
    assert len(ids["training"]) == 4 and len(set(sum(ids.values(), []))) == 8
    # the class balance comes from the training split alone: 1 LGG, 3 HGG
    assert datalist["class_balance"] == {"n_LGG": 1, "n_HGG": 3, "alpha_LGG": 2.0, "alpha_HGG": 4 / 6}
    assert datalist["split"]["test_fraction"] == 0.25


def test_a_list_the_datalist_lacks_is_named_with_the_ones_it_has(synthetic_datalist):
    with pytest.raises(KeyError, match=r"has no list 'testing'; its lists: \['training', 'validation'\]"):
        load_brats_datalist(synthetic_datalist, "testing")


def _brats2023_subjects(ids: list[str], root: Path) -> list[BratsSubject]:
    """Subjects without grades under BraTS 2023 names (the files need not exist to build a datalist)."""
    return [
        BratsSubject(
            sid, tuple(root / sid / f"{sid}-{m}.nii.gz" for m in ("t1n", "t1c", "t2w", "t2f")), release="brats2023"
        )
        for sid in ids
    ]


@pytest.mark.parametrize("seed", range(5))
def test_a_datalist_without_grades_keeps_the_timepoints_of_a_patient_in_one_list(seed, tmp_path):
    # 10 patients, the even ones seen at three timepoints: 20 subjects
    ids = [f"BraTS-GLI-{p:05d}-{t:03d}" for p in range(10) for t in range(3 if p % 2 == 0 else 1)]
    datalist = build_datalist(
        _brats2023_subjects(ids, tmp_path), tmp_path, val_fraction=0.2, seed=seed, test_fraction=0.2
    )
    lists = [[e["subject_id"] for e in datalist[key]] for key in ("training", "validation", "testing")]
    assert sorted(sum(lists, [])) == sorted(ids)
    patients = [{patient_of(s) for s in part} for part in lists]
    assert all(a.isdisjoint(b) for a, b in itertools.combinations(patients, 2))
    assert [len(p) for p in patients] == [6, 2, 2]  # round(10 * 0.2) = 2 patients in each held-out list


@pytest.mark.parametrize(
    ("val_fraction", "test_fraction", "message"),
    [
        (0.34, 0.05, "--test-fraction 0.05 of 6 subjects gives 0 testing subjects (round(6 * 0.05) = 0); pass "
         "--test-fraction from 0.09 to 0.58, or 0 for no testing list."),
        (0.05, 0.0, "--val-fraction 0.05 of 6 subjects gives 0 validation subjects (round(6 * 0.05) = 0); pass "
         "--val-fraction from 0.09 to 0.91."),
    ],
)  # fmt: skip
def test_a_datalist_without_grades_refuses_a_fraction_that_holds_out_no_patient(
    val_fraction, test_fraction, message, tmp_path
):
    subjects = _brats2023_subjects([f"BraTS-GLI-{p:05d}-000" for p in range(6)], tmp_path)
    with pytest.raises(ValueError, match=re.escape(message)):
        build_datalist(subjects, tmp_path, val_fraction=val_fraction, seed=0, test_fraction=test_fraction)


def test_a_missing_datalist_names_the_command_that_writes_it(tmp_path):
    """Beside its data root the command names that root; away from it (a datalist given with --input), which data it
    lists is not known, so the command leaves the folder to the user and says that --dataset_dir must name it too."""
    from medsegdiff_monai.data.preflight import read_datalist_json

    beside = tmp_path / "data" / "datalist.json"
    with pytest.raises(FileNotFoundError, match=re.escape(f"--data-dir {beside.parent} --out {beside}`.")):
        read_datalist_json(beside, beside.parent)
    away = tmp_path / "lists" / "mine.json"
    with pytest.raises(FileNotFoundError) as error:
        read_datalist_json(away, tmp_path / "data")
    assert f"`medsegdiff-monai datalist --data-dir <BraTS folder> --out {away}`" in str(error.value)
    assert f"relative to dataset_dir {tmp_path / 'data'}: pass --dataset_dir <BraTS folder> too" in str(error.value)
