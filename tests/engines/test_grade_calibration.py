"""Grade calibration: Platt fit against scikit-learn, its place in the network, old checkpoints, the training handler;
the evaluator's pooled subject grade and Brier score; the checkpoint-selection score."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss

from medsegdiff_monai.engines import DiffusionEvaluator
from medsegdiff_monai.handlers import GradeCalibrationFit, validation_score
from medsegdiff_monai.inferers import DiffusionSampler, subject_p_hgg
from medsegdiff_monai.networks import GradeCalibration, fit_platt_scaling, load_network_weights, logit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "networks"))
from tiny_network import tiny_network  # noqa: E402


def platt_reference(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Platt's smoothed targets as a weighted logistic regression (each subject once per class, weighted by the
    target's share), fitted by scikit-learn without penalty."""
    n_hgg, n_lgg = int(y.sum()), int((1 - y).sum())
    target = np.where(y == 1, (n_hgg + 1) / (n_hgg + 2), 1 / (n_lgg + 2))
    features = np.concatenate([x, x])[:, None]
    labels = np.concatenate([np.ones_like(y), np.zeros_like(y)])
    weights = np.concatenate([target, 1 - target])
    model = LogisticRegression(penalty=None, tol=1e-10, max_iter=10_000).fit(features, labels, sample_weight=weights)
    return float(model.coef_[0, 0]), float(model.intercept_[0])


@pytest.mark.parametrize("separable", [False, True])
def test_platt_fit_matches_scikit_learn(separable):
    rng = np.random.default_rng(0)
    y = np.array([0] * 6 + [1] * 10, dtype=np.float64)
    # compressed, shifted log-odds as an uncalibrated network gives them (all near 0.5 in probability)
    x = 0.05 * (y - 0.3) + (0.0 if separable else 0.04) * rng.standard_normal(y.size)
    scale, bias = fit_platt_scaling(x, y)
    ref_scale, ref_bias = platt_reference(x, y)
    assert scale == pytest.approx(ref_scale, rel=1e-4) and bias == pytest.approx(ref_bias, rel=1e-4, abs=1e-6)
    assert scale > 1.0  # the compressed log-odds are stretched


def test_platt_fit_input_checks():
    with pytest.raises(ValueError, match="both present"):
        fit_platt_scaling([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="NaN or inf"):
        fit_platt_scaling([math.nan, 0.2], [0, 1])
    with pytest.raises(ValueError, match="2 log-odds but 3 grades"):
        fit_platt_scaling([0.1, 0.2], [0, 1, 1])


def test_calibration_commutes_with_the_subject_pooling():
    calibration = GradeCalibration()
    calibration.set(3.0, -0.5)
    slice_logits = torch.tensor([[0.1, 0.4], [0.3, 0.2], [-0.2, 0.5], [0.0, 0.1]])
    calibrated = torch.softmax(calibration(slice_logits), dim=1)[:, 1]
    difference = slice_logits[:, 1] - slice_logits[:, 0]
    torch.testing.assert_close(calibrated, torch.sigmoid(3.0 * difference - 0.5))
    # pooling calibrated slices = calibrating the pooled (uncalibrated) log-odds
    raw = torch.softmax(slice_logits, dim=1)[:, 1]
    pooled_raw = subject_p_hgg(raw, torch.ones(4, dtype=torch.bool))
    expected = 1 / (1 + math.exp(-(3.0 * logit(pooled_raw) - 0.5)))
    assert subject_p_hgg(calibrated, torch.ones(4, dtype=torch.bool)) == pytest.approx(expected, rel=1e-5)
    # composing a second fit on calibrated log-odds equals one affine map
    calibration.compose(2.0, 1.0)
    assert (float(calibration.scale), float(calibration.bias)) == pytest.approx((6.0, 0.0))
    with pytest.raises(ValueError, match="scale > 0"):
        calibration.set(-1.0, 0.0)


def test_network_carries_the_calibration_and_old_checkpoints_load_with_a_warning(tmp_path):
    network = tiny_network()
    image = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        raw = network.encode_condition(image).grade_logits
        network.grade_calibration.set(2.0, 0.25)
        calibrated = network.encode_condition(image).grade_logits
    torch.testing.assert_close(calibrated, 2.0 * raw + torch.tensor([0.0, 0.25]))
    state = network.state_dict()
    assert float(state["grade_calibration.scale"]) == 2.0 and float(state["grade_calibration.bias"]) == 0.25
    torch.save(state, tmp_path / "calibrated.pt")
    loaded = load_network_weights(tiny_network(), tmp_path / "calibrated.pt")
    assert (float(loaded.grade_calibration.scale), float(loaded.grade_calibration.bias)) == (2.0, 0.25)
    old = {k: v for k, v in state.items() if not k.startswith("grade_calibration.")}
    torch.save(old, tmp_path / "old.pt")
    with pytest.warns(UserWarning, match="no grade calibration"):
        loaded = load_network_weights(tiny_network(), tmp_path / "old.pt")
    assert loaded.grade_calibration.is_identity


def test_validation_score_is_dice_minus_brier():
    metrics = {"Dice": 0.8, "Brier": 0.15, "AUC": 0.25}
    assert validation_score(metrics) == pytest.approx(0.65)
    assert validation_score({"Dice": 0.8, "Brier": math.nan}) == pytest.approx(0.8)  # no grade head
    assert validation_score({}) == -math.inf
    assert validation_score(metrics, ["Dice", "AUC"]) == pytest.approx(1.05)


def run_with_calibration(
    tmp_path: Path, epochs: list[dict], calibration: tuple[float, float] = (1.0, 0.0)
) -> tuple[GradeCalibrationFit, Path]:
    """A trainer whose every epoch runs an evaluator over ``epochs[i]`` (log_odds, grades, Dice, Brier) subjects; the
    best network file starts with ``calibration`` (scale, bias)."""
    best_path = tmp_path / "model.pt"
    network = tiny_network()
    network.grade_calibration.set(*calibration)
    torch.save(network.state_dict(), best_path)

    def evaluate(engine: Engine, batch: tuple[float, int]) -> dict:
        return {"grade_log_odds": torch.tensor([[batch[0]]], dtype=torch.float64), "grade": torch.tensor([[batch[1]]])}

    evaluator = Engine(evaluate)
    trainer = Engine(lambda engine, batch: None)

    @trainer.on(Events.EPOCH_COMPLETED)
    def validate(engine: Engine) -> None:
        figures = epochs[engine.state.epoch - 1]
        evaluator.run(list(zip(figures["log_odds"], figures["grades"], strict=True)))
        evaluator.state.metrics = {"Dice": figures["Dice"], "Brier": figures["Brier"]}

    handler = GradeCalibrationFit(evaluator, best_path)
    handler.attach(trainer)
    trainer.run([0], max_epochs=len(epochs))
    return handler, best_path


def test_calibration_handler_fits_the_best_epoch_and_writes_it_into_the_file(tmp_path):
    grades = [0, 0, 0, 1, 1, 1, 1]
    best = {"log_odds": [-0.05, 0.02, -0.01, 0.04, 0.08, 0.01, 0.06], "grades": grades, "Dice": 0.7, "Brier": 0.2}
    worse = {"log_odds": [0.3, -0.2, 0.1, -0.4, 0.2, 0.0, 0.5], "grades": grades, "Dice": 0.7, "Brier": 0.3}
    handler, best_path = run_with_calibration(tmp_path, [worse, best, worse])
    assert handler.best_score == pytest.approx(0.5)
    scale, bias = fit_platt_scaling(best["log_odds"], grades)
    state = torch.load(best_path, weights_only=True)
    assert float(state["grade_calibration.scale"]) == pytest.approx(scale)
    assert float(state["grade_calibration.bias"]) == pytest.approx(bias)
    network = load_network_weights(tiny_network(), best_path)
    assert float(network.grade_calibration.scale) == pytest.approx(scale)
    # the calibrated probabilities fit the validation grades better than the raw ones (all near 0.5)
    x, y = np.array(best["log_odds"]), np.array(grades)
    nll_raw = np.mean(np.logaddexp(0, x) - y * x)
    nll_calibrated = np.mean(np.logaddexp(0, scale * x + bias) - y * (scale * x + bias))
    assert nll_calibrated < nll_raw - 0.05


def test_calibration_handler_keeps_the_identity_with_one_grade(tmp_path, caplog):
    epoch = {"log_odds": [0.1, 0.2, 0.3, 0.4], "grades": [1, 1, 1, 1], "Dice": 0.5, "Brier": 0.2}
    _, best_path = run_with_calibration(tmp_path, [epoch])
    state = torch.load(best_path, weights_only=True)
    assert float(state["grade_calibration.scale"]) == 1.0 and float(state["grade_calibration.bias"]) == 0.0
    assert "0 LGG and 4 HGG validation subjects" in caplog.text


def test_calibration_handler_keeps_the_identity_when_the_head_ranks_no_better_than_chance(tmp_path, caplog):
    """A head that ranks the validation subjects backwards drives the positive Platt scale to about 0 (every subject
    the same p(HGG)); that is said, and the identity kept."""
    grades = [0, 0, 0, 1, 1, 1]
    backwards = {"log_odds": [0.3, 0.2, 0.1, -0.1, -0.2, -0.3], "grades": grades, "Dice": 0.5, "Brier": 0.3}
    assert fit_platt_scaling(backwards["log_odds"], grades)[0] < 1e-3  # the collapse being avoided
    _, best_path = run_with_calibration(tmp_path, [backwards])
    state = torch.load(best_path, weights_only=True)
    assert float(state["grade_calibration.scale"]) == 1.0 and float(state["grade_calibration.bias"]) == 0.0
    assert "with AUC 0.00, at most min_auc=0.5 (0.5: chance), so none is fitted" in caplog.text
    assert "model.pt keeps the identity" in caplog.text
    # weights that came with a calibration (--initial_checkpoint of a calibrated network) keep it, as the log says
    _, best_path = run_with_calibration(tmp_path, [backwards], calibration=(1.36, -0.25))
    state = torch.load(best_path, weights_only=True)
    assert float(state["grade_calibration.scale"]) == pytest.approx(1.36)
    assert "model.pt keeps the calibration it holds (scale=1.3600 bias=-0.2500)" in caplog.text


def test_calibration_handler_state_restores_the_kept_epoch(tmp_path):
    """A resumed run keeps the kept epoch of before the interruption: its state round-trips through a checkpoint
    file loaded with weights_only=True, and a fresh handler given it fits the same calibration."""
    grades = [0, 0, 0, 1, 1, 1, 1]
    best = {"log_odds": [-0.05, 0.02, -0.01, 0.04, 0.08, 0.01, 0.06], "grades": grades, "Dice": 0.7, "Brier": 0.2}
    handler, _ = run_with_calibration(tmp_path, [best])
    torch.save({"grade_calibration": handler.state_dict()}, tmp_path / "checkpoint.pt")
    restored = GradeCalibrationFit(Engine(lambda engine, batch: None), tmp_path / "model.pt")
    restored.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["grade_calibration"])
    assert restored.best_score == pytest.approx(0.5)
    np.testing.assert_array_equal(restored.best[0], best["log_odds"])
    np.testing.assert_array_equal(restored.best[1], grades)
    empty = GradeCalibrationFit(Engine(lambda engine, batch: None), tmp_path / "model.pt")
    empty.load_state_dict(GradeCalibrationFit(Engine(lambda engine, batch: None), tmp_path / "x.pt").state_dict())
    assert empty.best is None and empty.best_score == -math.inf


def test_calibration_handler_with_the_network_fits_a_file_once(tmp_path, caplog):
    """Given the trained network, the handler composes its fit into the best network file only while the file's
    calibration is still the network's own: completing the same run again leaves the file as it is."""
    grades = [0, 0, 0, 1, 1, 1, 1]
    best = {"log_odds": [-0.05, 0.02, -0.01, 0.04, 0.08, 0.01, 0.06], "grades": grades, "Dice": 0.7, "Brier": 0.2}
    handler, best_path = run_with_calibration(tmp_path, [best])
    fitted = torch.load(best_path, weights_only=True)
    handler.network = tiny_network()  # identity calibration, as the network that wrote the file had
    caplog.set_level(logging.INFO)
    handler._fit_and_store(Engine(lambda engine, batch: None))
    again = torch.load(best_path, weights_only=True)
    assert all(torch.equal(fitted[k], again[k]) for k in ("grade_calibration.scale", "grade_calibration.bias"))
    assert "already holds this run's fitted calibration" in caplog.text
    torch.save(tiny_network().state_dict(), best_path)  # a file not yet fitted is fitted
    handler._fit_and_store(Engine(lambda engine, batch: None))
    refitted = torch.load(best_path, weights_only=True)
    assert torch.equal(refitted["grade_calibration.scale"], fitted["grade_calibration.scale"])


class SliceMeanGrader(torch.nn.Module):
    """Tumour on every brain voxel; the HGG logit of a slice is the mean of its first channel (LGG logit 0)."""

    def encode_condition(self, image: torch.Tensor) -> SimpleNamespace:
        brain = (image != 0).any(dim=1, keepdim=True).float().repeat(1, 3, 1, 1)
        hgg = image[:, 0].mean(dim=(1, 2))
        return SimpleNamespace(features=[brain], calib_map=20 * brain - 10, grade_logits=torch.stack([0 * hgg, hgg], 1))

    def denoise(self, x_t, t, condition):
        return condition.calib_map


def test_evaluator_grades_subjects_by_pooled_log_odds_and_scores_brier():
    # subject 1 (HGG): slice logits 0.2, 1.0, 0.6 on its three brain slices; subject 2 (LGG): -0.9, 0.3, -0.6
    slice_logits = {1: [0.2, 1.0, 0.6], 0: [-0.9, 0.3, -0.6]}
    batches = []
    for grade, logits in slice_logits.items():
        image = torch.zeros(1, 4, 8, 8, 4)
        for d, value in enumerate(logits):
            image[0, :, :, :, d] = value
        batches.append({"image": image, "label": torch.ones(1, 3, 8, 8, 4), "grade": torch.tensor([grade])})
    sampler = DiffusionSampler(num_inference_steps=1, ensemble_size=1)
    evaluator = DiffusionEvaluator("cpu", batches, SliceMeanGrader(), sampler)
    outputs = []
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(e.state.output))
    evaluator.run()
    expected = {grade: 1 / (1 + math.exp(-float(np.mean(logits)))) for grade, logits in slice_logits.items()}
    for output, grade in zip(outputs, slice_logits, strict=True):
        assert float(output["p_hgg"]) == pytest.approx(expected[grade], rel=1e-5)
        assert float(output["grade_log_odds"]) == pytest.approx(float(np.mean(slice_logits[grade])), rel=1e-5)
    reference = brier_score_loss([1, 0], [expected[1], expected[0]])
    assert evaluator.state.metrics["Brier"] == pytest.approx(reference, rel=1e-5)
    assert evaluator.state.metrics["AUC"] == 1.0


def test_logit_of_a_list_an_array_a_float_and_a_tensor():
    """The log-odds by hand, log(p / (1 - p)), for each type users hand it (a p_hgg column read from grades.csv)."""
    probabilities = [0.2, 0.5, 0.9]
    expected = np.log(np.array(probabilities) / (1 - np.array(probabilities)))
    np.testing.assert_allclose(logit(probabilities), expected, rtol=1e-12)
    np.testing.assert_allclose(logit(np.array(probabilities)), expected, rtol=1e-12)
    assert isinstance(logit(0.2), float) and logit(0.2) == pytest.approx(expected[0], rel=1e-12)
    torch.testing.assert_close(logit(torch.tensor(probabilities)), torch.from_numpy(expected), rtol=1e-6, atol=0)
