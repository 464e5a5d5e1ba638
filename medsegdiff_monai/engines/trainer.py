"""Ignite/MONAI trainer for the conditional diffusion segmentation + grading network."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from ignite.engine import EventEnum, Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import DiffusionPrepareBatch, IterationEvents
from monai.networks.schedulers import Scheduler
from monai.utils import CommonKeys as Keys
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from medsegdiff_monai.engines.stages import TrainingStage
from medsegdiff_monai.utils import parse_amp_dtype, renamed_args, unwrap_module

__all__ = ["DiffusionTrainer", "NoisyMaskPrepareBatch", "NonFiniteLossEvents"]


class NonFiniteLossEvents(EventEnum):
    """Fired by :class:`DiffusionTrainer` when a step is skipped because its loss or gradient norm is not finite."""

    STEP_SKIPPED = "step_skipped"


class _PendingFiniteFlag(NamedTuple):
    """The finite flag of an applied-or-skipped step, on its way to the host (pinned copy + event on CUDA)."""

    finite: torch.Tensor
    ready: torch.cuda.Event | None
    epoch: int
    iteration: int
    subject_ids: Any  # the batch's "subject_id" as collated (a list of str), read only when the step was skipped


_FRESH_RUN = re.compile(r"Engine run resuming from iteration 0, epoch 0 until (\d+) epochs")


def _fresh_run_message(record: logging.LogRecord) -> bool:
    """Log filter: Ignite's "Engine run resuming from iteration 0, epoch 0" becomes its words for a run that starts.
    MONAI's trainers set ``max_epochs`` in their state on construction, which Ignite reads as a run to resume; a
    checkpoint to resume from is loaded only later, at ``Events.STARTED``, and logged then."""
    found = _FRESH_RUN.fullmatch(record.getMessage())
    if found:
        record.msg, record.args = f"Engine run starting with max_epochs={found.group(1)}.", None
    return True


def _to_device(tensor: Any, device: str | torch.device | None, non_blocking: bool, **kwargs: Any) -> torch.Tensor:
    """A plain tensor (MetaTensor metadata dropped) on ``device``; ``kwargs`` go to ``Tensor.to``."""
    tensor = tensor.as_tensor() if hasattr(tensor, "as_tensor") else torch.as_tensor(tensor)
    return tensor.to(device, non_blocking=non_blocking, **kwargs)


class NoisyMaskPrepareBatch(DiffusionPrepareBatch):
    """MONAI's :class:`~monai.engines.utils.DiffusionPrepareBatch` for a mask diffusion conditioned on the image.

    Moves a batch to the device, draws ``t ~ U{0, T-1}`` (:meth:`get_timesteps`) and Gaussian noise
    (:meth:`get_noise`) per sample, and noises the [-1, 1] mask with the training scheduler:
    ``x_t = noise_scheduler.add_noise(mask, noise, t)``. Returns ``(x_t, targets, (t, image), {})``, the
    ``(inputs, targets, args, kwargs)`` of MONAI's trainers, so that the trainer's inferer calls
    ``network(x_t, t, image)``.

    Batch keys: ``"image"`` (B, 4, H, W), ``"label"`` (B, C_mask, H, W) regions in {0, 1}, ``"mask"`` (B, C_mask,
    H, W) in [-1, 1] (``2 * label - 1`` when absent), ``"grade"`` (B,) 0 = LGG, 1 = HGG (optional). ``targets`` is
    ``{"label": float label, "grade": long (B,) grade or None, "grade_weight": float (B,) or None}``.

    Args:
        noise_scheduler: the MONAI scheduler of training (``num_train_timesteps``, ``add_noise``).
        memory_format: memory format of the image and the noisy mask (``torch.channels_last`` for a channels-last
            network).
        grade_tumour_slices_only: weight the grade loss by ``grade_weight`` = 1 on slices whose label holds tumour
            (any region) and 0 on the others. A subject's grade is read from the slices where tumour is found
            (:func:`~medsegdiff_monai.inferers.subject_p_hgg`), and a slice without tumour carries no evidence of
            it, so the head learns on the slices it is read on. False: every slice counts (``grade_weight`` None).
        copy_stream: with ``non_blocking`` copies of a host batch to a CUDA device, issue them on a side stream that
            the current stream then waits for: the host, running ahead of the GPU, starts the next batch's copy
            while the GPU still computes the previous step, instead of queueing it behind that step's kernels. A
            batch already on the GPU stays on the current stream.
    """

    def __init__(
        self,
        noise_scheduler: Scheduler,
        memory_format: torch.memory_format = torch.contiguous_format,
        grade_tumour_slices_only: bool = True,
        copy_stream: bool = True,
    ) -> None:
        super().__init__(num_train_timesteps=noise_scheduler.num_train_timesteps, condition_name="image")
        self.noise_scheduler = noise_scheduler
        self.memory_format = memory_format
        self.grade_tumour_slices_only = grade_tumour_slices_only
        self.copy_stream = copy_stream
        self._copy_streams: dict[torch.device, torch.cuda.Stream] = {}

    def _batch_to_device(
        self, batchdata: dict[str, torch.Tensor], device: str | torch.device | None, non_blocking: bool, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The batch's image, float label, float mask (None when absent) and long (B,) grade (None when absent) on
        ``device``, copied on the side stream where ``copy_stream`` applies."""

        def copy() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
            image = _to_device(batchdata["image"], device, non_blocking, memory_format=self.memory_format, **kwargs)
            label = _to_device(batchdata["label"], device, non_blocking, **kwargs).float()
            mask = (
                _to_device(batchdata["mask"], device, non_blocking, **kwargs).float() if "mask" in batchdata else None
            )
            grade = batchdata.get("grade")
            if grade is not None:
                grade = _to_device(grade, device, non_blocking, **kwargs).long().view(-1)
            return image, label, mask, grade

        target = torch.device(device) if device is not None else None
        sources = [batchdata[key] for key in ("image", "label", "mask", "grade") if key in batchdata]
        from_host = all(not isinstance(source, torch.Tensor) or source.device.type == "cpu" for source in sources)
        # a batch already on the GPU (written by the current stream's queued work) is converted where it was written
        if not (self.copy_stream and non_blocking and from_host and target is not None and target.type == "cuda"):
            return copy()
        side = self._copy_streams.get(target)
        if side is None:
            side = self._copy_streams[target] = torch.cuda.Stream(target)
        current = torch.cuda.current_stream(target)
        with torch.cuda.stream(side):
            tensors = copy()
        current.wait_stream(side)
        for tensor in tensors:
            if tensor is not None:
                tensor.record_stream(current)  # allocated on the side stream, used on the current one
        return tensors

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor], dict]:
        image, label, mask, grade = self._batch_to_device(batchdata, device, non_blocking, **kwargs)
        if mask is None:
            mask = 2.0 * label - 1.0
        timesteps = self.get_timesteps(mask)
        noise = self.get_noise(mask)
        noisy_mask = self.noise_scheduler.add_noise(original_samples=mask, noise=noise, timesteps=timesteps)
        grade_weight = None
        if grade is not None and self.grade_tumour_slices_only:
            grade_weight = (label.flatten(1).amax(dim=1) > 0).float()
        targets = {"label": label, "grade": grade, "grade_weight": grade_weight}
        return noisy_mask.to(memory_format=self.memory_format), targets, (timesteps, image), {}


class DiffusionTrainer(SupervisedTrainer):
    """One diffusion training step per iteration, on MONAI's :class:`~monai.engines.SupervisedTrainer`.

    Each iteration runs MONAI's trainer steps: ``prepare_batch`` (by default :class:`NoisyMaskPrepareBatch`: draw
    ``t ~ U{0, T-1}`` and Gaussian noise, noise the [-1, 1] mask with ``noise_scheduler``), the ``inferer`` (by
    default ``network(x_t, t, image) -> (seg_logits, grade_logits, calib_map)``), the losses of the current
    :attr:`stage`, backward, gradient clipping, the optimizer step. It fires MONAI's
    :class:`~monai.engines.utils.IterationEvents` as :class:`~monai.engines.SupervisedTrainer` does:
    ``FORWARD_COMPLETED`` (``engine.state.output`` holds ``"image"`` = x_t, ``"label"`` = the targets dict and
    ``"pred"`` = the network's tuple), ``LOSS_COMPLETED`` (``"loss"``), ``BACKWARD_COMPLETED`` and
    ``MODEL_COMPLETED`` (after the optimizer step). A stage without the segmentation loss runs only the condition
    UNet (``pred`` is then ``(None, grade_logits, None)``). A step whose loss or
    gradient norm is not finite is skipped (no update), counted in ``engine.state.skipped_steps`` and
    ``engine.state.consecutive_skipped_steps`` and announced with :attr:`NonFiniteLossEvents.STEP_SKIPPED`
    (``engine.state.skipped_step`` then holds the skipped step's ``(epoch, iteration)``, and
    ``engine.state.skipped_subject_ids`` the ``subject_id`` of each slice of its batch).

    No host synchronisation in the loop: with an optimizer that takes a ``found_inf`` flag (fused AdamW, as
    :func:`~medsegdiff_monai.engines.build_optimizer` builds on CUDA) the skip happens on the device, and the host
    learns of it one iteration later, while the GPU already runs the next step (the skip is then announced during the
    next iteration, or at the end of the epoch for the last step); such an optimizer also applies the clipping, as the
    ``grad_scale`` it divides each gradient by while reading it, so no pass over the gradients scales them first.
    Other optimizers, and float16 with its gradient scaler, clip with ``clip_grad_norm_`` and check the flag at once
    (one synchronisation per step). The iteration output's ``"finite"`` (a 0-d bool
    tensor on the device) tells whether that step was applied.

    Batch keys: those of :class:`NoisyMaskPrepareBatch`.

    Args:
        device: where to train.
        max_epochs: epochs of the run (normally the sum over the stage plan).
        train_data_loader: loader of 2D slice batches.
        network: a :class:`~medsegdiff_monai.networks.DiffusionUNetWithGradeHead` (optionally DDP-wrapped).
        optimizer: built over the network and ``loss_function`` parameters.
        loss_function: the :class:`~medsegdiff_monai.losses.UncertaintyWeightedLoss` holding the log-sigmas.
        seg_loss: ``seg_loss(seg_logits, label, calib_map) -> Tensor``.
        grade_loss: ``grade_loss(grade_logits, grade, sample_weight) -> Tensor`` (``sample_weight`` the targets'
            ``"grade_weight"``, possibly None), or None for a segmentation-only network (its old name ``cls_loss=``
            is accepted, with a ``DeprecationWarning``, for one release).
        noise_scheduler: MONAI DDPM scheduler used to noise the mask (``prediction_type="sample"``).
        stage: the initial stage; :class:`~medsegdiff_monai.handlers.StagedTraining` replaces it per epoch. None means
            everything trains with all available losses under uncertainty weighting.
        amp_dtype: "bfloat16" or "float16" autocast on CUDA (fp16 adds a gradient scaler); ignored on CPU.
        grad_clip_norm: maximum gradient norm (None disables clipping).
        channels_last: convert 4D inputs to channels-last memory format (pair with a channels-last network).
        non_blocking: copy batches to the device asynchronously (pair with a ``pin_memory=True`` loader): a blocking
            copy waits for the previous step's GPU work.
        grade_tumour_slices_only: the grade loss on tumour-bearing slices only (see :class:`NoisyMaskPrepareBatch`);
            used when ``prepare_batch`` is None.
        prepare_batch: MONAI prepare-batch callable returning ``(inputs, targets, args, kwargs)`` as
            :class:`NoisyMaskPrepareBatch` does (``targets`` a dict of ``"label"`` and ``"grade"``, ``args`` the
            timesteps and the image); None builds :class:`NoisyMaskPrepareBatch` over ``noise_scheduler``
            (in the channels-last format when ``channels_last``).
        kwargs: passed to :class:`~monai.engines.SupervisedTrainer` (``epoch_length``, ``train_handlers``,
            ``key_train_metric``, ``additional_metrics``, ``inferer``, ``compile``, ...).
    """

    @renamed_args(cls_loss="grade_loss")
    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Any,
        network: torch.nn.Module,
        optimizer: Optimizer,
        loss_function: torch.nn.Module,
        seg_loss: Callable,
        grade_loss: Callable | None,
        noise_scheduler: Scheduler,
        stage: TrainingStage | None = None,
        amp_dtype: str | None = None,
        grad_clip_norm: float | None = 1.0,
        channels_last: bool = False,
        non_blocking: bool = True,
        grade_tumour_slices_only: bool = True,
        prepare_batch: Callable | None = None,
        train_handlers: Sequence | None = None,
        **kwargs: Any,
    ) -> None:
        if grad_clip_norm is not None and not grad_clip_norm > 0:  # a negative norm would reverse the gradients
            raise ValueError(f"grad_clip_norm must be above 0, or None for no clipping; got {grad_clip_norm}.")
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            amp=False,
            optim_set_to_none=True,
            decollate=False,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch
            or NoisyMaskPrepareBatch(noise_scheduler, memory_format, grade_tumour_slices_only=grade_tumour_slices_only),
            event_names=[NonFiniteLossEvents, *(kwargs.pop("event_names", None) or [])],
            **kwargs,
        )
        self.seg_loss = seg_loss
        self.grade_loss = grade_loss
        self.noise_scheduler = noise_scheduler
        losses = ("seg", "grade") if grade_loss is not None else ("seg",)
        self.stage = stage or TrainingStage("joint", max_epochs, "all", 1.0, losses, True)
        # mixed precision on CUDA only: CPU training runs in fp32 whatever is asked
        autocast_dtype = parse_amp_dtype(amp_dtype)
        self.autocast_dtype = autocast_dtype if torch.device(device).type == "cuda" else None
        self.grad_scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        self.grad_clip_norm = grad_clip_norm
        if _fresh_run_message not in self.logger.filters:
            self.logger.addFilter(_fresh_run_message)
        self._pending_flags: list[_PendingFiniteFlag] = []
        self._reset_skip_counts()
        # registered before the train handlers, so that they see the epoch's skipped steps complete
        self.add_event_handler(Events.STARTED, self._reset_skip_counts)
        self.add_event_handler(Events.EPOCH_STARTED, self._reset_epoch_skip_count)
        self.add_event_handler(Events.EPOCH_COMPLETED, self.resolve_skipped_steps)
        self.add_event_handler(Events.COMPLETED, self.resolve_skipped_steps)
        if train_handlers is not None:
            self._register_handlers(train_handlers)

    def _reset_skip_counts(self, *_: Any) -> None:
        self._pending_flags.clear()
        self.state.skipped_steps = 0
        self.state.epoch_skipped_steps = 0
        self.state.consecutive_skipped_steps = 0
        self.state.skipped_step = None
        self.state.skipped_subject_ids = ()

    def _reset_epoch_skip_count(self, *_: Any) -> None:
        self.state.epoch_skipped_steps = 0

    def _queue_finite_flag(self, finite: torch.Tensor) -> None:
        """Start the copy of a step's finite flag to the host, without waiting for it."""
        ready = None
        if finite.is_cuda:
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(finite, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            finite = host
        batch = self.state.batch
        subject_ids = batch.get("subject_id", ()) if isinstance(batch, dict) else ()
        self._pending_flags.append(
            _PendingFiniteFlag(finite, ready, self.state.epoch, self.state.iteration, subject_ids)
        )

    def resolve_skipped_steps(self, *_: Any, keep_latest: bool = False) -> None:
        """Read the queued finite flags (waiting only for the steps they belong to), count and announce the skips.

        Args:
            keep_latest: leave the newest flag queued (its step may still be running on the GPU).
        """
        while len(self._pending_flags) > int(keep_latest):
            pending = self._pending_flags.pop(0)
            if pending.ready is not None:
                pending.ready.synchronize()
            if bool(pending.finite):
                self.state.consecutive_skipped_steps = 0
                continue
            self.state.skipped_steps += 1
            self.state.epoch_skipped_steps += 1
            self.state.consecutive_skipped_steps += 1
            self.state.skipped_step = (pending.epoch, pending.iteration)
            subject_ids = pending.subject_ids
            self.state.skipped_subject_ids = tuple(
                map(str, [subject_ids] if isinstance(subject_ids, str) else subject_ids)
            )
            self.fire_event(NonFiniteLossEvents.STEP_SKIPPED)

    @property
    def unwrapped_network(self) -> torch.nn.Module:
        """The network without its DDP / compile wrapper."""
        return unwrap_module(self.network)

    def set_train_mode(self) -> None:
        """Train mode for the parts the current stage trains; eval mode (frozen norm/dropout) for the rest."""
        net = self.unwrapped_network
        net.train()
        head = getattr(net, "grade_head", None)
        if self.stage.train == "grade_head":
            net.eval()
            if head is not None:
                head.train()
        elif self.stage.train == "backbone" and head is not None:
            head.eval()

    def _forward_losses(
        self, inputs: torch.Tensor, targets: dict[str, torch.Tensor | None], args: tuple, kwargs: dict
    ) -> dict[str, torch.Tensor]:
        """Run the network on the prepared batch and return the stage's loss terms (``"seg"``, ``"grade"``).

        Fires ``IterationEvents.FORWARD_COMPLETED`` once ``engine.state.output["pred"]`` holds the network's output.
        """
        losses: dict[str, torch.Tensor] = {}
        use_seg = "seg" in self.stage.losses
        use_grade = "grade" in self.stage.losses and self.grade_loss is not None
        if not use_seg and not isinstance(self.network, DistributedDataParallel):
            # the grade needs only the condition UNet: skip the diffusion UNet entirely
            image = args[1]  # the prepared (timesteps, image)
            grade_logits = self.unwrapped_network.encode_condition(image).grade_logits
            self.state.output[Keys.PRED] = (None, grade_logits, None)
        else:
            seg_logits, grade_logits, calib_map = self.state.output[Keys.PRED] = self.inferer(
                inputs, self.network, *args, **kwargs
            )
        self.fire_event(IterationEvents.FORWARD_COMPLETED)
        if use_seg:  # the full network ran
            losses["seg"] = self.seg_loss(seg_logits.float(), targets["label"], calib_map.float())
        if use_grade:
            losses["grade"] = self.grade_loss(grade_logits.float(), targets["grade"], targets.get("grade_weight"))
        return losses

    def _iteration(self, engine: DiffusionTrainer, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        inputs, targets, args, kwargs = engine.prepare_batch(
            batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs
        )
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        engine.set_train_mode()
        engine.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(
            device_type=torch.device(engine.state.device).type,
            dtype=engine.autocast_dtype or torch.float32,
            enabled=engine.autocast_dtype is not None,
        ):
            losses = engine._forward_losses(inputs, targets, args, kwargs)
        if engine.stage.uncertainty_weighting:
            total = engine.loss_function(losses)
        else:
            total = torch.stack(list(losses.values())).sum()
        engine.state.output[Keys.LOSS] = total
        engine.fire_event(IterationEvents.LOSS_COMPLETED)

        params = [p for group in engine.optimizer.param_groups for p in group["params"] if p.requires_grad]
        if engine.grad_scaler is not None:
            engine.grad_scaler.scale(total).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.grad_scaler.unscale_(engine.optimizer)
        else:
            total.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if engine.grad_clip_norm is None:
            grad_norm = torch.zeros((), device=total.device)
        elif engine._fuses_step_checks():
            # the fused optimizer scales the gradients as it reads them (see _optimizer_step): no pass over them here
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, engine.grad_clip_norm, foreach=True)
        finite = torch.isfinite(total.detach()) & torch.isfinite(grad_norm)
        engine._optimizer_step(finite, grad_norm)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)

        # the step's output: loss terms only (the network's outputs are not kept past the step)
        nan = torch.full((), float("nan"), device=total.device)
        return {
            Keys.LOSS: total.detach(),
            "L_seg": losses["seg"].detach() if "seg" in losses else nan,
            "L_grade": losses["grade"].detach() if "grade" in losses else nan,
            "L_total": total.detach(),
            "grad_norm": grad_norm.detach(),
            "finite": finite,
        }

    def _fuses_step_checks(self) -> bool:
        """Whether the optimizer takes the clipping and the non-finite check into its own kernel (fused AdamW's
        ``grad_scale`` and ``found_inf``), which it does unless float16's gradient scaler holds them."""
        return self.grad_scaler is None and getattr(self.optimizer, "_step_supports_amp_scaling", False)

    def _optimizer_step(self, finite: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Apply the step only where ``finite`` (0-d bool tensor) holds; queue or resolve the flag. ``grad_norm``: the
        gradients' total norm, already clipped to unless the optimizer fuses the clipping."""
        if self._fuses_step_checks():
            # fused optimizers skip the update (and undo their step count) on the device when found_inf is 1, and
            # divide every gradient by grad_scale as they read it: clip_grad_norm_'s factor
            # min(1, max_norm / (norm + 1e-6)) as that divisor
            self.optimizer.found_inf = (~finite).float()
            if self.grad_clip_norm is not None:
                self.optimizer.grad_scale = torch.clamp((grad_norm.float() + 1e-6) / self.grad_clip_norm, min=1.0)
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
                if self.grad_clip_norm is not None:
                    del self.optimizer.grad_scale
            self._queue_finite_flag(finite)
            self.resolve_skipped_steps(keep_latest=True)
            return
        applied = bool(finite)  # one host synchronisation
        if self.grad_scaler is not None:
            if applied:
                self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        elif applied:
            self.optimizer.step()
        if not applied:
            self.optimizer.zero_grad(set_to_none=True)
        self._queue_finite_flag(torch.tensor(applied))
        self.resolve_skipped_steps()
