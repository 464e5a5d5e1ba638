import csv
import gzip
import shutil

import nibabel as nib
import numpy as np
import pytest

from medsegdiff_monai.data import BratsDataError, read_brats_folder, read_name_mapping, validate_brats_folder

SUBJECT = "BraTS20_Training_002"


def nifti(folder, suffix, subject=SUBJECT):
    return folder / subject / f"{subject}_{suffix}.nii"


def load(path):
    return np.asarray(nib.load(path, mmap=False).dataobj)


def save_like(path, array, reference_path, affine=None):
    reference = nib.load(reference_path)
    nib.save(nib.Nifti1Image(array, reference.affine if affine is None else affine), path)


def rewrite_csv(folder, edit):
    path = folder / "name_mapping.csv"
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    rows = edit(rows)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def problems_of(folder, **kwargs):
    report = validate_brats_folder(folder, progress=False, **kwargs)
    return report, "\n".join(report.problems)


def test_valid_folder_grades_match_csv(synthetic_brats_dir):
    subjects = read_brats_folder(synthetic_brats_dir, progress=False)
    grades = read_name_mapping(synthetic_brats_dir / "name_mapping.csv")
    assert [s.subject_id for s in subjects] == sorted(grades)
    assert {s.subject_id: s.grade for s in subjects} == grades
    assert sorted(grades.values()) == [0, 0, 0, 1, 1, 1, 1, 1]
    first = subjects[0]
    assert [p.name for p in first.images] == [f"{first.subject_id}_{m}.nii" for m in ("t1", "t1ce", "t2", "flair")]
    assert first.label.name == f"{first.subject_id}_seg.nii"


def test_gzipped_files_and_the_subject_355_label_name(brats_copy):
    for path in (brats_copy / SUBJECT).iterdir():
        with open(path, "rb") as src, gzip.open(f"{path}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        path.unlink()
    quirk = brats_copy / "BraTS20_Training_003"
    nifti(brats_copy, "seg", "BraTS20_Training_003").rename(quirk / "W39_1998.09.19_Segm.nii")
    report, problems = problems_of(brats_copy)
    assert report.ok, problems
    by_id = {s.subject_id: s for s in report.subjects}
    assert all(p.name.endswith(".nii.gz") for p in by_id[SUBJECT].images)
    assert by_id["BraTS20_Training_003"].label.name == "W39_1998.09.19_Segm.nii"
    assert report.notes == ["subject BraTS20_Training_003: using label file W39_1998.09.19_Segm.nii."]


def test_missing_modality(brats_copy):
    nifti(brats_copy, "t1ce").unlink()
    with pytest.raises(BratsDataError, match=rf"subject {SUBJECT}: missing modality 't1ce'.*{SUBJECT}_t1ce.nii"):
        read_brats_folder(brats_copy, progress=False)


def test_missing_label_is_fine_for_inference(brats_copy):
    nifti(brats_copy, "seg").unlink()
    with pytest.raises(BratsDataError, match=rf"subject {SUBJECT}: missing label file"):
        read_brats_folder(brats_copy, progress=False)
    subjects = read_brats_folder(brats_copy, require_label=False, progress=False)
    assert {s.subject_id: s.label for s in subjects}[SUBJECT] is None


def test_several_label_candidates(brats_copy):
    shutil.copy(nifti(brats_copy, "seg"), brats_copy / SUBJECT / "old_Segm.nii.gz")
    with pytest.raises(BratsDataError, match=rf"subject {SUBJECT}: several label candidates.*{SUBJECT}_seg.nii"):
        read_brats_folder(brats_copy, progress=False)


def test_shape_mismatch(brats_copy):
    save_like(nifti(brats_copy, "t2"), np.ones((48, 48, 30), np.int16), nifti(brats_copy, "t1"))
    with pytest.raises(BratsDataError, match=rf"subject {SUBJECT}: modality file .*{SUBJECT}_t2.nii has shape"):
        read_brats_folder(brats_copy, progress=False)


def test_affine_mismatch(brats_copy):
    label = load(nifti(brats_copy, "seg"))
    save_like(nifti(brats_copy, "seg"), label, nifti(brats_copy, "t1"), affine=np.diag([2.0, 2.0, 2.0, 1.0]))
    with pytest.raises(BratsDataError, match=rf"subject {SUBJECT}: label file .*{SUBJECT}_seg.nii has an affine"):
        read_brats_folder(brats_copy, progress=False)


def test_label_values_outside_brats(brats_copy):
    label = load(nifti(brats_copy, "seg"))
    label[label == 4] = 3
    label[0, 0, 0] = 7
    save_like(nifti(brats_copy, "seg"), label, nifti(brats_copy, "seg"))
    with pytest.raises(BratsDataError, match=rf"subject {SUBJECT}: label file .*_seg.nii has values \[3, 7\]"):
        read_brats_folder(brats_copy, progress=False)


def test_non_finite_voxels(brats_copy):
    flair = load(nifti(brats_copy, "flair")).astype(np.float32)
    flair[10, 10, 10] = np.nan
    flair[11, 10, 10] = np.inf
    save_like(nifti(brats_copy, "flair"), flair, nifti(brats_copy, "flair"))
    with pytest.raises(BratsDataError, match=rf"subject {SUBJECT}: file .*_flair.nii has 2 non-finite voxel"):
        read_brats_folder(brats_copy, progress=False)


def test_truncated_and_unreadable_files(brats_copy):
    t1 = nifti(brats_copy, "t1")
    t1.write_bytes(t1.read_bytes()[:5000])
    nifti(brats_copy, "t2", "BraTS20_Training_004").write_bytes(b"not a nifti file")
    report, problems = problems_of(brats_copy)
    image = nib.load(t1)  # a single-file NIfTI-1: the 348-byte header and 4 bytes of extension flags, then the voxels
    expected = 352 + image.get_data_dtype().itemsize * int(np.prod(image.shape))
    truncated = f"subject {SUBJECT}: file {t1} is truncated: 5000 bytes, where its header describes {expected}."
    assert truncated in problems
    assert "subject BraTS20_Training_004: file" in problems and "_t2.nii is not a readable NIfTI" in problems
    # a header-only check sees both: the file's size against its header needs no voxel read
    _, header_problems = problems_of(brats_copy, check_voxels=False)
    assert "_t2.nii is not a readable NIfTI" in header_problems and truncated in header_problems


def test_a_compressed_file_cut_anywhere_is_found_without_reading_its_voxels(brats_copy):
    """A .nii.gz cut by a few bytes decompresses up to where the checks read it; its gzip trailer gives it away."""
    t1 = nifti(brats_copy, "t1")
    image = nib.load(t1)
    gz = t1.with_name(t1.name + ".gz")
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), image.affine, image.header), gz)
    t1.unlink()
    _, intact = problems_of(brats_copy, check_voxels=False)
    assert str(gz) not in intact
    gz.write_bytes(gz.read_bytes()[:-40])
    _, problems = problems_of(brats_copy, check_voxels=False)
    assert f"subject {SUBJECT}: file {gz} is truncated or damaged: its gzip trailer" in problems


def test_unknown_grade(brats_copy):
    rewrite_csv(brats_copy, lambda rows: [rows[0]] + [["GBM", *r[1:]] if r[-1] == SUBJECT else r for r in rows[1:]])
    with pytest.raises(BratsDataError, match=rf"subject {SUBJECT}: unknown Grade 'GBM' in .*name_mapping.csv"):
        read_brats_folder(brats_copy, progress=False)
    subjects = read_brats_folder(brats_copy, skip_unmatched=True, progress=False)
    assert SUBJECT not in {s.subject_id for s in subjects} and len(subjects) == 7


@pytest.mark.parametrize("column", ["BraTS_2020_subject_ID", "Grade"])
def test_csv_without_required_column(brats_copy, column):
    rewrite_csv(brats_copy, lambda rows: [[c for c, h in zip(r, rows[0]) if h != column] for r in rows])
    with pytest.raises(BratsDataError, match=rf"name_mapping.csv has no column {column}"):
        read_brats_folder(brats_copy, progress=False)
    with pytest.raises(ValueError, match=column):
        read_name_mapping(brats_copy / "name_mapping.csv")


def test_folder_without_row_and_row_without_folder(brats_copy):
    rewrite_csv(brats_copy, lambda rows: [r for r in rows if r[-1] != SUBJECT])
    shutil.rmtree(brats_copy / "BraTS20_Training_005")
    report, problems = problems_of(brats_copy)
    assert f"subject {SUBJECT}: folder {brats_copy / SUBJECT} has no row in" in problems
    assert "subject BraTS20_Training_005: listed in" in problems and "but has no folder" in problems
    skipped, _ = problems_of(brats_copy, skip_unmatched=True)
    assert skipped.ok and len(skipped.subjects) == 6 and len(skipped.notes) == 3


def test_missing_csv(brats_copy):
    (brats_copy / "name_mapping.csv").unlink()
    with pytest.raises(BratsDataError, match="name_mapping.csv not found"):
        read_brats_folder(brats_copy, require_grade=True, progress=False)
    with pytest.raises(BratsDataError, match="grades.csv not found"):
        read_brats_folder(brats_copy, csv_path=brats_copy / "grades.csv", progress=False)
    with pytest.raises(FileNotFoundError, match="name_mapping.csv"):
        read_name_mapping(brats_copy / "name_mapping.csv")
    for require_grade in (None, False):
        report = validate_brats_folder(brats_copy, require_grade=require_grade, progress=False)
        assert report.ok and len(report.subjects) == 8 and all(s.grade is None for s in report.subjects)
    assert [n for n in report.notes if "segmentation only" in n] == []  # require_grade=False: no note
    default = validate_brats_folder(brats_copy, progress=False)
    assert [n for n in default.notes if "no grade table" in n and "segmentation only" in n] != []


def test_every_problem_is_listed(brats_copy):
    nifti(brats_copy, "t1").unlink()
    nifti(brats_copy, "flair", "BraTS20_Training_006").write_bytes(b"garbage")
    rewrite_csv(brats_copy, lambda rows: [r for r in rows if r[-1] != "BraTS20_Training_007"])
    report, _ = problems_of(brats_copy)
    assert len(report.problems) == 3
    assert [p.split(":")[0] for p in report.problems] == [
        "subject BraTS20_Training_002",
        "subject BraTS20_Training_006",
        "subject BraTS20_Training_007",
    ]
    assert len(report.subjects) == 5


def test_missing_data_folder(tmp_path):
    with pytest.raises(BratsDataError, match="does not exist"):
        read_brats_folder(tmp_path / "nowhere", progress=False)
