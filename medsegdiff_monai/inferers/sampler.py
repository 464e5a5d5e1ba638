"""Few-step diffusion sampling of segmentation masks with an ensemble run as one batch."""

from __future__ import annotations

import contextlib
import functools
import numbers
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, Scheduler
from monai.networks.schedulers.scheduler import NoiseSchedules
from torch import Tensor, nn

from medsegdiff_monai.inferers.schedulers import DPMSolverMultistepScheduler, leading_timesteps, share_noise_schedule
from medsegdiff_monai.utils import parameter_names, parse_amp_dtype, quoted_names

__all__ = [
    "SAMPLING_SCHEDULERS",
    "DiffusionSampler",
    "SamplerOutput",
    "check_noise_schedule",
    "make_sampling_scheduler",
    "repeat_condition",
]

# the ``scheduler`` names of :class:`DiffusionSampler` and the scheduler each builds
_SCHEDULER_CLASSES: dict[str, Callable[..., Scheduler]] = {
    "ddim": DDIMScheduler,
    "dpmpp_2m": functools.partial(DPMSolverMultistepScheduler, solver_order=2),
    "dpmpp_3m": functools.partial(DPMSolverMultistepScheduler, solver_order=3),
    "ddpm": DDPMScheduler,
}
SAMPLING_SCHEDULERS = tuple(_SCHEDULER_CLASSES)
# those that run 1 to T steps and take an ``eta``; "ddpm" runs all T steps
_FEW_STEP_SCHEDULERS = tuple(name for name in SAMPLING_SCHEDULERS if name != "ddpm")


# torch.compile'd ``denoise`` per network class, shared by every sampler of the process (one compilation per shape)
_COMPILED_DENOISE: dict[Callable, Callable] = {}


class SamplerOutput(NamedTuple):
    """What :class:`DiffusionSampler` returns for a batch of ``B`` slices, ``C`` mask channels, ``K`` members.

    Attributes:
        probs: (B, C, H, W) mean of the members' probabilities ``sigmoid(seg_logits)`` at the last step.
        uncertainty: (B, C, H, W) per-voxel standard deviation of the members' probabilities (population std,
            0 when all members agree or ``K == 1``).
        member_probs: (K, B, C, H, W) every member's probabilities, or ``None`` unless ``return_members=True``.
        p_hgg: (B,) softmax probability of class 1 (HGG) from the grade head, or ``None`` without the head.
        calib_probs: (B, C, H, W) ``sigmoid(calib_map)``, the deterministic segmentation from the image alone.
    """

    probs: Tensor
    uncertainty: Tensor
    member_probs: Tensor | None
    p_hgg: Tensor | None
    calib_probs: Tensor


def make_sampling_scheduler(
    name: str,
    num_inference_steps: int,
    num_train_timesteps: int = 1000,
    schedule: str = "linear_beta",
    schedule_args: dict | None = None,
    noise_scheduler: Scheduler | None = None,
    scheduler_args: dict | None = None,
) -> Scheduler:
    """
    The MONAI scheduler of one of :data:`SAMPLING_SCHEDULERS` for an x0-predicting network, timesteps set.

    DDIM takes the timesteps of :func:`~medsegdiff_monai.inferers.schedulers.leading_timesteps`, DPM-Solver++(2M)
    and (3M) by default those evenly spaced in log signal-to-noise ratio, DDPM every timestep.

    Args:
        name: ``"ddim"`` (:class:`~monai.networks.schedulers.DDIMScheduler`), ``"dpmpp_2m"`` and ``"dpmpp_3m"``
            (:class:`~medsegdiff_monai.inferers.schedulers.DPMSolverMultistepScheduler`, second and third order)
            or ``"ddpm"`` (:class:`~monai.networks.schedulers.DDPMScheduler`, all ``num_train_timesteps`` steps).
        num_inference_steps: reverse steps ``N``: ``[1, T]``, exactly ``T`` for ``"ddpm"``.
        num_train_timesteps: ``T``; with ``noise_scheduler``, its own.
        schedule: MONAI noise schedule name (ignored with ``noise_scheduler``).
        schedule_args: arguments of the schedule function (ignored with ``noise_scheduler``).
        noise_scheduler: the training scheduler; its noise schedule (betas, alphas, cumulative alphas) is copied,
            so training and sampling share one definition.
        scheduler_args: further arguments of the scheduler class (e.g. ``{"timestep_spacing": "leading"}`` for
            ``"dpmpp_2m"``).

    Raises:
        ValueError: an unknown name, schedule or argument, or an unsupported step count, listing the valid ones.
    """
    if noise_scheduler is not None:
        num_train_timesteps = noise_scheduler.num_train_timesteps
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, numbers.Integral):
        raise ValueError(f"num_inference_steps must be a whole number of steps, got {num_inference_steps!r}.")
    if name not in SAMPLING_SCHEDULERS:
        raise ValueError(f"scheduler must be one of {', '.join(map(repr, SAMPLING_SCHEDULERS))}, got {name!r}.")
    if name == "ddpm" and num_inference_steps != num_train_timesteps:
        raise ValueError(
            f"scheduler='ddpm' runs all num_train_timesteps={num_train_timesteps} steps, got "
            f"num_inference_steps={num_inference_steps}; use {quoted_names(_FEW_STEP_SCHEDULERS, 'or')} for 1 to "
            f"{num_train_timesteps} steps."
        )
    timesteps = leading_timesteps(num_inference_steps, num_train_timesteps)  # checks the step count
    kwargs = {**(schedule_args or {}), **(scheduler_args or {})}
    _check_scheduler_arguments(name, schedule, kwargs)
    scheduler = _SCHEDULER_CLASSES[name](num_train_timesteps, schedule, prediction_type="sample", **kwargs)
    if noise_scheduler is not None:
        share_noise_schedule(scheduler, noise_scheduler)
    scheduler.set_timesteps(num_inference_steps)
    if name == "ddim":  # DDIMScheduler.step moves back by T // N: its timesteps must be spaced by exactly that
        scheduler.timesteps = timesteps
    return scheduler


def check_noise_schedule(schedule: str) -> str:
    """``schedule`` itself when it names one of MONAI's noise schedules (``NoiseSchedules``), for a bundle config to
    check ``--noise_schedule`` before MONAI's scheduler reports only "Component not found".

    Raises:
        ValueError: naming the schedule and the valid ones.
    """
    if schedule not in NoiseSchedules.names:
        raise ValueError(f"schedule must be one of {quoted_names(NoiseSchedules.names, 'or')}, got {schedule!r}.")
    return schedule


def _check_scheduler_arguments(name: str, schedule: str, kwargs: dict[str, Any]) -> None:
    """Refuse ``kwargs`` that neither the scheduler class ``name`` nor the noise schedule ``schedule`` takes.

    MONAI passes every argument its scheduler class does not name on to the schedule function, which would fail
    with a bare ``TypeError`` naming a private function.
    """
    check_noise_schedule(schedule)
    set_here = {"num_train_timesteps", "schedule", "prediction_type", "solver_order"}  # set by the name
    accepted = parameter_names(_SCHEDULER_CLASSES[name], NoiseSchedules[schedule]) - set_here
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(
            f"scheduler={name!r} with schedule={schedule!r} takes none of {unknown} (in scheduler_args or "
            f"schedule_args); it takes {', '.join(map(repr, sorted(accepted)))}."
        )


def repeat_condition(condition: Any, repeats: int) -> Any:
    """Repeat every tensor of a condition structure ``repeats`` times along the batch dimension (member-major).

    A batch ``[s0, s1]`` repeated 3 times becomes ``[s0, s1, s0, s1, s0, s1]``, so a result of batch ``K * B``
    reshapes to ``(K, B, ...)``. Lists, tuples and NamedTuples (such as ``ConditionFeatures``) are walked
    recursively, ``None`` and non-tensors are kept as they are.

    Args:
        condition: a tensor or a (nested) list / tuple / NamedTuple of tensors with batch first.
        repeats: number of copies (the ensemble size ``K``).
    """
    if isinstance(condition, Tensor):
        return condition.repeat(repeats, *([1] * (condition.ndim - 1)))
    if isinstance(condition, tuple) and hasattr(condition, "_fields"):
        return type(condition)(*(repeat_condition(item, repeats) for item in condition))
    if isinstance(condition, (list, tuple)):
        return type(condition)(repeat_condition(item, repeats) for item in condition)
    return condition


class DiffusionSampler:
    """
    Reverse diffusion sampler for the conditional mask model (MedSegDiff-V2 design) over MONAI schedulers.

    The condition network runs once per slice (``network.encode_condition``); its features are reused for every
    reverse step and every ensemble member. The ``K`` members of ``B`` slices run as one batch of ``K * B``. The
    network predicts the clean mask as logits; the scheduler's x0 estimate is ``tanh(seg_logits / 2)``
    (``prediction_type="sample"``). The segmentation is the mean of the members' ``sigmoid(seg_logits)`` at the
    last step, the uncertainty their standard deviation.

    With ``scheduler="ddim"`` the timesteps are evenly spaced by ``T // N`` and end at 0 (``(N - 1) * T // N, ...,
    T // N, 0``, the DDIM paper's spacing). ``DDIMScheduler.step`` always moves back by ``T // N``, so every step
    lands exactly on the next timestep; MONAI's default ``linspace(T - 1, 0, N)`` timesteps do not (999 steps to
    899, then the network is told 888). Ending at t = 0 matters: on a small trained model, 10 DDIM steps agree with
    1000 DDPM steps on 98 % of voxels this way and on 90 % with "trailing" timesteps (999, ..., 99).
    ``scheduler="dpmpp_2m"`` (:class:`~medsegdiff_monai.inferers.schedulers.DPMSolverMultistepScheduler`) takes
    timesteps evenly spaced in log signal-to-noise ratio (from T - 1 to 0, denser near 0) with the second-order
    DPM-Solver++(2M) update: one network pass per step as DDIM, a more accurate path, so fewer steps reach the same
    result; ``scheduler="dpmpp_3m"`` is its third-order form
    (DPM-Solver++(3M)). ``scheduler="ddpm"`` is the ancestral 1000-step sampler of
    training, the reference the others are measured against. A batch whose probabilities hold NaN raises
    ``FloatingPointError`` naming the scheduler, so nothing of it is written.

    ``shared_steps`` > 0 runs the first network passes once per slice instead of once per member: the pass sees
    the first member's sample, and every member takes its x0 estimate in its own update (each member keeps its own
    initial noise and, with ``eta`` > 0, its own step noise). At the highest noise levels the estimate depends on
    the image, hardly on the sample (with 12 steps, the first four timesteps, 999 to 691, weigh the mask in the
    sample by ``sqrt(alphas_cumprod[t])`` <= 0.088), so each of these passes does ``1 / K`` of a full step's work.

    Args:
        num_inference_steps: number of reverse steps ``N`` in ``[1, T]``; exactly ``T`` for ``"ddpm"``.
        scheduler: one of :data:`SAMPLING_SCHEDULERS`: ``"ddim"`` (deterministic DDIM, ``eta`` = 0 by default),
            ``"dpmpp_2m"``, ``"dpmpp_3m"`` or ``"ddpm"``.
        num_train_timesteps: ``T`` of the training scheduler (taken from ``noise_scheduler`` when given).
        schedule: MONAI noise schedule name of the training scheduler (e.g. ``"linear_beta"``); ignored with
            ``noise_scheduler``.
        ensemble_size: number of members ``K`` drawn from different initial noise.
        seed: seed of the ``torch.Generator`` made on the image's device for each call that is not given a
            generator; ``None`` draws from the global random state.
        eta: stochasticity of the ``"ddim"``, ``"dpmpp_2m"`` and ``"dpmpp_3m"`` steps, >= 0: 0 solves the
            probability-flow ODE (deterministic given the initial noise), 1 the reverse SDE that ``"ddpm"``
            discretises (DDIM with ``eta`` = 1, SDE-DPM-Solver++(2M) and (3M)), with noise from the sampler's
            generator. Not used by ``"ddpm"``.
        return_members: keep every member's probabilities in :attr:`SamplerOutput.member_probs`.
        schedule_args: extra arguments of the noise schedule (e.g. ``beta_start``, ``beta_end``).
        amp_dtype: autocast dtype of the network passes on CUDA (``"bfloat16"``/``"bf16"``, ``"float16"``/``"fp16"``);
            None runs them in float32. The scheduler update, the noisy sample and every returned tensor stay
            float32. Ignored on CPU unless ``cpu_amp``.
        cpu_amp: autocast on CPU too, in ``amp_dtype`` (which must then be bfloat16): about twice as fast on a
            Xeon with AMX (``docs/inference.md``, Speed on a CPU); a CPU without native bf16 units (AMX or AVX-512
            BF16) emulates it and may run slower.
        compile: run ``network.denoise`` through ``torch.compile`` with static shapes (each input shape compiles
            once per process, later calls reuse the compiled code; :func:`~medsegdiff_monai.inferers.sample_volume`
            pads its last slice batch so that one shape serves every volume).
        noise_scheduler: the training scheduler (e.g. the bundle's ``noise_scheduler``, a MONAI
            ``DDPMScheduler``); the sampling scheduler takes its noise schedule and ``num_train_timesteps``, so
            training and sampling share one definition.
        scheduler_args: further arguments of the sampling scheduler class (see :func:`make_sampling_scheduler`).
        shared_steps: number of first steps whose network pass runs once per slice and is shared by the members,
            in ``[0, num_inference_steps)``; 0 runs every pass for every member.

    Example::

        sampler = DiffusionSampler(num_inference_steps=10, ensemble_size=5)
        out = sampler(network.eval(), image)  # image (B, 4, H, W)
        mask = out.probs > 0.5                 # (B, 3, H, W): TC, WT, ET
    """

    def __init__(
        self,
        num_inference_steps: int = 10,
        scheduler: str = "ddim",
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta",
        ensemble_size: int = 5,
        seed: int | None = 0,
        eta: float = 0.0,
        return_members: bool = False,
        schedule_args: dict | None = None,
        amp_dtype: str | None = None,
        compile: bool = False,
        noise_scheduler: Scheduler | None = None,
        scheduler_args: dict | None = None,
        cpu_amp: bool = False,
        shared_steps: int = 0,
    ) -> None:
        if ensemble_size < 1:
            raise ValueError(f"ensemble_size must be >= 1, got {ensemble_size}.")
        if eta < 0 or (eta > 0 and scheduler == "ddpm"):
            raise ValueError(
                f"eta={eta} with scheduler={scheduler!r}: eta must be >= 0, and only "
                f"{quoted_names(_FEW_STEP_SCHEDULERS, 'and')} take it (1000 DDPM steps are stochastic already); "
                "leave eta at 0 for 'ddpm'."
            )
        if noise_scheduler is not None:
            num_train_timesteps = noise_scheduler.num_train_timesteps
        self.amp_dtype = parse_amp_dtype(amp_dtype)
        if cpu_amp and self.amp_dtype != torch.bfloat16:
            raise ValueError(f"cpu_amp=True needs amp_dtype='bfloat16', got amp_dtype={amp_dtype!r}.")
        self.cpu_amp = cpu_amp
        self.scheduler = make_sampling_scheduler(
            scheduler,
            num_inference_steps,
            num_train_timesteps,
            schedule,
            schedule_args,
            noise_scheduler,
            scheduler_args,
        )
        # after the scheduler, which names a step count out of range first
        if not 0 <= shared_steps < num_inference_steps:
            raise ValueError(
                f"shared_steps must be in [0, num_inference_steps) = [0, {num_inference_steps}), got {shared_steps}: "
                "the last step's pass gives each member its own mask, so it is never shared."
            )
        self.scheduler_name = scheduler
        self.num_inference_steps = num_inference_steps
        self.ensemble_size = ensemble_size
        self.seed = seed
        self.eta = eta
        self.return_members = return_members
        self.shared_steps = shared_steps
        self.compile = compile
        self.timesteps: list[int] = self.scheduler.timesteps.tolist()

    def make_generator(self, device: torch.device | str) -> torch.Generator | None:
        """A generator on ``device`` seeded with ``seed``, or ``None`` when ``seed`` is ``None``."""
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)

    def is_compiled_for(self, network: nn.Module) -> bool:
        """Whether this process already holds the compiled ``denoise`` of ``network``'s class (so compiling costs
        nothing more, except for a new input shape)."""
        return type(network).denoise in _COMPILED_DENOISE

    def _denoise_function(self, network: nn.Module) -> Callable[..., Tensor]:
        """``network.denoise``, or its compiled form (one per network class, holding no reference to the network)."""
        if not self.compile:
            return network.denoise
        function = type(network).denoise
        if function not in _COMPILED_DENOISE:
            _COMPILED_DENOISE[function] = torch.compile(function, dynamic=False)
        return functools.partial(_COMPILED_DENOISE[function], network)

    def _step(self, x0_estimate: Tensor, timestep: int, sample: Tensor, generator: torch.Generator | None) -> Tensor:
        if isinstance(self.scheduler, (DDIMScheduler, DPMSolverMultistepScheduler)):
            return self.scheduler.step(x0_estimate, timestep, sample, eta=self.eta, generator=generator)[0]
        return self.scheduler.step(x0_estimate, timestep, sample, generator=generator)[0]

    @torch.no_grad()
    def __call__(
        self,
        network: nn.Module,
        image: Tensor,
        generator: torch.Generator | None = None,
    ) -> SamplerOutput:
        """
        Sample ``ensemble_size`` masks for each slice of ``image``.

        Args:
            network: a module with ``encode_condition(image) -> ConditionFeatures`` and
                ``denoise(x_t, t, condition) -> seg_logits`` (see ``medsegdiff_monai.networks``). The caller sets
                its mode (``network.eval()``; a network in training mode gets a warning) and, unless ``amp_dtype`` is
                given, autocast.
            image: (B, 4, H, W) normalised slices.
            generator: random generator on ``image.device``; by default a new one seeded with ``seed``.

        Returns:
            :class:`SamplerOutput`.
        """
        if image.ndim != 4:
            raise ValueError(f"image must have shape (B, channels, H, W), got {tuple(image.shape)}.")
        if network.training:
            warnings.warn(
                f"sampling with {type(network).__name__} in training mode: dropout is active and running statistics "
                "(the grade head's) are updated and saved with the weights; call network.eval() before sampling.",
                stacklevel=2,
            )
        if generator is None:
            generator = self.make_generator(image.device)
        num_slices, members = image.shape[0], self.ensemble_size
        device_type = image.device.type
        use_autocast = self.amp_dtype is not None and (device_type == "cuda" or (self.cpu_amp and device_type == "cpu"))
        autocast = torch.autocast(device_type, dtype=self.amp_dtype) if use_autocast else contextlib.nullcontext()
        denoise = self._denoise_function(network)
        with autocast:
            condition = network.encode_condition(image)
        calib_map = condition.calib_map
        member_condition = repeat_condition(condition, members) if members > 1 else condition
        mask_shape = (members * num_slices, calib_map.shape[1], *image.shape[2:])
        sample = torch.randn(mask_shape, generator=generator, device=image.device, dtype=torch.float32)
        seg_logits = sample
        for index, timestep in enumerate(self.timesteps):
            shared = index < self.shared_steps
            inputs = sample[:num_slices] if shared else sample
            t_batch = torch.full((inputs.shape[0],), timestep, device=image.device, dtype=torch.long)
            with autocast:
                seg_logits = denoise(inputs, t_batch, condition if shared else member_condition)
            # contiguous: the network may answer in channels-last, and one layout of x_t keeps one compiled graph
            x0_estimate = torch.tanh(seg_logits.float() / 2).contiguous()
            if shared:
                x0_estimate = x0_estimate.repeat(members, 1, 1, 1)
            sample = self._step(x0_estimate, timestep, sample, generator)
        member_probs = torch.sigmoid(seg_logits.float()).view(members, num_slices, *mask_shape[1:])
        if bool(torch.isnan(member_probs).any()):
            raise FloatingPointError(
                f"scheduler {self.scheduler_name!r} with {self.num_inference_steps} steps produced NaN probabilities "
                f"(amp_dtype={self.amp_dtype}); nothing of this batch is usable. Check the checkpoint, or run with "
                "amp_dtype=None (float32) or another scheduler."
            )
        p_hgg = None if condition.grade_logits is None else torch.softmax(condition.grade_logits.float(), dim=1)[:, 1]
        return SamplerOutput(
            probs=member_probs.mean(dim=0),
            uncertainty=member_probs.std(dim=0, unbiased=False),
            member_probs=member_probs if self.return_members else None,
            p_hgg=p_hgg,
            calib_probs=torch.sigmoid(calib_map.float()),
        )
