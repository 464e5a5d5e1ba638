from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsegdiff_monai.data import load_brats_datalist
from medsegdiff_monai.inferers import DiffusionSampler
from medsegdiff_monai.workflows import BratsVolumeInferer, run_evaluation
from medsegdiff_monai.workflows import evaluation as evaluation_workflow


def test_evaluation_of_the_brain_oracle(brain_oracle, synthetic_datalist, tmp_path, capsys):
    inferer = BratsVolumeInferer(brain_oracle(hgg_logit=0.5), DiffusionSampler(2, ensemble_size=1), (64, 64))
    inferer.progress = False
    given = {"input": synthetic_datalist, "datalist_key": "training", "in_sample": True}
    result = run_evaluation(
        inferer, synthetic_datalist, tmp_path / "eval", datalist_key="training", num_eval_cases=3, provenance=given
    )
    entries = load_brats_datalist(synthetic_datalist, "training")[:3]
    assert [row["subject_id"] for row in result.rows] == [e["subject_id"] for e in entries]
    for row, entry in zip(result.rows, entries):
        truth = np.asarray(nib.load(entry["label"]).dataobj) > 0
        brain = np.stack([np.asarray(nib.load(p).dataobj) for p in entry["image"]]).any(axis=0)
        assert row["dice_WT"] == pytest.approx(2 * (truth & brain).sum() / (truth.sum() + brain.sum()), rel=1e-5)
        assert row["grade"] == entry["grade"]
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["num_subjects"] == 3
    assert summary["provenance"] == {
        "input": str(synthetic_datalist),
        "datalist_key": "training",
        "in_sample": True,
        "sampler": {"scheduler": "ddim", "num_inference_steps": 2, "ensemble_size": 1, "eta": 0.0, "seed": 0},
    }  # the oracle has no grade calibration
    assert summary["grade"]["confusion_matrix"][0][0] == 0  # p_hgg = 0.62 for all: every subject called HGG
    assert (tmp_path / "eval" / "metrics_per_subject.csv").read_text().count("\n") == 4
    assert (tmp_path / "eval" / "grades.csv").is_file()
    assert "dice_WT" in capsys.readouterr().out


def test_evaluation_needs_labels(brain_oracle, synthetic_brats_dir, tmp_path):
    folder = synthetic_brats_dir / "BraTS20_Training_001"
    files = [folder / f"BraTS20_Training_001_{m}.nii" for m in ("t1", "t1ce", "t2", "flair")]
    inferer = BratsVolumeInferer(brain_oracle(), DiffusionSampler(2, ensemble_size=1), (64, 64), progress=False)
    with pytest.raises(ValueError, match="label file .* BraTS20_Training_001"):
        run_evaluation(inferer, files, tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


def test_a_grade_that_is_not_a_grade_stops_the_evaluation_before_sampling(
    stand_in_network, synthetic_datalist, tmp_path
):
    """A datalist's grade "G4" is named with its subject before any subject is sampled; "LGG" / "HGG" are grades."""
    entries = load_brats_datalist(synthetic_datalist, "validation")[:2]
    entries[0]["grade"], entries[1]["grade"] = "LGG", "G4"
    network = stand_in_network()
    inferer = BratsVolumeInferer(network, DiffusionSampler(2, ensemble_size=1), (64, 64), progress=False)
    with pytest.raises(ValueError, match=rf"subject {entries[1]['subject_id']}: grade 'G4' is not valid"):
        run_evaluation(inferer, entries, tmp_path / "eval")
    assert not network.encode_batches and not (tmp_path / "eval").exists()


def test_a_second_evaluation_into_the_same_folder_needs_overwrite(brain_oracle, synthetic_datalist, tmp_path):
    """The report of an earlier evaluation is never replaced silently: without ``overwrite`` the second run stops
    before sampling, naming the report's files; with it, the report is replaced."""
    inferer = BratsVolumeInferer(brain_oracle(), DiffusionSampler(2, ensemble_size=1), (64, 64), progress=False)
    out = tmp_path / "eval"
    run_evaluation(inferer, synthetic_datalist, out, datalist_key="training", num_eval_cases=2, print_table=False)
    before = (out / "summary.json").read_text()
    with pytest.raises(FileExistsError, match=r"already holds an evaluation report \(metrics_per_subject.csv, summ"):
        run_evaluation(inferer, synthetic_datalist, out, datalist_key="validation", print_table=False)
    assert (out / "summary.json").read_text() == before
    inferer.overwrite = True
    run_evaluation(inferer, synthetic_datalist, out, datalist_key="training", num_eval_cases=1, print_table=False)
    assert json.loads((out / "summary.json").read_text())["num_subjects"] == 1


def test_an_evaluation_stopped_while_scoring_leaves_the_folder_as_it_was(
    brain_oracle, synthetic_datalist, tmp_path, monkeypatch
):
    inferer = BratsVolumeInferer(brain_oracle(), DiffusionSampler(2, ensemble_size=1), (64, 64), progress=False)
    out = tmp_path / "eval"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the metrics are computed, after every subject was sampled

    with monkeypatch.context() as patch:
        patch.setattr(evaluation_workflow, "evaluate_subjects", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_evaluation(inferer, synthetic_datalist, out, datalist_key="training", num_eval_cases=2)
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == []  # nothing written: run it again
    predicted = []
    inferer.predict = lambda entry: predicted.append(entry) or BratsVolumeInferer.predict(inferer, entry)
    run_evaluation(inferer, synthetic_datalist, out, datalist_key="training", num_eval_cases=2, print_table=False)
    assert json.loads((out / "summary.json").read_text())["num_subjects"] == 2
    assert predicted == []  # the subjects sampled before the stop are scored, not sampled again


def test_a_report_without_a_grade_leaves_no_earlier_reliability_diagram(brain_oracle, synthetic_datalist, tmp_path):
    inferer = BratsVolumeInferer(brain_oracle(), DiffusionSampler(2, ensemble_size=1), (64, 64), progress=False)
    out = tmp_path / "eval"
    run_evaluation(inferer, synthetic_datalist, out, datalist_key="training", print_table=False)
    assert (out / "reliability.png").is_file()
    ungraded = [{k: v for k, v in e.items() if k != "grade"} for e in load_brats_datalist(synthetic_datalist)]
    inferer.overwrite = True
    run_evaluation(inferer, ungraded, out, print_table=False)
    assert json.loads((out / "summary.json").read_text())["grade"] is None
    assert not (out / "reliability.png").exists()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"hd95_convention": "foo"}, r"hd95_convention 'foo': expected one of \['brats', 'monai'\]"),
        ({"lesion_challenge": "BraTS-XYZ"}, r"lesion_challenge 'BraTS-XYZ': expected one of \['BraTS-GLI'"),
        ({"bootstrap_resamples": -1}, "bootstrap_resamples must be >= 0"),
    ],
)
def test_a_bad_evaluation_setting_stops_before_sampling(brain_oracle, synthetic_datalist, tmp_path, setting, message):
    """A metric setting is checked before the first subject is sampled, so nothing is written that would block the
    corrected command."""
    inferer = BratsVolumeInferer(brain_oracle(), DiffusionSampler(2, ensemble_size=1), (64, 64), progress=False)
    with pytest.raises(ValueError, match=message):
        run_evaluation(inferer, synthetic_datalist, tmp_path / "eval", print_table=False, **setting)
    assert not (tmp_path / "eval").exists()


def test_an_evaluation_stopped_while_moving_its_report_in_is_finished_by_the_same_call(
    brain_oracle, synthetic_datalist, tmp_path, monkeypatch
):
    inferer = BratsVolumeInferer(brain_oracle(), DiffusionSampler(2, ensemble_size=1), (64, 64), progress=False)
    out = tmp_path / "eval"
    replace = os.replace

    def stopped_after_the_first_report_file(src, dst):
        replace(src, dst)
        if Path(dst).name == "metrics_per_subject.csv":
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", stopped_after_the_first_report_file)
        with pytest.raises(KeyboardInterrupt):
            run_evaluation(inferer, synthetic_datalist, out, datalist_key="training", num_eval_cases=2)
    assert (out / "metrics_per_subject.csv").is_file() and not (out / "summary.json").exists()
    run_evaluation(inferer, synthetic_datalist, out, datalist_key="training", num_eval_cases=2, print_table=False)
    assert json.loads((out / "summary.json").read_text())["num_subjects"] == 2


def test_the_default_list_is_the_held_out_one_and_an_in_sample_list_is_named(synthetic_datalist, tmp_path, caplog):
    """``testing`` (never read by training) where the datalist has one; scoring ``validation``, which chose the best
    checkpoint and fitted the grade calibration, says that its figures are in-sample."""
    from medsegdiff_monai.workflows import evaluation_list, evaluation_provenance, is_in_sample

    assert evaluation_list(synthetic_datalist) == "validation"  # no testing list
    content = json.loads(synthetic_datalist.read_text())
    with_testing = tmp_path / "datalist.json"
    with_testing.write_text(json.dumps({**content, "testing": content["validation"]}))
    assert evaluation_list(with_testing) == "testing"
    assert evaluation_list(synthetic_datalist.parent) == "validation"  # a folder: no list is read
    with caplog.at_level("WARNING", logger="medsegdiff_monai"):
        assert is_in_sample(with_testing, "testing") is False and not caplog.records
        assert is_in_sample(synthetic_datalist.parent, "validation") is None and not caplog.records  # a folder
        assert is_in_sample(with_testing, "validation") is True
    assert "figures are in-sample. Score the 'testing' list" in caplog.text
    # what the bundle records: a folder uses no list, so neither the list nor in-sample is claimed
    assert evaluation_provenance(synthetic_datalist.parent, "validation", "m.pt") == {
        "input": str(synthetic_datalist.parent),
        "datalist_key": None,
        "in_sample": None,
        "checkpoint": "m.pt",
    }
    assert evaluation_provenance(with_testing, "testing")["in_sample"] is False


def test_qu_brats_scores_of_the_written_region_maps(stand_in_network, synthetic_datalist, tmp_path):
    """With region maps, the report scores each written map against its region with the T1's non-zero voxels as the
    brain, as the challenge's evaluation reads the files; the default table shows the scores alone."""
    from medsegdiff_monai.metrics import qu_brats_scores

    inferer = BratsVolumeInferer(
        stand_in_network(), DiffusionSampler(2, ensemble_size=2), (64, 64), write_region_uncertainty=True
    )
    inferer.progress = False
    out = tmp_path / "eval"
    result = run_evaluation(inferer, synthetic_datalist, out, num_eval_cases=2, include_hd95=False)
    entries = load_brats_datalist(synthetic_datalist, "validation")[:2]
    for row, entry in zip(result.rows, entries, strict=True):
        truth = np.asarray(nib.load(entry["label"]).dataobj)
        pred = np.asarray(nib.load(str(out / f"{entry['subject_id']}_seg.nii.gz")).dataobj)
        brain = np.asarray(nib.load(entry["image"][0]).dataobj) > 0
        regions = {"WT": ("whole", (1, 2, 4)), "TC": ("core", (1, 4)), "ET": ("enhance", (4,))}
        for region, (name, labels) in regions.items():
            uncertainty = np.asarray(nib.load(str(out / f"{entry['subject_id']}_unc_{name}.nii.gz")).dataobj)
            expected = qu_brats_scores(np.isin(pred, labels), np.isin(truth, labels), uncertainty, brain)
            for figure, value in expected.items():
                assert row[f"qu_{figure}_{region}"] == pytest.approx(value, abs=1e-12)
        assert row["qu_score_mean"] == pytest.approx(np.mean([row[f"qu_score_{r}"] for r in regions]))
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["qu_score_mean"]["ci95"]) == 2
    assert summary["provenance"]["region_uncertainty_map"] == "near_miss"
    printed = evaluation_workflow.format_table(result).splitlines()[0].split()
    assert "qu_score_WT" in printed and "qu_ftp_auc_WT" not in printed
