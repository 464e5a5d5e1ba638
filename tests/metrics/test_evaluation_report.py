from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medsegdiff_monai.metrics import (
    bootstrap_interval,
    evaluate_subjects,
    expected_calibration_error,
    format_table,
    write_evaluation,
)


def _label_file(tmp_path, name: str, labels: np.ndarray, zooms=(1.0, 1.0, 1.0)):
    image = nib.Nifti1Image(labels.astype(np.uint8), np.diag([*zooms, 1.0]))
    path = tmp_path / f"{name}.nii"
    nib.save(image, str(path))
    return path


def _labels() -> np.ndarray:
    labels = np.zeros((12, 12, 8), dtype=np.uint8)
    labels[2:10, 2:10, 2:6] = 2  # oedema
    labels[4:8, 4:8, 3:5] = 1  # core
    labels[5:7, 5:7, 3:5] = 4  # enhancing
    return labels


def test_perfect_and_partial_predictions(tmp_path):
    truth = _labels()
    partial = truth.copy()
    partial[partial == 4] = 1  # ET missed: TC and WT unchanged
    predictions = [
        {
            "subject_id": "s1",
            "pred_labels": truth,
            "label_file": _label_file(tmp_path, "s1", truth),
            "p_hgg": 0.9,
            "grade": 1,
        },
        {
            "subject_id": "s2",
            "pred_labels": partial,
            "label_file": _label_file(tmp_path, "s2", truth),
            "p_hgg": 0.2,
            "grade": 0,
        },
    ]
    result = evaluate_subjects(predictions)
    perfect, missed = result.rows
    assert [perfect[f"dice_{r}"] for r in ("TC", "WT", "ET", "mean")] == [1.0] * 4
    assert [perfect[f"hd95_{r}"] for r in ("TC", "WT", "ET", "mean")] == [0.0] * 4
    assert missed["dice_TC"] == 1.0 and missed["dice_WT"] == 1.0 and missed["dice_ET"] == 0.0
    assert missed["hd95_ET"] == 373.13
    # ci95 by hand: resampled means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4
    assert result.summary["dice_ET"] == {"mean": 0.5, "std": 0.5, "ci95": [0.0, 1.0]}
    # HD95 ET is 0 and 373.13: the same three resampled means, scaled
    hd95_et = result.summary["hd95_ET"]
    assert hd95_et["mean"] == pytest.approx(186.565) and hd95_et["ci95"] == pytest.approx([0.0, 373.13])
    assert result.summary["grade"]["auc"] == 1.0 and result.summary["grade"]["accuracy"] == 1.0
    table = format_table(result)
    assert "s1" in table and "mean" in table and "auc=1.000" in table
    # one subject per bin at p 0.2 and 0.9: E|y - p| = 2 p (1 - p) each, 0.32 and 0.18, mean 0.25
    assert result.summary["grade"]["ece_if_calibrated"] == pytest.approx(0.25)
    assert "ece_if_calibrated=0.250" in table

    csv_path, json_path = write_evaluation(result, tmp_path / "report")
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [r["subject_id"] for r in rows] == ["s1", "s2"] and float(rows[1]["dice_ET"]) == 0.0
    summary = json.loads(json_path.read_text())
    assert summary["num_subjects"] == 2 and summary["grade"]["confusion_matrix"] == [[1, 0], [0, 1]]
    assert summary["grade"]["brier"] == pytest.approx((0.1**2 + 0.2**2) / 2)
    assert summary["grade"]["reliability"]["count"] == [0, 0, 1, 0, 0, 0, 0, 0, 0, 1]
    assert (tmp_path / "report" / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grade_intervals_match_a_bootstrap_of_sklearn_figures(tmp_path):
    rng = np.random.default_rng(4)
    truth = _labels()
    label_file = _label_file(tmp_path, "s", truth)
    grade = np.array([0, 1] * 6)
    p_hgg = np.clip(grade * 0.4 + rng.uniform(0.05, 0.6, grade.size), 0, 1)
    predictions = [
        {"subject_id": f"s{i}", "pred_labels": truth, "label_file": label_file, "p_hgg": p, "grade": g}
        for i, (p, g) in enumerate(zip(p_hgg, grade))
    ]
    summary = evaluate_subjects(predictions, include_hd95=False, bootstrap_resamples=300, seed=7).summary

    def sklearn_auc(p, y):
        return roc_auc_score(y, p) if np.unique(y).size == 2 else math.nan

    expected = bootstrap_interval(sklearn_auc, p_hgg, grade, num_resamples=300, seed=7)
    assert summary["grade"]["auc_ci95"] == pytest.approx(list(expected))
    assert summary["grade"]["auc"] == pytest.approx(roc_auc_score(grade, p_hgg))
    ece = bootstrap_interval(expected_calibration_error, p_hgg, grade, num_resamples=300, seed=7)
    assert summary["grade"]["ece_ci95"] == pytest.approx(list(ece))
    assert summary["grade"]["brier_ci95"][0] < summary["grade"]["brier"] < summary["grade"]["brier_ci95"][1]
    simulated = np.mean(
        [expected_calibration_error(p_hgg, y) for y in np.random.default_rng(1).random((4000, len(p_hgg))) < p_hgg]
    )
    assert summary["grade"]["ece_if_calibrated"] == pytest.approx(simulated, abs=0.01)
    assert summary["bootstrap"]["num_resamples"] == 300 and summary["dice_mean"]["ci95"] == [1.0, 1.0]


def test_one_grade_only_is_nan_in_json(tmp_path):
    truth = _labels()
    prediction = {
        "subject_id": "s",
        "pred_labels": truth,
        "label_file": _label_file(tmp_path, "s", truth),
        "p_hgg": 0.7,
        "grade": 1,
    }
    with pytest.warns(UserWarning, match="AUC is NaN"):
        result = evaluate_subjects([prediction], include_hd95=False)
    assert "hd95_mean" not in result.rows[0]
    _, json_path = write_evaluation(result, tmp_path)
    assert json.loads(json_path.read_text())["grade"]["auc"] is None  # strict JSON: NaN -> null


def test_hd95_uses_the_label_voxel_size(tmp_path):
    truth = np.zeros((10, 10, 10), dtype=np.uint8)
    truth[2, 2, 2] = 2
    pred = np.zeros_like(truth)
    pred[2, 2, 5] = 2
    label_file = _label_file(tmp_path, "s", truth, zooms=(1.0, 1.0, 2.5))
    pred_file = _label_file(tmp_path, "s_pred", pred, zooms=(1.0, 1.0, 2.5))  # a written prediction, read from disk
    row = evaluate_subjects([{"subject_id": "s", "pred_file": pred_file, "label_file": label_file}]).rows[0]
    assert row["hd95_WT"] == pytest.approx(7.5)


def test_a_prediction_file_in_another_orientation_is_scored_on_the_label_grid(tmp_path):
    """The label saved LPS (as the BraTS releases are); the same labels saved RAS by another tool score Dice 1, and a
    prediction shifted off the label's grid is refused, naming both files."""
    truth = _labels()
    truth[0, 1, 0] = 2  # off the symmetric box, so that a flip shows
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps[:3, 3] = [11.0, 11.0, 0.0]
    label_file = tmp_path / "s_seg.nii"
    nib.save(nib.Nifti1Image(truth, lps), str(label_file))
    ras = nib.as_closest_canonical(nib.load(str(label_file)))
    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S") and not np.array_equal(np.asarray(ras.dataobj), truth)
    pred_file = tmp_path / "s_pred.nii"
    nib.save(ras, str(pred_file))
    row = evaluate_subjects([{"subject_id": "s", "pred_file": pred_file, "label_file": label_file}]).rows[0]
    assert row["dice_TC"] == row["dice_WT"] == row["dice_ET"] == 1.0
    shifted = lps.copy()
    shifted[0, 3] += 3.0
    nib.save(nib.Nifti1Image(truth, shifted), str(pred_file))
    with pytest.raises(ValueError, match=r"prediction .*s_pred\.nii .* does not lie on the voxel grid of its label"):
        evaluate_subjects([{"subject_id": "s", "pred_file": pred_file, "label_file": label_file}])


def test_a_subject_without_a_grade_estimate_is_left_out_of_the_grade_metrics(tmp_path):
    """p_hgg is NaN for a volume without a brain slice: the other subjects are still graded, the subject named."""
    label_file = _label_file(tmp_path, "s", _labels())
    subjects = [
        {"subject_id": f"s{i}", "pred_labels": _labels(), "label_file": label_file, "p_hgg": p, "grade": grade}
        for i, (p, grade) in enumerate([(0.2, 0), (float("nan"), 1), (0.9, 1), (0.4, 1)])
    ]
    with pytest.warns(UserWarning, match=r"p_hgg is NaN for 1 subject\(s\) \(s1\)"):
        summary = evaluate_subjects(subjects, include_hd95=False, bootstrap_resamples=0).summary
    assert summary["grade_excluded_subjects"] == ["s1"]
    assert summary["grade"]["auc"] == pytest.approx(roc_auc_score([0, 1, 1], [0.2, 0.9, 0.4]))


def test_grade_names_subjects_without_a_grade_and_a_skipped_grade_are_reported(tmp_path):
    """ "LGG" / "HGG" read as 0 / 1 (as the training transforms read them); a subject without a true grade among
    graded ones is named and left out; with no grade at all the summary says why the grade is not scored."""
    label_file = _label_file(tmp_path, "s", _labels())
    subjects = [
        {"subject_id": f"s{i}", "pred_labels": _labels(), "label_file": label_file, "p_hgg": p, "grade": grade}
        for i, (p, grade) in enumerate([(0.2, "LGG"), (0.7, None), (0.9, "HGG"), (0.4, 1), (0.3, "lgg")])
    ]
    with pytest.warns(UserWarning, match=r"no true grade for 1 subject\(s\) \(s1\)"):
        result = evaluate_subjects(subjects, include_hd95=False, bootstrap_resamples=0)
    assert [row["grade"] for row in result.rows] == [0, None, 1, 1, 0]
    assert result.summary["grade_excluded_subjects"] == ["s1"]
    assert result.summary["grade"]["auc"] == pytest.approx(roc_auc_score([0, 1, 1, 0], [0.2, 0.9, 0.4, 0.3]))
    with pytest.raises(ValueError, match=r"subject s0: grade 'G4' is not valid"):
        evaluate_subjects([{**subjects[0], "grade": "G4"}], include_hd95=False, bootstrap_resamples=0)
    ungraded = [{**subject, "grade": None} for subject in subjects]
    with pytest.warns(UserWarning, match="grade metrics skipped"):
        result = evaluate_subjects(ungraded, include_hd95=False, bootstrap_resamples=0)
    assert result.summary["grade"] is None and "no subject has both" in result.summary["grade_skipped"]
    assert "grade_excluded_subjects" not in result.summary
    write_evaluation(result, tmp_path / "report")
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["grade"] is None


def test_shape_mismatch(tmp_path):
    truth = _labels()
    with pytest.raises(ValueError, match="subject s: prediction shape"):
        label_file = _label_file(tmp_path, "s", truth)
        evaluate_subjects([{"subject_id": "s", "pred_labels": truth[:5], "label_file": label_file}])


def test_brats2023_label_maps_score_like_brats2020(tmp_path):
    truth = np.pad(_labels(), ((0, 10), (0, 0), (0, 0)))
    pred = truth.copy()
    pred[5:7, 5:7, 3] = 1  # half of ET missed
    pred[21, 0, 0] = 2  # a stray oedema voxel far from the tumour: one false-positive WT lesion
    as_2023 = {name: np.where(a == 4, 3, a) for name, a in (("truth", truth), ("pred", pred))}
    rows = [
        evaluate_subjects(
            [{"subject_id": "s", "pred_labels": p, "label_file": _label_file(tmp_path, name, t)}], include_hd95=True
        ).rows[0]
        for name, (p, t) in {"2020": (pred, truth), "2023": (as_2023["pred"], as_2023["truth"])}.items()
    ]
    assert rows[0] == rows[1]
    assert rows[1]["dice_ET"] == pytest.approx(2 * 4 / (4 + 8))  # ET = label 3 is not lost
    # WT: the lesion is exact (Dice 1, HD95 0) and the stray voxel is a false positive (0, 374)
    assert rows[1]["lesion_fp_WT"] == 1 and rows[1]["lesion_dice_WT"] == 0.5 and rows[1]["lesion_hd95_WT"] == 187.0
    # a prediction in the other release's convention (a forced --label_convention) is scored by its regions
    crossed = evaluate_subjects(
        [{"subject_id": "s", "pred_labels": as_2023["pred"], "label_file": tmp_path / "2020.nii"}], include_hd95=True
    ).rows[0]
    assert crossed == rows[0]


def test_region_maps_that_cannot_be_scored_are_named(tmp_path):
    """QU-BraTS inputs are checked before any subject is scored, and a map off the 0-100 scale names its file."""
    truth = _labels()
    label_file = _label_file(tmp_path, "s", truth)
    maps = {region: _label_file(tmp_path, f"unc_{region}", np.zeros_like(truth)) for region in ("TC", "WT", "ET")}
    subject = {"subject_id": "s", "pred_labels": truth, "label_file": label_file, "uncertainty_files": maps}
    with pytest.raises(ValueError, match="subject s: uncertainty_files needs .* got no brain_file"):
        evaluate_subjects([subject], include_hd95=False, bootstrap_resamples=0)
    without_et = {**subject, "brain_file": label_file, "uncertainty_files": {r: maps[r] for r in ("TC", "WT")}}
    with pytest.raises(ValueError, match="got no map of ET"):
        evaluate_subjects([without_et], include_hd95=False, bootstrap_resamples=0)
    maps["ET"] = _label_file(tmp_path, "unc_ET_255", np.full_like(truth, 255))
    with pytest.raises(ValueError, match=r"subject s: ET map .*unc_ET_255\.nii: uncertainty values must lie in"):
        evaluate_subjects([{**subject, "brain_file": label_file}], include_hd95=False, bootstrap_resamples=0)
    maps["ET"] = _label_file(tmp_path, "unc_ET_moved", np.zeros_like(truth), zooms=(2.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"subject s: ET map .*unc_ET_moved\.nii: .*does not lie on the voxel grid"):
        evaluate_subjects([{**subject, "brain_file": label_file}], include_hd95=False, bootstrap_resamples=0)
    with pytest.raises(ValueError, match=r"subject s: brain_file .*absent\.nii"):
        evaluate_subjects(
            [{**subject, "brain_file": tmp_path / "absent.nii"}], include_hd95=False, bootstrap_resamples=0
        )
    maps["ET"] = _label_file(tmp_path, "unc_ET", np.zeros_like(truth))
    row = evaluate_subjects([{**subject, "brain_file": label_file}], include_hd95=False, bootstrap_resamples=0).rows[0]
    assert row["qu_score_WT"] == pytest.approx((row["dice_WT"] + 2) / 3)  # a map of zeros filters nothing
