"""Losses against independent computations: MONAI, hand formulas, sklearn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.losses import DiceFocalLoss, DiceLoss, FocalLoss
from sklearn.metrics import log_loss

from medsegdiff_monai.engines import build_optimizer
from medsegdiff_monai.losses import GradeFocalLoss, SegmentationLoss, UncertaintyWeightedLoss


def _seg_batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    seg_logits = torch.randn(2, 3, 8, 8, generator=generator) * 2
    calib_map = torch.randn(2, 3, 8, 8, generator=generator) * 2
    target = (torch.rand(2, 3, 8, 8, generator=generator) > 0.6).float()
    target[1, 2] = 0.0  # one empty region (e.g. no ET)
    return seg_logits, calib_map, target


def _hand_dice_focal(logits, target, gamma, lambda_focal, batch):
    """Soft Dice (smooth 1e-5) + lambda * mean sigmoid focal, written out."""
    p = torch.sigmoid(logits).double()
    y = target.double()
    dims = (0, 2, 3) if batch else (2, 3)
    dice = 1 - (2 * (p * y).sum(dims) + 1e-5) / (p.sum(dims) + y.sum(dims) + 1e-5)
    p_t = torch.where(y == 1, p, 1 - p)
    focal = -((1 - p_t) ** gamma) * torch.log(p_t)
    return dice.mean() + lambda_focal * focal.mean()


@pytest.mark.parametrize("batch_dice", [True, False])
def test_segmentation_loss_matches_hand_formula_and_monai(batch_dice):
    seg_logits, calib_map, target = _seg_batch()
    loss = SegmentationLoss(gamma=1.5, lambda_focal=0.5, lambda_calib=0.7, batch_dice=batch_dice)
    expected = _hand_dice_focal(seg_logits, target, 1.5, 0.5, batch_dice) + 0.7 * _hand_dice_focal(
        calib_map, target, 1.5, 0.5, batch_dice
    )
    assert loss(seg_logits, target, calib_map).item() == pytest.approx(expected.item(), rel=1e-5)
    monai = DiceFocalLoss(sigmoid=True, gamma=1.5, lambda_dice=1.0, lambda_focal=0.5, batch=batch_dice)
    assert loss(seg_logits, target).item() == pytest.approx(monai(seg_logits, target).item(), rel=1e-6)


def test_segmentation_loss_without_focal_is_dice_only():
    seg_logits, calib_map, target = _seg_batch(1)
    loss = SegmentationLoss(use_focal=False, lambda_calib=1.0)
    dice = DiceLoss(sigmoid=True, batch=True)
    expected = dice(seg_logits, target) + dice(calib_map, target)
    assert loss(seg_logits, target, calib_map).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="must equal the target shape"):
        loss(seg_logits[:, :1], target)


def test_batch_dice_does_not_saturate_on_an_empty_slice():
    # documented figure: a 64x64 slice without tumour predicted at p = 0.01 everywhere
    target = torch.zeros(1, 1, 64, 64)
    logits = torch.full((1, 1, 64, 64), math.log(0.01 / 0.99))
    per_sample = SegmentationLoss(use_focal=False, batch_dice=False)(logits, target)
    assert per_sample.item() == pytest.approx(1.0, abs=1e-4)
    # next to a slice with tumour, batch Dice counts those 41 false-positive voxels against the tumour's 256
    tumour = torch.zeros(1, 1, 64, 64)
    tumour[..., 10:26, 10:26] = 1.0
    batch_logits = torch.cat([logits, torch.where(tumour > 0, 10.0, -10.0)])
    batch = SegmentationLoss(use_focal=False, batch_dice=True)(batch_logits, torch.cat([target, tumour]))
    p = torch.sigmoid(batch_logits).double()
    y = torch.cat([target, tumour]).double()
    assert batch.item() == pytest.approx(1 - (2 * (p * y).sum() / (p.sum() + y.sum())).item(), rel=1e-4)
    assert 0.05 < batch.item() < 0.1


def test_grade_focal_loss_hand_formula_and_monai_and_sklearn():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 2, generator=generator) * 2
    grade = torch.tensor([0, 1, 1, 0, 1, 1])
    alpha = (369 / 152, 369 / 586)
    p = torch.softmax(logits.double(), dim=1)
    p_true = p[torch.arange(6), grade]
    alpha_true = torch.tensor(alpha, dtype=torch.float64)[grade]
    expected = (alpha_true * (1 - p_true) ** 2 * -torch.log(p_true)).mean()
    got = GradeFocalLoss(alpha=alpha, gamma=2.0)(logits, grade)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # MONAI's mean reduction averages over B x C one-hot entries: ours is num_classes times it
    monai = FocalLoss(to_onehot_y=True, use_softmax=True, gamma=2.0, weight=list(alpha))(logits, grade[:, None])
    assert got.item() == pytest.approx(2 * monai.item(), rel=1e-5)
    # gamma 0, alpha 1: plain cross-entropy, as sklearn computes it
    ce = GradeFocalLoss(alpha=None, gamma=0.0)(logits, grade)
    assert ce.item() == pytest.approx(log_loss(grade.numpy(), p.numpy(), labels=[0, 1]), rel=1e-5)
    # the alpha weighting alone: weighted cross-entropy (sklearn sample weights, unnormalised mean)
    weighted = GradeFocalLoss(alpha=alpha, gamma=0.0)(logits, grade)
    sample_weight = np.array(alpha)[grade.numpy()]
    sk = log_loss(grade.numpy(), p.numpy(), sample_weight=sample_weight, labels=[0, 1]) * sample_weight.mean()
    assert weighted.item() == pytest.approx(sk, rel=1e-5)


def test_grade_focal_loss_sample_weight_is_the_mean_over_weighted_samples():
    """0/1 weights: the loss of the kept samples alone (sklearn's log loss at gamma 0); all zero: 0 and no gradient."""
    generator = torch.Generator().manual_seed(1)
    logits = (torch.randn(6, 2, generator=generator) * 2).requires_grad_()
    grade = torch.tensor([0, 1, 1, 0, 1, 1])
    kept = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    got = GradeFocalLoss(alpha=None, gamma=0.0)(logits, grade, kept)
    rows = kept.bool().numpy()
    p = torch.softmax(logits.detach().double(), dim=1).numpy()
    assert got.item() == pytest.approx(log_loss(grade.numpy()[rows], p[rows], labels=[0, 1]), rel=1e-5)
    focal = GradeFocalLoss(alpha=(2.0, 0.5), gamma=2.0)
    assert focal(logits, grade, kept).item() == pytest.approx(
        focal(logits[kept.bool()], grade[kept.bool()]).item(), rel=1e-6
    )
    none_kept = focal(logits, grade, torch.zeros(6))
    none_kept.backward()
    assert none_kept.item() == 0.0 and torch.count_nonzero(logits.grad) == 0
    with pytest.raises(ValueError, match="sample_weight"):
        focal(logits, grade, torch.ones(6, 1))


def test_grade_focal_loss_input_checks():
    loss = GradeFocalLoss(alpha=(1.0, 2.0))
    with pytest.raises(ValueError, match="2 alpha weights but grade_logits has 3 classes"):
        loss(torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="grade_logits \\(B, num_classes\\) and grade \\(B,\\)"):
        GradeFocalLoss()(torch.randn(2, 2), torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match=">= 0"):
        GradeFocalLoss(alpha=(-1.0, 1.0))
    with pytest.raises(ValueError, match=r"one weight per grade, \[alpha_LGG, alpha_HGG\] .*, got \[1, 2, 3\]"):
        GradeFocalLoss(alpha=[1, 2, 3])
    with pytest.raises(ValueError, match=r"one weight per grade, .*got 0\.25"):  # --class_weights 0.25
        GradeFocalLoss(alpha=0.25)
    with pytest.raises(ValueError, match="must be finite"):
        GradeFocalLoss(alpha=[1.0, float("nan")])
    with pytest.raises(ValueError, match="must be finite"):  # inf in the float32 weights
        GradeFocalLoss(alpha=[1e308, 1e308])
    for not_weights in ("12", b"ab", ("1", "2"), [None, 1], (True, False), {"a": 1}):
        with pytest.raises(ValueError, match="one weight per grade"):
            GradeFocalLoss(alpha=not_weights)
    # an array or tensor of two weights is two weights
    logits, grade = torch.randn(4, 2), torch.tensor([0, 1, 1, 0])
    expected = GradeFocalLoss(alpha=[2.5, 0.5])(logits, grade)
    for weights in (np.array([2.5, 0.5]), torch.tensor([2.5, 0.5]), (2.5, 0.5)):
        torch.testing.assert_close(GradeFocalLoss(alpha=weights)(logits, grade), expected)
    with pytest.raises(ValueError, match="not all 0"):  # --class_weights "[0,0]": a grade stage that learns nothing
        GradeFocalLoss(alpha=(0.0, 0.0))
    # a fractional grade is not truncated to a class, a grade of 2 is not a raw index error
    with pytest.raises(ValueError, match="integer grade .* got dtype torch.float32"):
        GradeFocalLoss()(torch.randn(2, 2), torch.tensor([0.7, 1.0]))
    with pytest.raises(ValueError, match=r"grade values in \[0, 2\), got \[1, 2\]"):
        GradeFocalLoss(alpha=(1.0, 2.0))(torch.randn(2, 2), torch.tensor([2, 1]))
    # a boolean grade (True = HGG) is a class index, as the cross-entropy reads it
    logits = torch.randn(3, 2)
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([1, 0, 1]))
    torch.testing.assert_close(GradeFocalLoss(gamma=0.0)(logits, torch.tensor([True, False, True])), expected)


def test_uncertainty_weighting_kendall_form_at_nonzero_log_sigma():
    weighting = UncertaintyWeightedLoss(("seg", "grade"), init_log_sigma=0.0)
    with torch.no_grad():
        weighting.log_sigmas["seg"].fill_(0.3)
        weighting.log_sigmas["grade"].fill_(-0.7)
    seg, grade = torch.tensor(0.8), torch.tensor(1.7)
    expected = 0.5 * math.exp(-0.6) * 0.8 + 0.3 + 0.5 * math.exp(1.4) * 1.7 - 0.7
    total = weighting({"seg": seg, "grade": grade})
    assert total.item() == pytest.approx(expected, rel=1e-6)
    total.backward()
    # d/ds (0.5 exp(-2s) L + s) = 1 - exp(-2s) L
    assert weighting.log_sigmas["seg"].grad.item() == pytest.approx(1 - math.exp(-0.6) * 0.8, rel=1e-5)
    assert weighting.log_sigmas["grade"].grad.item() == pytest.approx(1 - math.exp(1.4) * 1.7, rel=1e-5)
    assert weighting.sigmas() == pytest.approx({"seg": math.exp(0.3), "grade": math.exp(-0.7)})


def test_uncertainty_weighting_skips_missing_tasks_and_clamps():
    weighting = UncertaintyWeightedLoss(("seg", "grade"), log_sigma_bounds=(-1.0, 1.0))
    assert weighting({"seg": torch.tensor(2.0), "grade": None}).item() == pytest.approx(1.0)
    assert weighting({"grade": torch.tensor(3.0)}).item() == pytest.approx(1.5)
    with torch.no_grad():
        weighting.log_sigmas["seg"].fill_(5.0)
    total = weighting({"seg": torch.tensor(2.0)})
    assert total.item() == pytest.approx(0.5 * math.exp(-2.0) * 2.0 + 1.0)
    total.backward()
    assert weighting.log_sigmas["seg"].grad.item() == 0.0  # clamped: no gradient pushes it further out
    assert weighting.log_sigmas["grade"].grad is None
    assert weighting.sigmas()["seg"] == pytest.approx(math.e)
    assert [p is weighting.log_sigmas[t] for t, p in zip(("seg", "grade"), weighting.log_sigma_parameters())] == [
        True,
        True,
    ]
    assert set(weighting.state_dict()) == {"log_sigmas.seg", "log_sigmas.grade"}
    with pytest.raises(ValueError, match="unknown tasks"):
        weighting({"segmentation": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="at least one loss"):
        weighting({"seg": None})


def test_segmentation_loss_is_float32_for_bf16_logits():
    seg_logits, calib_map, target = _seg_batch(2)
    loss = SegmentationLoss()
    low_precision = loss(seg_logits.bfloat16(), target, calib_map.bfloat16())
    assert low_precision.dtype == torch.float32
    reference = loss(seg_logits.bfloat16().float(), target, calib_map.bfloat16().float())
    assert low_precision.item() == pytest.approx(reference.item(), rel=1e-6)


@pytest.mark.parametrize("fixed_loss", [0.058, 2.5])
def test_uncertainty_weighting_sigma_approaches_sqrt_of_the_loss(fixed_loss):
    # d/ds [0.5 exp(-2s) L + s] = 1 - exp(-2s) L = 0 at s = log sqrt(L): sigma -> sqrt(L)
    weighting = UncertaintyWeightedLoss(("seg", "grade"))
    network = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(network, weighting, lr=1e-4, weight_decay=0.1, log_sigma_lr=0.01)
    assert optimizer.param_groups[-1]["weight_decay"] == 0.0 and optimizer.param_groups[-1]["lr"] == 0.01
    trajectory = []
    for _ in range(600):
        optimizer.zero_grad()
        weighting({"seg": torch.tensor(fixed_loss)}).backward()
        optimizer.step()
        trajectory.append(weighting.sigmas()["seg"])
    target = math.sqrt(fixed_loss)
    distances = [abs(math.log(sigma / target)) for sigma in trajectory]
    assert distances[99] < distances[0] and distances[299] < distances[99]  # it moves towards sqrt(L)
    assert trajectory[-1] == pytest.approx(target, rel=0.03)
    assert weighting.sigmas()["grade"] == 1.0  # no loss, no gradient: it stays at its start


def test_uncertainty_weighting_reads_the_old_grade_task_name():
    """The grade task was called ``"cls"``: that name in ``tasks``, in a call and in a checkpoint still works."""
    with pytest.warns(DeprecationWarning, match="task name 'cls' is renamed 'grade'"):
        old_spelling = UncertaintyWeightedLoss(("seg", "cls"))
    assert old_spelling.tasks == ("seg", "grade")
    weighting = UncertaintyWeightedLoss(("seg", "grade"))
    old_checkpoint = {"log_sigmas.seg": torch.tensor(0.25), "log_sigmas.cls": torch.tensor(-0.5)}
    with pytest.warns(DeprecationWarning, match=r"log_sigmas.cls \(1 keys, renamed on load\)"):
        weighting.load_state_dict(old_checkpoint, strict=True)
    assert weighting.sigmas() == pytest.approx({"seg": math.exp(0.25), "grade": math.exp(-0.5)})
    losses = {"seg": torch.tensor(0.8), "grade": torch.tensor(1.7)}
    with pytest.warns(DeprecationWarning, match="'cls'"):
        old_call = weighting({"seg": losses["seg"], "cls": losses["grade"]})
    assert old_call.item() == weighting(losses).item()


def test_grade_focal_loss_reads_the_old_keyword():
    logits, grade = torch.randn(4, 2), torch.tensor([0, 1, 1, 0])
    loss = GradeFocalLoss(alpha=(2.0, 0.5))
    with pytest.warns(DeprecationWarning, match="cls_logits= of GradeFocalLoss.forward is renamed grade_logits="):
        old = loss(cls_logits=logits, grade=grade)
    assert old.item() == loss(logits, grade).item()
