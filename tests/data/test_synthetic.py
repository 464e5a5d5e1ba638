import csv
import hashlib
import json

import nibabel as nib
import numpy as np
import pytest

from medsegdiff_monai.data import (
    DIFFICULTIES,
    NAME_MAPPING_COLUMNS,
    SyntheticDifficulty,
    brats_affine,
    make_synthetic_subject,
    write_synthetic_brats,
)

SMALL = (48, 48, 32)


def digests(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*.*")}


def region_stats(label):
    tc = np.isin(label, (1, 4)).sum()
    return tc, (label == 4).sum(), (label > 0).any(axis=(0, 1)).mean()


@pytest.mark.parametrize("grade", [0, 1])
@pytest.mark.parametrize("atypical", [False, True])
def test_subject_arrays(grade, atypical):
    subject = make_synthetic_subject(grade, SMALL, seed=5, atypical=atypical)
    assert subject.images.shape == (4, *SMALL) and subject.images.dtype == np.int16
    assert subject.label.shape == SMALL and subject.label.dtype == np.uint8
    assert set(np.unique(subject.label).tolist()) <= {0, 1, 2, 4}
    brain = subject.images[0] > 0
    # skull-stripped: every modality is zero outside the same brain mask, positive inside, and tumour lies in the brain
    assert all(np.array_equal(image > 0, brain) for image in subject.images)
    assert 0.15 < brain.mean() < 0.6
    assert not (subject.label[~brain] > 0).any()
    expected_affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    expected_affine[1, 3] = 47.0  # the BraTS release: x and y flipped, origin at the far y corner
    np.testing.assert_array_equal(subject.affine, expected_affine)


def test_grade_appearance_differs_but_overlaps():
    stats = {(g, a): [region_stats(make_synthetic_subject(g, SMALL, seed=[3, i], atypical=a).label) for i in range(8)]
             for g in (0, 1) for a in (False, True)}  # fmt: skip
    for key, rows in stats.items():
        tc, et, slice_share = np.array(rows, dtype=float).T
        assert (tc > 0).all(), key
        # the tumour is visible in a good share of axial slices even at 48 x 48 x 32
        assert slice_share.min() >= 0.25, key
    et_share = {key: np.mean([et / tc for tc, et, _ in rows]) for key, rows in stats.items()}
    assert et_share[(1, False)] > 0.4 > 0.1 > et_share[(0, False)]  # typical HGG enhance, typical LGG barely
    assert all(et > 0 for _, et, _ in stats[(0, True)])  # atypical LGG enhance
    assert et_share[(1, True)] < et_share[(1, False)] / 2  # atypical HGG enhance little


def test_tissue_contrast():
    subject = make_synthetic_subject(1, SMALL, seed=2)
    t1, t1ce, t2, flair = (image.astype(float) for image in subject.images)
    label = subject.label
    healthy = (subject.images[0] > 0) & (label == 0)
    assert t1ce[label == 4].mean() > 1.3 * t1ce[healthy].mean()  # enhancing tumour bright on T1ce
    assert flair[label == 2].mean() > 1.3 * flair[healthy].mean()  # oedema bright on FLAIR
    assert t2[label == 2].mean() > 1.3 * t2[healthy].mean()
    assert t1ce[label == 1].mean() < t1ce[label == 4].mean() / 2  # necrotic core dark inside the rim


def test_full_size_subject():
    subject = make_synthetic_subject(0, seed=1)
    assert subject.images.shape == (4, 240, 240, 155)
    assert 0.1 < (subject.label > 0).any(axis=(0, 1)).mean() < 0.8


def test_bad_arguments():
    with pytest.raises(ValueError, match="grade"):
        make_synthetic_subject(2, SMALL)
    with pytest.raises(ValueError, match="shape"):
        make_synthetic_subject(1, (8, 8, 8))
    with pytest.raises(ValueError, match="lgg_fraction"):
        write_synthetic_brats("unused", 2, lgg_fraction=1.5)


def test_written_release_is_in_the_real_format(synthetic_brats_dir):
    folders = sorted(p.name for p in synthetic_brats_dir.iterdir() if p.is_dir())
    assert folders == [f"BraTS20_Training_{i:03d}" for i in range(1, 9)]
    for name in folders:
        files = sorted(p.name for p in (synthetic_brats_dir / name).iterdir())
        assert files == sorted(f"{name}_{m}.nii" for m in ("t1", "t1ce", "t2", "flair", "seg"))
        t1 = synthetic_brats_dir / name / f"{name}_t1.nii"
        assert t1.read_bytes()[:4] == (348).to_bytes(4, "little")  # an uncompressed NIfTI-1 header
        image = nib.load(t1)
        assert image.get_data_dtype() == np.int16 and image.shape == SMALL
        np.testing.assert_array_equal(image.affine, brats_affine(SMALL))
        assert image.header.get_zooms() == (1.0, 1.0, 1.0)
        assert nib.load(synthetic_brats_dir / name / f"{name}_seg.nii").get_data_dtype() == np.uint8

    with open(synthetic_brats_dir / "name_mapping.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == NAME_MAPPING_COLUMNS
    assert [r[-1] for r in rows[1:]] == folders
    assert sorted(r[0] for r in rows[1:]) == ["HGG"] * 5 + ["LGG"] * 3  # round(8 * 0.4) = 3 LGG
    assert any(cell == "" for r in rows[1:] for cell in r[1:5]) and any(r[1] for r in rows[1:])


def test_deterministic_from_seed(tmp_path):
    first = write_synthetic_brats(tmp_path / "a", 3, 0.34, (24, 24, 16), seed=4, progress=False)
    second = write_synthetic_brats(tmp_path / "b", 3, 0.34, (24, 24, 16), seed=4, progress=False)
    other = write_synthetic_brats(tmp_path / "c", 3, 0.34, (24, 24, 16), seed=5, progress=False)
    assert len(digests(first)) == 3 * 5 + 2  # and name_mapping.csv, synthetic.json
    assert digests(first) == digests(second)
    assert digests(first) != digests(other)


def test_worker_processes_write_the_same_files(tmp_path):
    serial = write_synthetic_brats(tmp_path / "serial", 5, 0.4, (24, 24, 16), seed=6, progress=False)
    parallel = write_synthetic_brats(tmp_path / "parallel", 5, 0.4, (24, 24, 16), seed=6, progress=False, num_workers=2)
    assert len(digests(serial)) == 5 * 5 + 2
    assert digests(parallel) == digests(serial)
    with pytest.raises(ValueError, match="num_workers"):
        write_synthetic_brats(tmp_path / "bad", 2, num_workers=-1)


def test_refuses_foreign_subject_folders(tmp_path):
    (tmp_path / "BraTS20_Training_099").mkdir()
    with pytest.raises(FileExistsError, match="BraTS20_Training_099"):
        write_synthetic_brats(tmp_path, 2, shape=(24, 24, 16), progress=False)


def test_a_different_set_is_not_written_over_an_existing_one_unless_asked(tmp_path):
    out = tmp_path / "set"
    write_synthetic_brats(out, 3, 0.34, (24, 24, 16), seed=4, progress=False)
    first = digests(out)
    assert json.loads((out / "synthetic.json").read_text())["complete"] is True
    write_synthetic_brats(out, 3, 0.34, (24, 24, 16), seed=4, progress=False)  # the same set: a re-run is fine
    assert digests(out) == first
    for changed in ({"seed": 5}, {"lgg_fraction": 0.67}, {"difficulty": "hard"}):
        with pytest.raises(FileExistsError, match="already holds 3 of these subject folders .* different synthetic"):
            write_synthetic_brats(out, 3, **{"lgg_fraction": 0.34, "seed": 4, **changed}, shape=(24, 24, 16))
        assert digests(out) == first
    write_synthetic_brats(out, 3, 0.34, (24, 24, 16), seed=5, progress=False, overwrite=True)
    assert digests(out) == digests(write_synthetic_brats(tmp_path / "fresh", 3, 0.34, (24, 24, 16), seed=5))


def test_an_interrupted_set_is_completed_by_the_same_command(tmp_path, monkeypatch):
    from medsegdiff_monai.data import synthetic

    out = tmp_path / "set"
    write_subject = synthetic._write_subject

    def interrupted(job):
        if job.index == 3:
            raise KeyboardInterrupt
        return write_subject(job)

    with monkeypatch.context() as patch:
        patch.setattr(synthetic, "_write_subject", interrupted)
        with pytest.raises(KeyboardInterrupt):
            write_synthetic_brats(out, 3, 0.34, (24, 24, 16), seed=4, progress=False)
    assert json.loads((out / "synthetic.json").read_text())["complete"] is False
    with pytest.raises(FileExistsError, match="different synthetic set"):
        write_synthetic_brats(out, 3, 0.34, (24, 24, 16), seed=7, progress=False)
    write_synthetic_brats(out, 3, 0.34, (24, 24, 16), seed=4, progress=False)
    assert digests(out) == digests(write_synthetic_brats(tmp_path / "fresh", 3, 0.34, (24, 24, 16), seed=4))


def test_a_release_not_written_by_synth_is_left_alone(tmp_path):
    (tmp_path / "BraTS20_Training_001").mkdir()
    (tmp_path / "BraTS20_Training_001" / "BraTS20_Training_001_t1.nii").write_bytes(b"real data")
    with pytest.raises(FileExistsError, match="1 of these subject folders .* not written by this command"):
        write_synthetic_brats(tmp_path, 2, shape=(24, 24, 16), progress=False)
    assert (tmp_path / "BraTS20_Training_001" / "BraTS20_Training_001_t1.nii").read_bytes() == b"real data"


def test_synth_cli_refuses_a_different_set_then_overwrites_on_request(tmp_path, capsys):
    from medsegdiff_monai.cli import main

    args = ["synth", "--out", str(tmp_path), "--subjects", "2", "--shape", "24", "24", "16", "--no-progress"]
    assert main(args) == 0
    assert main([*args, "--seed", "1"]) == 1
    assert "pass --overwrite to replace them" in capsys.readouterr().err
    assert main([*args, "--seed", "1", "--overwrite"]) == 0


def hard_and_standard(num_subjects=8):
    """The same seeds (so the same brain anatomy) drawn at both difficulties, grades alternating."""
    return {
        name: [make_synthetic_subject(i % 2, SMALL, seed=[11, i], difficulty=name) for i in range(num_subjects)]
        for name in ("standard", "hard")
    }


def relative_noise(subject):
    """Median |difference of x-neighbours| over the median intensity, in healthy brain: the noise (edges are few)."""
    t1 = subject.images[0].astype(float)
    healthy = (t1 > 0) & (subject.label == 0)
    both = healthy[1:] & healthy[:-1]
    return np.median(np.abs(np.diff(t1, axis=0))[both]) / np.median(t1[healthy])


def contrast_excess(subject, channel, label_value):
    """Mean intensity of a label over the mean of healthy brain, minus 1, in one modality."""
    image = subject.images[channel].astype(float)
    healthy = (image > 0) & (subject.label == 0)
    return image[subject.label == label_value].mean() / image[healthy].mean() - 1.0


def test_hard_preset_is_harder_than_standard():
    from scipy import ndimage  # installed with scikit-learn

    subjects = hard_and_standard()
    # oedema on FLAIR: the hard preset keeps half the tumour contrast and fades the outer oedema
    flair = {name: np.mean([contrast_excess(s, 3, 2) for s in group]) for name, group in subjects.items()}
    assert 0.1 < flair["hard"] < 0.6 * flair["standard"], flair
    # noise about twice as strong
    noise = {name: np.mean([relative_noise(s) for s in group]) for name, group in subjects.items()}
    assert noise["hard"] > 1.5 * noise["standard"], noise
    # multifocal: some hard subjects have more than one tumour component, no standard subject has
    components = {name: [ndimage.label(s.label > 0)[1] for s in group] for name, group in subjects.items()}
    assert components["standard"] == [1] * 8
    assert sum(c > 1 for c in components["hard"]) >= 2, components
    # heterogeneous enhancement: the enhancing tissue's T1ce spreads more than the noise alone explains
    spread = {
        name: np.mean([s.images[1][s.label == 4].std() / s.images[1][s.label == 4].mean() for s in group if s.grade])
        for name, group in subjects.items()
    }
    assert spread["hard"] > 2.5 * spread["standard"], spread
    # the same anatomy and the same label values
    for standard, hard in zip(subjects["standard"], subjects["hard"], strict=True):
        np.testing.assert_array_equal(standard.images[0] > 0, hard.images[0] > 0)
        assert set(np.unique(hard.label).tolist()) <= {0, 1, 2, 4}


def test_difficulty_presets_and_seeds():
    hard = make_synthetic_subject(1, SMALL, seed=3, difficulty="hard")
    again = make_synthetic_subject(1, SMALL, seed=3, difficulty=DIFFICULTIES["hard"])
    other = make_synthetic_subject(1, SMALL, seed=4, difficulty="hard")
    np.testing.assert_array_equal(hard.images, again.images)
    np.testing.assert_array_equal(hard.label, again.label)
    assert not np.array_equal(hard.images, other.images)
    # "standard" is the default data, drawn exactly as without the argument
    default = make_synthetic_subject(1, SMALL, seed=3)
    np.testing.assert_array_equal(
        default.images, make_synthetic_subject(1, SMALL, seed=3, difficulty="standard").images
    )
    np.testing.assert_array_equal(
        default.images, make_synthetic_subject(1, SMALL, seed=3, difficulty=SyntheticDifficulty()).images
    )
    with pytest.raises(ValueError, match="difficulty must be one of"):
        make_synthetic_subject(1, SMALL, difficulty="extreme")


def test_synth_cli_difficulty(tmp_path):
    from medsegdiff_monai.cli import main

    args = ["synth", "--subjects", "2", "--shape", "24", "24", "16", "--seed", "2", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "hard"), "--difficulty", "hard", "--workers", "2"]) == 0
    assert main([*args, "--out", str(tmp_path / "standard")]) == 0
    expected = write_synthetic_brats(tmp_path / "api", 2, 0.2, (24, 24, 16), seed=2, progress=False, difficulty="hard")
    assert digests(tmp_path / "hard") == digests(expected)
    assert digests(tmp_path / "hard") != digests(tmp_path / "standard")
