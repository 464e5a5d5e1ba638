import numpy as np
import pytest
import torch

from medsegdiff_monai.transforms import AttachGraded, LoadGradeFromCSVd, SubjectIdd, subject_id_from_path


@pytest.mark.parametrize(
    "value, expected",
    [(0, 0), (1, 1), ("LGG", 0), (" HGG ", 1), ("1", 1), (True, 1), (np.int64(0), 0), (torch.tensor([1]), 1)],
)
def test_attach_grade(value, expected):
    grade = AttachGraded()({"grade": value, "subject_id": "s"})["grade"]
    assert grade.dtype == torch.long and grade.shape == () and int(grade) == expected


@pytest.mark.parametrize("value", [2, -1, 0.5, "GBM", None, [0, 1]])
def test_attach_grade_rejects(value):
    with pytest.raises(ValueError, match="subject BraTS20_Training_009: grade"):
        AttachGraded()({"grade": value, "subject_id": "BraTS20_Training_009"})


def test_attach_grade_optional():
    assert AttachGraded(allow_missing_keys=True)({"image": 1}) == {"image": 1}
    with pytest.raises(KeyError):
        AttachGraded()({"image": 1})


def test_grade_from_csv(synthetic_brats_dir, synthetic_datalist):
    from medsegdiff_monai.data import load_brats_datalist

    entries = load_brats_datalist(synthetic_datalist, "training", synthetic_brats_dir)
    lookup = LoadGradeFromCSVd(csv_path=synthetic_brats_dir / "name_mapping.csv")
    for entry in entries:
        paths_only = lookup({"image": entry["image"]})
        assert int(paths_only["grade"]) == entry["grade"] and paths_only["subject_id"] == entry["subject_id"]
        assert int(lookup({"image": "x.nii", "subject_id": entry["subject_id"]})["grade"]) == entry["grade"]
    with pytest.raises(ValueError, match=r"subject BraTS20_Training_123: no row in grade table .*name_mapping.csv"):
        lookup({"image": ["/d/BraTS20_Training_123/BraTS20_Training_123_t1.nii"]})


def test_subject_ids():
    assert subject_id_from_path("/d/BraTS20_Training_001/BraTS20_Training_001_t1ce.nii.gz") == "BraTS20_Training_001"
    assert subject_id_from_path("/in/case7_flair.nii") == "case7"
    # BraTS 2023+ names: four files of two subjects in one folder keep their own ids
    assert subject_id_from_path("/flat/BraTS-GLI-00001-000-t1n.nii.gz") == "BraTS-GLI-00001-000"
    assert subject_id_from_path("/flat/BraTS-GLI-00002-000-t2f.nii.gz") == "BraTS-GLI-00002-000"
    assert subject_id_from_path("/flat/BraTS-GLI-00002-000-seg.nii.gz") == "BraTS-GLI-00002-000"
    assert subject_id_from_path("/d/BraTS20_Training_355/W39_1998.09.19_Segm.nii") == "BraTS20_Training_355"
    clean = SubjectIdd()
    # load_decathlon_datalist turns a subject id that names an existing folder into that folder's path
    assert clean({"subject_id": "/data/BraTS20_Training_004"})["subject_id"] == "BraTS20_Training_004"
    assert clean({"image": ["/d/BraTS20_Training_005/BraTS20_Training_005_t1.nii"]})["subject_id"] == (
        "BraTS20_Training_005"
    )
