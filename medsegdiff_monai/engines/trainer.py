"""Ignite/MONAI trainer for the conditional diffusion segmentation + grading network."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from ignite.engine import EventEnum, Events
from monai.engines import SupervisedTrainer
from monai.networks.schedulers import Scheduler
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from medsegdiff_monai.engines.stages import TrainingStage
from medsegdiff_monai.utils import parse_amp_dtype, unwrap_module

__all__ = ["DiffusionTrainer", "NonFiniteLossEvents"]


class NonFiniteLossEvents(EventEnum):
    """Fired by :class:`DiffusionTrainer` when a step is skipped because its loss or gradient norm is not finite."""

    STEP_SKIPPED = "step_skipped"


class _PendingFiniteFlag(NamedTuple):
    """The finite flag of an applied-or-skipped step, on its way to the host (pinned copy + event on CUDA)."""

    finite: torch.Tensor
    ready: torch.cuda.Event | None
    epoch: int
    iteration: int


class DiffusionTrainer(SupervisedTrainer):
    """One diffusion training step per iteration, on MONAI's :class:`~monai.engines.SupervisedTrainer`.

    Each iteration: draw ``t ~ U{0, T-1}`` and Gaussian noise, noise the [-1, 1] mask with ``noise_scheduler``
    (``x_t = add_noise(mask, noise, t)``), predict ``(seg_logits, cls_logits, calib_map) = network(x_t, t, image)``
    (through ``inferer``, MONAI's ``SimpleInferer`` by default),
    apply the losses of the current :attr:`stage`, clip the gradient norm, step the optimizer. A step whose loss or
    gradient norm is not finite is skipped (no update), counted in ``engine.state.skipped_steps`` and
    ``engine.state.consecutive_skipped_steps`` and announced with :attr:`NonFiniteLossEvents.STEP_SKIPPED`
    (``engine.state.skipped_step`` then holds the skipped step's ``(epoch, iteration)``).

    No host synchronisation in the loop: with an optimizer that takes a ``found_inf`` flag (fused AdamW, as
    :func:`~medsegdiff_monai.engines.build_optimizer` builds on CUDA) the skip happens on the device, and the host
    learns of it one iteration later, while the GPU already runs the next step (the skip is then announced during the
    next iteration, or at the end of the epoch for the last step). Other optimizers, and float16 with its gradient
    scaler, check the flag at once (one synchronisation per step). The iteration output's ``"finite"`` (a 0-d bool
    tensor on the device) tells whether that step was applied.

    Batch keys: ``"image"`` (B, 4, H, W), ``"label"`` (B, C_mask, H, W) regions in {0, 1}, ``"mask"`` (B, C_mask, H, W)
    in [-1, 1] (derived from ``"label"`` when absent), ``"grade"`` (B,) 0 = LGG, 1 = HGG.

    Args:
        device: where to train.
        max_epochs: epochs of the run (normally the sum over the stage plan).
        train_data_loader: loader of 2D slice batches.
        network: a :class:`~medsegdiff_monai.networks.DiffusionUNetWithClsHead` (optionally DDP-wrapped).
        optimizer: built over the network and ``loss_function`` parameters.
        loss_function: the :class:`~medsegdiff_monai.losses.UncertaintyWeightedLoss` holding the log-sigmas.
        seg_loss: ``seg_loss(seg_logits, label, calib_map) -> Tensor``.
        cls_loss: ``cls_loss(cls_logits, grade) -> Tensor``, or None for a segmentation-only network.
        noise_scheduler: MONAI DDPM scheduler used to noise the mask (``prediction_type="sample"``).
        stage: the initial stage; :class:`~medsegdiff_monai.handlers.StagedTraining` replaces it per epoch. None means
            everything trains with all available losses under uncertainty weighting.
        amp_dtype: "bfloat16" or "float16" autocast on CUDA (fp16 adds a gradient scaler); ignored on CPU.
        grad_clip_norm: maximum gradient norm (None disables clipping).
        channels_last: convert 4D inputs to channels-last memory format (pair with a channels-last network).
        non_blocking: copy batches to the device asynchronously (pair with a ``pin_memory=True`` loader): a blocking
            copy waits for the previous step's GPU work; measured 10 % faster steps on an H100
            (docs/performance.md).
        kwargs: passed to :class:`~monai.engines.SupervisedTrainer` (``inferer``, ``epoch_length``, ``train_handlers``,
            ``key_train_metric``, ``additional_metrics``, ``compile``, ...).
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Any,
        network: torch.nn.Module,
        optimizer: Optimizer,
        loss_function: torch.nn.Module,
        seg_loss: Callable,
        cls_loss: Callable | None,
        noise_scheduler: Scheduler,
        stage: TrainingStage | None = None,
        amp_dtype: str | None = None,
        grad_clip_norm: float | None = 1.0,
        channels_last: bool = False,
        non_blocking: bool = True,
        train_handlers: Sequence | None = None,
        **kwargs: Any,
    ) -> None:
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
            event_names=[NonFiniteLossEvents, *(kwargs.pop("event_names", None) or [])],
            **kwargs,
        )
        self.seg_loss = seg_loss
        self.cls_loss = cls_loss
        self.noise_scheduler = noise_scheduler
        losses = ("seg", "cls") if cls_loss is not None else ("seg",)
        self.stage = stage or TrainingStage("joint", max_epochs, "all", 1.0, losses, True)
        # mixed precision on CUDA only: CPU training runs in fp32 whatever is asked
        autocast_dtype = parse_amp_dtype(amp_dtype)
        self.autocast_dtype = autocast_dtype if torch.device(device).type == "cuda" else None
        self.grad_scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        self.grad_clip_norm = grad_clip_norm
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
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
        self._pending_flags.append(_PendingFiniteFlag(finite, ready, self.state.epoch, self.state.iteration))

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
            self.fire_event(NonFiniteLossEvents.STEP_SKIPPED)

    @property
    def unwrapped_network(self) -> torch.nn.Module:
        """The network without its DDP / compile wrapper."""
        return unwrap_module(self.network)

    def set_train_mode(self) -> None:
        """Train mode for the parts the current stage trains; eval mode (frozen norm/dropout) for the rest."""
        net = self.unwrapped_network
        net.train()
        head = getattr(net, "cls_head", None)
        if self.stage.train == "cls_head":
            net.eval()
            if head is not None:
                head.train()
        elif self.stage.train == "backbone" and head is not None:
            head.eval()

    def _to_device(self, tensor: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        tensor = tensor.as_tensor() if hasattr(tensor, "as_tensor") else torch.as_tensor(tensor)
        return tensor.to(self.state.device, non_blocking=self.non_blocking, **kwargs)

    def _forward_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Noise the mask, run the network and return the stage's loss terms (``"seg"``, ``"cls"``)."""
        image = self._to_device(batch["image"], memory_format=self.memory_format)
        label = self._to_device(batch["label"]).float()
        mask = self._to_device(batch["mask"]).float() if "mask" in batch else 2.0 * label - 1.0
        losses: dict[str, torch.Tensor] = {}
        use_seg = "seg" in self.stage.losses
        use_cls = "cls" in self.stage.losses and self.cls_loss is not None
        grade = self._to_device(batch["grade"]).long().view(-1) if use_cls else None
        if not use_seg and not isinstance(self.network, DistributedDataParallel):
            # the grade needs only the condition UNet: skip the diffusion UNet entirely
            cls_logits = self.unwrapped_network.encode_condition(image).cls_logits
            losses["cls"] = self.cls_loss(cls_logits.float(), grade)
            return losses
        timesteps = torch.randint(
            0, self.noise_scheduler.num_train_timesteps, (image.shape[0],), device=image.device, dtype=torch.long
        )
        noise = torch.randn_like(mask)
        noisy_mask = self.noise_scheduler.add_noise(original_samples=mask, noise=noise, timesteps=timesteps)
        seg_logits, cls_logits, calib_map = self.inferer(
            noisy_mask.to(memory_format=self.memory_format), self.network, timesteps, image
        )
        if use_seg:
            losses["seg"] = self.seg_loss(seg_logits.float(), label, calib_map.float())
        if use_cls:
            losses["cls"] = self.cls_loss(cls_logits.float(), grade)
        return losses

    def _iteration(self, engine: DiffusionTrainer, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        engine.set_train_mode()
        engine.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(
            device_type=torch.device(engine.state.device).type,
            dtype=engine.autocast_dtype or torch.float32,
            enabled=engine.autocast_dtype is not None,
        ):
            losses = engine._forward_losses(batchdata)
        if engine.stage.uncertainty_weighting:
            total = engine.loss_function(losses)
        else:
            total = torch.stack(list(losses.values())).sum()

        params = [p for group in engine.optimizer.param_groups for p in group["params"] if p.requires_grad]
        if engine.grad_scaler is not None:
            engine.grad_scaler.scale(total).backward()
            engine.grad_scaler.unscale_(engine.optimizer)
        else:
            total.backward()
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(params, engine.grad_clip_norm, foreach=True)
            if engine.grad_clip_norm is not None
            else torch.zeros((), device=total.device)
        )
        finite = torch.isfinite(total.detach()) & torch.isfinite(grad_norm)
        engine._optimizer_step(finite)

        nan = torch.full((), float("nan"), device=total.device)
        return {
            "loss": total.detach(),
            "L_seg": losses["seg"].detach() if "seg" in losses else nan,
            "L_cls": losses["cls"].detach() if "cls" in losses else nan,
            "L_total": total.detach(),
            "grad_norm": grad_norm.detach(),
            "finite": finite,
        }

    def _optimizer_step(self, finite: torch.Tensor) -> None:
        """Apply the step only where ``finite`` (0-d bool tensor) holds; queue or resolve the flag."""
        if self.grad_scaler is None and getattr(self.optimizer, "_step_supports_amp_scaling", False):
            # fused optimizers skip the update (and undo their step count) on the device when found_inf is 1
            self.optimizer.found_inf = (~finite).float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
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
