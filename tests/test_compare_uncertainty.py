"""``benchmarks/compare_uncertainty.py`` scores each run's uncertainty maps against the first run's."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from benchmark_scripts import load_benchmark
from scipy.ndimage import binary_dilation
from sklearn.metrics import roc_auc_score


def _save(path, volume) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(path))


def test_runs_are_scored_against_the_first(tmp_path):
    compare = load_benchmark("compare_uncertainty")
    truth = np.zeros((9, 9, 9), np.uint8)
    truth[3:6, 3:6, 3:6] = 2
    prediction = truth.copy()
    prediction[5, 5, 5] = 0  # one wrong voxel
    _save(tmp_path / "data" / "s1" / "s1_seg.nii", truth)
    for modality in ("t1", "t1ce", "t2", "flair"):  # a subject folder as the data readers expect it
        _save(tmp_path / "data" / "s1" / f"s1_{modality}.nii", np.zeros((9, 9, 9), np.float32))
    rng = np.random.default_rng(0)
    uncertainty = rng.uniform(0, 0.1, truth.shape).astype(np.float32)
    uncertainty[5, 5, 5] = 0.4
    for run, scale in (("base", 1.0), ("half", 0.5)):
        _save(tmp_path / run / "s1_seg.nii.gz", prediction)
        _save(tmp_path / run / "s1_uncertainty.nii.gz", uncertainty * scale)
    rows = compare.main([str(tmp_path / "base"), str(tmp_path / "half"), "--dataset", str(tmp_path / "data")])
    # the whole 9^3 volume lies within 3 voxels of the 3^3 tumour; the one wrong voxel is the most uncertain
    wrong = np.zeros(truth.shape, bool)
    wrong[5, 5, 5] = True
    assert rows[0]["auroc"] == pytest.approx(roc_auc_score(wrong.ravel(), uncertainty.ravel())) == pytest.approx(1.0)
    assert rows[1]["auroc"] == pytest.approx(1.0)  # a scale keeps the ranking
    # mean over the predicted tumour dilated by 3 voxels (a 7^3 cube), by scipy: it leaves out the corner that
    # only the missing voxel was within reach of
    region = binary_dilation(prediction > 0, structure=np.ones((7, 7, 7), bool))
    assert not region.all()
    assert rows[0]["mean_uncertainty"] == pytest.approx(float(uncertainty[region].astype(np.float64).mean()))
    assert rows[1]["ratio_mean"] == pytest.approx(0.5) and rows[1]["ratio_lowest"] == pytest.approx(0.5)


def test_a_folder_without_maps_is_named(tmp_path):
    compare = load_benchmark("compare_uncertainty")
    with pytest.raises(FileNotFoundError, match="holds no"):
        compare.main([str(tmp_path), "--dataset", str(tmp_path)])
