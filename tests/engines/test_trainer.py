"""DiffusionTrainer + StagedTraining + NonFiniteLossGuard on in-memory batches (no files)."""

import logging
import math

import pytest
import torch
from ignite.engine import Events
from monai.engines.utils import IterationEvents
from monai.networks.schedulers import DDPMScheduler

from medsegdiff_monai.engines import (
    DiffusionTrainer,
    NoisyMaskPrepareBatch,
    NonFiniteLossEvents,
    build_optimizer,
    parse_stages,
    validation_metrics,
)
from medsegdiff_monai.handlers import LoadNetworkWeights, NonFiniteLossGuard, StagedTraining
from medsegdiff_monai.losses import GradeFocalLoss, SegmentationLoss, UncertaintyWeightedLoss
from medsegdiff_monai.networks import get_network

SIZE = 32


def make_batches(count: int = 3, batch: int = 2) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for index in range(count):
        image = torch.randn(batch, 4, SIZE, SIZE, generator=generator)
        label = torch.zeros(batch, 3, SIZE, SIZE)
        label[:, :, 8:20, 10:22] = 1.0
        subject_ids = [f"subject_{index}_{slot}" for slot in range(batch)]  # as the slice loader collates them
        batches.append(
            {"image": image, "label": label, "grade": torch.tensor([0, 1][:batch]), "subject_id": subject_ids}
        )
    return batches


def make_trainer(
    stages,
    use_grade_head=True,
    seg_loss=None,
    lr=1e-3,
    handlers=(),
    amp_dtype=None,
    fused=False,
    log_sigma_lr=0.05,
    grad_clip_norm=1.0,
):
    torch.manual_seed(0)
    network = get_network("small", use_grade_head=use_grade_head)
    weighting = UncertaintyWeightedLoss(tasks=("seg", "grade"))
    optimizer = build_optimizer(network, weighting, lr=lr, weight_decay=0.1, fused=fused, log_sigma_lr=log_sigma_lr)
    plan = parse_stages(stages, use_grade_head=use_grade_head)
    staged = StagedTraining(plan)
    trainer = DiffusionTrainer(
        device="cpu",
        max_epochs=sum(s.epochs for s in plan),
        train_data_loader=make_batches(),
        network=network,
        optimizer=optimizer,
        loss_function=weighting,
        seg_loss=seg_loss or SegmentationLoss(),
        grade_loss=GradeFocalLoss(alpha=(2.0, 0.67)) if use_grade_head else None,
        noise_scheduler=DDPMScheduler(num_train_timesteps=1000, prediction_type="sample"),
        stage=plan[0],
        amp_dtype=amp_dtype,
        grad_clip_norm=grad_clip_norm,
        train_handlers=[staged, *handlers],
    )
    return trainer, network, optimizer


def nan_on_second_call():
    """The real segmentation loss, except NaN on its second call (a single non-finite step)."""
    calls = {"n": 0}
    real_loss = SegmentationLoss()

    def flaky_loss(seg_logits, label, calib_map):
        calls["n"] += 1
        loss = real_loss(seg_logits, label, calib_map)
        return loss * float("nan") if calls["n"] == 2 else loss

    return flaky_loss


def nan_seg_loss(seg_logits, label, calib_map):
    """A segmentation loss that is always NaN (a diverged run)."""
    return seg_logits.sum() * float("nan")


def snapshot(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if n.startswith(prefix)}


def test_stage2_freezes_backbone_bit_for_bit_and_trains_head():
    stages = [
        {"name": "classification", "epochs": 1, "train": "grade_head", "lr_multiplier": 10.0, "losses": ["grade"]}
    ]
    trainer, network, _ = make_trainer(stages)
    before = snapshot(network)
    running_stats = {n: b.clone() for n, b in network.named_buffers()}
    trainer.run()
    after = snapshot(network)
    backbone = [n for n in before if not n.startswith("grade_head.")]
    head = [n for n in before if n.startswith("grade_head.")]
    assert backbone and head
    assert all(torch.equal(before[n], after[n]) for n in backbone), "a frozen backbone weight changed"
    assert any(not torch.equal(before[n], after[n]) for n in head), "the grade head did not train"
    # the frozen part's buffers stay; the head's input statistics follow the features it trains on
    buffers = dict(network.named_buffers())
    assert all(torch.equal(buffers[n], b) for n, b in running_stats.items() if not n.startswith("grade_head."))
    assert int(buffers["grade_head.feature_norm.num_batches_tracked"]) == len(trainer.data_loader)


def test_stage1_leaves_head_untouched_and_trains_backbone():
    stages = [{"name": "segmentation", "epochs": 1, "train": "backbone", "losses": ["seg"]}]
    trainer, network, _ = make_trainer(stages)
    before = snapshot(network)
    trainer.run()
    after = snapshot(network)
    assert all(torch.equal(before[n], after[n]) for n in before if n.startswith("grade_head."))
    assert any(not torch.equal(before[n], after[n]) for n in before if not n.startswith("grade_head."))
    assert math.isnan(float(trainer.state.output["L_grade"]))
    assert math.isfinite(float(trainer.state.output["L_seg"]))


def test_learning_rate_of_each_stage_is_base_times_multiplier():
    stages = [
        {"name": "segmentation", "epochs": 1, "train": "backbone", "lr_multiplier": 1.0},
        {"name": "classification", "epochs": 1, "train": "grade_head", "lr_multiplier": 10.0, "losses": ["grade"]},
        {"name": "joint", "epochs": 1, "train": "all", "lr_multiplier": 0.1, "losses": ["seg", "grade"]},
    ]
    trainer, _, optimizer = make_trainer(stages, lr=2e-4)
    seen = {}

    @trainer.on(__import__("ignite").engine.Events.EPOCH_COMPLETED)
    def record(engine):
        seen[engine.stage.name] = [group["lr"] for group in optimizer.param_groups]

    trainer.run()
    # the log-sigmas keep their own rate (0.05) in every stage
    assert seen["segmentation"] == pytest.approx([2e-4, 2e-4, 0.05])
    assert seen["classification"] == pytest.approx([2e-3, 2e-3, 0.05])
    assert seen["joint"] == pytest.approx([2e-5, 2e-5, 0.05])


@pytest.mark.parametrize(
    ("stage", "trained"),
    [
        ({"name": "segmentation", "epochs": 1, "train": "backbone", "losses": ["seg"]}, {"seg"}),
        ({"name": "classification", "epochs": 1, "train": "grade_head", "losses": ["grade"]}, {"grade"}),
        ({"name": "plain", "epochs": 1, "train": "all", "losses": ["seg"], "uncertainty_weighting": False}, set()),
    ],
)
def test_log_sigma_of_each_active_loss_trains(stage, trained):
    trainer, _, _ = make_trainer([stage])
    before = {t: p.detach().clone() for t, p in trainer.loss_function.log_sigmas.items()}
    trainer.run()
    changed = {t for t, p in trainer.loss_function.log_sigmas.items() if not torch.equal(before[t], p)}
    assert changed == trained


@pytest.mark.parametrize("grad_clip_norm", [0.05, None])
def test_fused_optimizer_clips_as_clip_grad_norm_does(grad_clip_norm):
    # fused AdamW clips inside its kernel (grad_scale); the reference: torch's clip_grad_norm_, then foreach AdamW
    stages = [{"name": "segmentation", "epochs": 1, "train": "backbone"}]
    runs = {}
    for fused in (False, True):
        trainer, network, _ = make_trainer(stages, fused=fused, grad_clip_norm=grad_clip_norm)
        norms = []
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED, lambda e, n=norms: n.append(float(e.state.output["grad_norm"]))
        )
        trainer.run()
        runs[fused] = (norms, snapshot(network))
    (reference_norms, reference), (norms, fused_weights) = runs[False], runs[True]
    assert norms == pytest.approx(reference_norms, rel=1e-4)
    if grad_clip_norm is not None:
        assert min(norms) > grad_clip_norm  # every step clipped
    # the two AdamW kernels round differently (up to 5e-7 here); without the clipping the fused run moves 3e-3 away
    for name, value in reference.items():
        torch.testing.assert_close(fused_weights[name], value, rtol=0.0, atol=1e-5, msg=name)


# fused=True: the skip happens inside the fused AdamW (found_inf) and the host learns of it one iteration later
@pytest.mark.parametrize("fused", [False, True])
def test_non_finite_loss_is_skipped_and_counted(fused, caplog):
    flaky_loss = nan_on_second_call()
    stages = [{"name": "segmentation", "epochs": 1, "train": "backbone"}]
    guard = NonFiniteLossGuard(max_consecutive=5)
    trainer, network, _ = make_trainer(stages, seg_loss=flaky_loss, handlers=[guard], fused=fused)
    finite_flags, skipped_seen = [], []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: finite_flags.append(bool(e.state.output["finite"])))
    trainer.add_event_handler(NonFiniteLossEvents.STEP_SKIPPED, lambda e: skipped_seen.append(e.state.skipped_step))
    trainer.run()
    assert finite_flags == [True, False, True]
    assert skipped_seen == [(1, 2)]
    # the second batch's subjects are named, also when the host learns of the skip one iteration later
    assert trainer.state.skipped_subject_ids == ("subject_1_0", "subject_1_1")
    assert "iteration 2 (batch of subject_1_0, subject_1_1: check their files" in caplog.text
    assert trainer.state.skipped_steps == 1
    assert trainer.state.epoch_skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in network.parameters())


@pytest.mark.parametrize("fused", [False, True])
def test_skipped_steps_leave_weights_and_optimizer_state_untouched(fused):
    stages = [{"name": "segmentation", "epochs": 2, "train": "backbone"}]
    trainer, network, optimizer = make_trainer(stages, seg_loss=nan_seg_loss, fused=fused)
    before = snapshot(network)
    trainer.run()
    assert trainer.state.skipped_steps == 6 and trainer.state.consecutive_skipped_steps == 6
    assert all(torch.equal(before[n], p) for n, p in network.named_parameters())
    assert all(float(state.get("step", 0)) == 0 for state in optimizer.state.values())


@pytest.mark.parametrize("fused", [False, True])
def test_guard_stops_a_diverged_run(fused):
    stages = [{"name": "segmentation", "epochs": 1, "train": "backbone"}]
    guard = NonFiniteLossGuard(max_consecutive=2)
    trainer, _, _ = make_trainer(stages, seg_loss=nan_seg_loss, handlers=[guard], fused=fused)
    with pytest.raises(RuntimeError, match="2 consecutive"):
        trainer.run()


def test_segmentation_only_network_trains():
    stages = [{"name": "segmentation", "epochs": 1, "train": "backbone"}]
    trainer, network, _ = make_trainer(stages, use_grade_head=False)
    before = snapshot(network)
    trainer.run()
    assert network.grade_head is None
    assert any(not torch.equal(before[n], p) for n, p in network.named_parameters())


def test_bad_amp_dtype_is_rejected_and_cpu_trains_in_fp32():
    stages = [{"name": "segmentation", "epochs": 1, "train": "backbone"}]
    with pytest.raises(ValueError, match="amp_dtype='int8'"):
        make_trainer(stages, amp_dtype="int8")
    trainer, _, _ = make_trainer(stages, amp_dtype="bfloat16")
    assert trainer.autocast_dtype is None


@pytest.mark.parametrize("fused", [False, True])
def test_epoch_report_means_leave_out_skipped_steps(tmp_path, fused):
    """The reported L_seg / L_total of an epoch are the means over its applied steps (independent mean here)."""
    import csv

    from medsegdiff_monai.handlers import EpochReport

    flaky_loss = nan_on_second_call()
    stages = [{"name": "segmentation", "epochs": 1, "train": "backbone"}]
    report = EpochReport(tmp_path, alpha=(2.0, 0.67), tensorboard=False)
    trainer, _, _ = make_trainer(stages, seg_loss=flaky_loss, handlers=[report], fused=fused)
    applied = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda e: applied.append(float(e.state.output["L_seg"])) if bool(e.state.output["finite"]) else None,
    )
    trainer.run()
    with open(tmp_path / "metrics.csv") as handle:
        row = next(csv.DictReader(handle))
    assert len(applied) == 2 and row["skipped_steps"] == "1"
    assert float(row["L_seg"]) == pytest.approx(sum(applied) / 2, rel=1e-5)


def test_epoch_report_without_tensorboard_warns_and_keeps_training(tmp_path, monkeypatch):
    """A missing (or broken) TensorBoard turns the TensorBoard scalars off with one warning; every epoch still
    reaches metrics.csv and the run completes."""
    import csv
    import sys

    from medsegdiff_monai.handlers import EpochReport

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    stages = [{"name": "segmentation", "epochs": 2, "train": "backbone"}]
    report = EpochReport(tmp_path, alpha=(2.0, 0.67), tensorboard=True)
    trainer, _, _ = make_trainer(stages, handlers=[report])
    with pytest.warns(UserWarning, match="TensorBoard scalars are off") as caught:
        trainer.run()
    assert sum("TensorBoard" in str(w.message) for w in caught) == 1
    with open(tmp_path / "metrics.csv") as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["1", "2"]
    assert not report.tensorboard and not (tmp_path / "tensorboard").exists()


def test_iteration_fires_monai_iteration_events_in_order():
    """A user handler on each of MONAI's IterationEvents sees the step's state at that point."""
    trainer, network, _ = make_trainer([{"name": "joint", "epochs": 1, "train": "all", "losses": ["seg", "grade"]}])
    trainer.state.epoch_length = 1  # one step
    seen = []
    weight = next(p for n, p in network.named_parameters() if n.endswith("weight") and p.ndim == 4)
    before = weight.detach().clone()

    def on_forward(engine):
        seg_logits, grade_logits, calib_map = engine.state.output["pred"]
        assert seg_logits.shape == (2, 3, SIZE, SIZE) and calib_map.shape == seg_logits.shape
        assert grade_logits.shape == (2, 2)
        assert engine.state.output["image"].shape == (2, 3, SIZE, SIZE)  # the noisy mask
        assert torch.equal(engine.state.output["label"]["grade"], torch.tensor([0, 1]))
        seen.append("forward")

    def on_loss(engine):
        assert engine.state.output["loss"].ndim == 0 and weight.grad is None
        seen.append("loss")

    def on_backward(engine):
        assert weight.grad is not None and torch.equal(weight.detach(), before)
        seen.append("backward")

    def on_model(engine):
        assert not torch.equal(weight.detach(), before)  # the optimizer stepped
        seen.append("model")

    for event, handler in (
        (IterationEvents.FORWARD_COMPLETED, on_forward),
        (IterationEvents.LOSS_COMPLETED, on_loss),
        (IterationEvents.BACKWARD_COMPLETED, on_backward),
        (IterationEvents.MODEL_COMPLETED, on_model),
    ):
        trainer.add_event_handler(event, handler)
    trainer.run()
    assert seen == ["forward", "loss", "backward", "model"]


def test_prepare_batch_noises_the_mask_as_ddpm_defines():
    """x_t = sqrt(abar_t) * mask + sqrt(1 - abar_t) * noise with the linear betas 1e-4 .. 0.02, computed by hand."""
    batch = make_batches(count=1)[0]
    prepare = NoisyMaskPrepareBatch(DDPMScheduler(num_train_timesteps=1000, prediction_type="sample"))
    torch.manual_seed(3)
    noisy, targets, (timesteps, image), kwargs = prepare(batch, "cpu")
    torch.manual_seed(3)
    expected_t = torch.randint(0, 1000, (2,))
    noise = torch.randn(2, 3, SIZE, SIZE)
    abar = torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[expected_t].view(-1, 1, 1, 1)
    mask = 2.0 * batch["label"].double() - 1.0
    expected = abar.sqrt() * mask + (1.0 - abar).sqrt() * noise.double()
    assert torch.equal(timesteps, expected_t) and kwargs == {}
    torch.testing.assert_close(noisy.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(image, batch["image"]) and torch.equal(targets["label"], batch["label"])
    assert targets["grade"].dtype == torch.long


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side copy stream exists on CUDA only")
@pytest.mark.parametrize("batch_on_gpu", [False, True])
def test_prepare_batch_side_stream_copy_is_ordered_before_the_step(batch_on_gpu):
    """A pinned host batch, with the side stream held up (a 50 ms spin queued on it before the copy), or a batch that
    the current stream writes on the GPU after a 50 ms spin: the step's kernels on the current stream see the batch
    complete either way. The outputs (channels-last image) equal those of the plain copy on the current stream, drawn
    from the same seed."""
    # pinned as a loader with pin_memory pins a batch: its tensors (the subject ids stay a list of str)
    host_batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in make_batches(count=1)[0].items()}
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="sample")
    side = NoisyMaskPrepareBatch(scheduler, torch.channels_last, copy_stream=True)
    # creates the side stream and leaves -7 in the blocks its pool hands out next (the same sizes), so that a read
    # before the copy lands cannot find the batch's values there by chance
    poison = {k: torch.full_like(v, -7).pin_memory() if torch.is_tensor(v) else v for k, v in host_batch.items()}
    side(poison, "cuda", non_blocking=True)
    torch.cuda.synchronize()
    outputs = []
    for prepare in (NoisyMaskPrepareBatch(scheduler, torch.channels_last, copy_stream=False), side):
        torch.cuda.manual_seed(5)
        if batch_on_gpu:  # GPU buffers holding -7 until the current stream, after its spin, writes the batch
            batch = {k: torch.full_like(v, -7, device="cuda") if torch.is_tensor(v) else v for k, v in poison.items()}
            torch.cuda.synchronize()
            torch.cuda._sleep(50_000_000)
            for key, value in batch.items():
                if torch.is_tensor(value):
                    value.copy_(host_batch[key], non_blocking=True)
        else:
            batch = host_batch
            with torch.cuda.stream(side._copy_streams[torch.device("cuda")]):
                torch.cuda._sleep(50_000_000)
        noisy, targets, (timesteps, image), _ = prepare(batch, "cuda", non_blocking=True)
        outputs.append([noisy.cpu(), targets["label"].cpu(), targets["grade"].cpu(), timesteps.cpu(), image.cpu()])
    for plain, copied in zip(*outputs, strict=True):
        assert torch.equal(plain, copied)
    assert torch.equal(outputs[1][4], host_batch["image"]) and torch.equal(outputs[1][2], host_batch["grade"])


def test_prepare_batch_weights_the_grade_on_tumour_bearing_slices():
    """grade_weight is 1 where any label region holds a voxel, 0 on a tumour-free slice; None when switched off."""
    batch = make_batches(count=1)[0]
    batch["label"] = batch["label"].clone()
    batch["label"][:] = 0
    batch["label"][0, 2, 3, 5] = 1  # one voxel of one region on slice 0, nothing on slice 1
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="sample")
    _, targets, _, _ = NoisyMaskPrepareBatch(scheduler)(batch, "cpu")
    assert targets["grade_weight"].tolist() == [1.0, 0.0]
    _, targets, _, _ = NoisyMaskPrepareBatch(scheduler, grade_tumour_slices_only=False)(batch, "cpu")
    assert targets["grade_weight"] is None


def test_initial_weights_load_before_the_first_step(tmp_path):
    """LoadNetworkWeights reads a multi-entry checkpoint of a compiled network into the trainer's network."""
    torch.manual_seed(1)
    trained = get_network("small").state_dict()
    path = tmp_path / "model.pt"
    torch.save({"network": {f"_orig_mod.{k}": v for k, v in trained.items()}, "optimizer": {}}, path)
    trainer, network, _ = make_trainer([{"name": "segmentation", "epochs": 1, "train": "backbone"}])
    LoadNetworkWeights(path, network).attach(trainer)
    loaded = {}

    def record_and_stop(engine):
        loaded.update({k: v.detach().clone() for k, v in network.state_dict().items()})
        engine.terminate()

    trainer.add_event_handler(Events.STARTED, record_and_stop)
    trainer.run()
    assert loaded.keys() == trained.keys()
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)


def test_old_keyword_names_of_the_engines():
    network = get_network("small")
    weighting = UncertaintyWeightedLoss(tasks=("seg", "grade"))
    grade_loss = GradeFocalLoss()
    with pytest.warns(DeprecationWarning, match="cls_loss= of DiffusionTrainer.__init__ is renamed grade_loss="):
        trainer = DiffusionTrainer(
            device="cpu",
            max_epochs=1,
            train_data_loader=make_batches(1),
            network=network,
            optimizer=build_optimizer(network, weighting, lr=1e-3),
            loss_function=weighting,
            seg_loss=SegmentationLoss(),
            cls_loss=grade_loss,
            noise_scheduler=DDPMScheduler(num_train_timesteps=1000, prediction_type="sample"),
        )
    assert trainer.grade_loss is grade_loss and trainer.stage.losses == ("seg", "grade")
    with pytest.warns(DeprecationWarning, match="use_cls_head= of validation_metrics is renamed use_grade_head="):
        assert "AUC" not in validation_metrics(3, use_cls_head=False)


def test_a_new_run_is_not_logged_as_resumed(caplog):
    """Ignite reads the max_epochs that MONAI's trainer sets on construction as a run to resume, and would log
    "resuming from iteration 0, epoch 0"; the trainer logs Ignite's words for a run that starts instead."""
    trainer, _, _ = make_trainer([{"name": "joint", "epochs": 1, "train": "all", "losses": ["seg", "grade"]}])
    with caplog.at_level("INFO", logger=trainer.logger.name):
        trainer.run()
    messages = [record.getMessage() for record in caplog.records if record.name == trainer.logger.name]
    assert "Engine run starting with max_epochs=1." in messages
    assert not any("resuming from iteration 0" in message for message in messages)
    # a true resumption, from a later iteration, keeps Ignite's message
    record = logging.LogRecord(trainer.logger.name, logging.INFO, __file__, 1, "%s", ("x",), None)
    record.msg, record.args = "Engine run resuming from iteration 12, epoch 4 until 16 epochs", None
    assert trainer.logger.filter(record) and record.getMessage().startswith("Engine run resuming from iteration 12")


@pytest.mark.parametrize("grad_clip_norm", [-1.0, 0.0, float("nan")])
def test_a_gradient_clip_norm_not_above_zero_is_refused(grad_clip_norm):
    """A negative norm would turn clip_grad_norm_'s factor negative and reverse the gradients; 0 zeroes them."""
    with pytest.raises(
        ValueError, match=rf"grad_clip_norm must be above 0, or None for no clipping; got {grad_clip_norm}"
    ):
        make_trainer([{"name": "joint", "epochs": 1, "train": "all"}], grad_clip_norm=grad_clip_norm)
