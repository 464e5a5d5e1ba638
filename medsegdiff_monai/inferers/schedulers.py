"""Few-step diffusion solvers written to MONAI's scheduler interface."""

from __future__ import annotations

import math

import torch
from monai.networks.schedulers import Scheduler
from monai.networks.schedulers.ddpm import DDPMPredictionType
from torch import Tensor

__all__ = ["DPMSolverMultistepScheduler", "leading_timesteps", "logsnr_timesteps", "share_noise_schedule"]

# how :class:`DPMSolverMultistepScheduler` places its timesteps
TIMESTEP_SPACINGS = ("logsnr", "leading")


def leading_timesteps(num_inference_steps: int, num_train_timesteps: int) -> Tensor:
    """Timesteps evenly spaced by ``T // N`` that end at 0: ``(N - 1) * T // N, ..., T // N, 0`` (DDIM paper); for
    ``N = 1`` the one step starts from pure noise, at ``T - 1`` (at 0 the network would be told that noise is clean).

    Args:
        num_inference_steps: ``N``, in ``[1, T]``.
        num_train_timesteps: ``T`` of the training scheduler.
    """
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be in [1, num_train_timesteps={num_train_timesteps}], got {num_inference_steps}."
        )
    if num_inference_steps == 1:
        return torch.tensor([num_train_timesteps - 1])
    return torch.arange(num_inference_steps - 1, -1, -1) * (num_train_timesteps // num_inference_steps)


def logsnr_timesteps(num_inference_steps: int, alphas_cumprod: Tensor) -> Tensor:
    """``N`` distinct timesteps from ``T - 1`` down to 0, evenly spaced in ``lambda_t = log(alpha_t / sigma_t)``.

    DPM-Solver's spacing: every step covers the same span of log signal-to-noise ratio, where even spacing in ``t``
    leaves most of it to the step into t = 0 (on the linear schedule with 10 steps, ``lambda`` rises by 3.5 from
    t = 100 to 0 and by 0.4 per step before). Each target is rounded to the nearest timestep, then moved by the
    fewest steps that keep the timesteps distinct. ``N = 1`` is the one step from pure noise, at ``T - 1``.

    Args:
        num_inference_steps: ``N``, in ``[1, T]``.
        alphas_cumprod: (T,) cumulative product of the alphas of the noise schedule.
    """
    num_train_timesteps = len(alphas_cumprod)
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be in [1, num_train_timesteps={num_train_timesteps}], got {num_inference_steps}."
        )
    if num_inference_steps == 1:
        return torch.tensor([num_train_timesteps - 1])
    alphas_cumprod = alphas_cumprod.double()
    lambdas = 0.5 * (alphas_cumprod.log() - (1 - alphas_cumprod).log())
    targets = torch.linspace(float(lambdas[-1]), float(lambdas[0]), num_inference_steps, dtype=torch.float64)
    timesteps = (lambdas[None, :] - targets[:, None]).abs().argmin(dim=1).tolist()
    for i in range(1, num_inference_steps):  # strictly decreasing, then back above 0 from the end
        timesteps[i] = min(timesteps[i], timesteps[i - 1] - 1)
    timesteps[-1] = 0
    for i in range(num_inference_steps - 2, -1, -1):
        timesteps[i] = max(timesteps[i], timesteps[i + 1] + 1)
    return torch.tensor(timesteps, dtype=torch.long)


def _third_order_correction(
    x0: Tensor, lambda_s: float, history: list[tuple[Tensor, float]], step_size: float, eta: float = 0.0
) -> Tensor:
    """DPM-Solver++(3M)'s correction to the first-order step, in units of ``alpha_t``: ``phi_2 d1 - phi_3 d2``.

    The exponential-integrator form of k-diffusion's ``sample_dpmpp_3m_sde``: with ``h_eta = (1 + eta) h``,
    ``phi_2 = (exp(-h_eta) - 1) / h_eta + 1`` and ``phi_3 = phi_2 / h_eta - 1 / 2``; ``d1`` and ``d2`` are the first
    and second divided differences of the x0 predictions over ``lambda``, scaled by ``h`` and ``h^2``. With one
    earlier prediction only (the second step) the correction is second order, ``phi_2 d1``.

    Args:
        x0: this step's x0 prediction, any shape.
        lambda_s: this step's half log-SNR.
        history: ``(x0, lambda)`` of the one or two earlier steps, newest first; x0 of ``x0``'s shape.
        step_size: ``h = lambda_t - lambda_s`` of this step, finite and > 0.
        eta: the step's ``eta`` (0: the ODE step).
    """
    h_eta = (1 + eta) * step_size
    phi_2 = math.expm1(-h_eta) / h_eta + 1
    (x0_1, lambda_1), *earlier = history
    ratio_0 = (lambda_s - lambda_1) / step_size
    slope = (x0 - x0_1) / ratio_0
    if not earlier:
        return phi_2 * slope
    x0_2, lambda_2 = earlier[0]
    ratio_1 = (lambda_1 - lambda_2) / step_size
    previous_slope = (x0_1 - x0_2) / ratio_1
    curvature = (slope - previous_slope) / (ratio_0 + ratio_1)
    phi_3 = phi_2 / h_eta - 0.5
    return phi_2 * (slope + curvature * ratio_0) - phi_3 * curvature


def share_noise_schedule(scheduler: Scheduler, source: Scheduler) -> Scheduler:
    """Give ``scheduler`` the noise schedule of ``source`` (its ``betas``, ``alphas``, ``alphas_cumprod``).

    One schedule definition, the training scheduler's, then serves every sampler. Returns ``scheduler``.

    Raises:
        ValueError: when the two disagree on ``num_train_timesteps``.
    """
    if scheduler.num_train_timesteps != source.num_train_timesteps:
        raise ValueError(
            f"the sampling scheduler has num_train_timesteps={scheduler.num_train_timesteps}, the training "
            f"scheduler {source.num_train_timesteps}; build both with the same value."
        )
    scheduler.betas = source.betas.clone()
    scheduler.alphas = source.alphas.clone()
    scheduler.alphas_cumprod = source.alphas_cumprod.clone()
    return scheduler


class DPMSolverMultistepScheduler(Scheduler):
    """
    DPM-Solver++ (Lu et al. 2022, https://arxiv.org/abs/2211.01095): a multistep solver of the diffusion
    probability-flow ODE in data (x0) prediction, for sampling in few steps.

    With ``alpha_t = sqrt(alphas_cumprod[t])``, ``sigma_t = sqrt(1 - alphas_cumprod[t])``, the half log-SNR
    ``lambda_t = log(alpha_t / sigma_t)`` and ``h = lambda_t - lambda_s``, one step from ``s`` to the next timestep
    ``t`` is ``x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - exp(-h)) D``. The first order (``D = x0_s``) is DDIM
    with ``eta = 0``; the second order (2M) extrapolates with the previous step's prediction,
    ``D = (1 + 1 / (2 r)) x0_s - 1 / (2 r) x0_prev`` with ``r = h_prev / h``, at no extra network pass. The first
    step and the step past the last timestep (to ``alpha = 1``: the sample becomes ``x0``) are first order, and
    so is the step into t = 0 with ``lower_order_final`` (its span of ``lambda`` is the largest, and extrapolating
    over it from a short previous step is unstable in few steps).

    The third order (3M) adds ``alpha_t (phi_2 d1 - phi_3 d2)`` to the first-order step, with the divided differences
    of the last three predictions over ``lambda`` (k-diffusion's ``dpmpp_3m_sde``, second order at the second step);
    it too costs no extra network pass.

    With ``eta > 0`` (``step``'s argument) the step solves the reverse diffusion SDE instead of the ODE, as
    SDE-DPM-Solver++(2M) (the paper's section 5; ``eta = 1``) and the ``eta`` of k-diffusion's ``dpmpp_2m_sde``:
    ``x_t = (sigma_t / sigma_s) exp(-eta h) x_s + alpha_t (1 - exp(-(1 + eta) h)) D
    + sigma_t sqrt(1 - exp(-2 eta h)) z`` with fresh Gaussian noise ``z``. ``eta = 0`` is the ODE step above;
    ``eta = 1`` at first order is DDIM with ``eta = 1``, the stochastic sampler of the same SDE that 1000 DDPM steps
    discretise.

    The timesteps are evenly spaced in ``lambda`` (:func:`logsnr_timesteps`, ``timestep_spacing="logsnr"``) or in
    ``t`` as DDIM's (:func:`leading_timesteps`, ``"leading"``); both end at 0. The solver remembers the previous
    step's prediction; it starts afresh whenever ``step`` is called at the first timestep.

    Args:
        num_train_timesteps: number of diffusion steps of training ``T``.
        schedule: member of MONAI's ``NoiseSchedules`` (e.g. ``"linear_beta"``).
        solver_order: 1 (DDIM), 2 (DPM-Solver++(2M)) or 3 (DPM-Solver++(3M)).
        prediction_type: what the network predicts, a ``DDPMPredictionType``: ``"sample"`` (x0), ``"epsilon"`` or
            ``"v_prediction"``.
        timestep_spacing: ``"logsnr"`` or ``"leading"`` (see above).
        lower_order_final: first order for the step into t = 0.
        schedule_args: arguments of the schedule function (e.g. ``beta_start``, ``beta_end``).

    Example::

        scheduler = DPMSolverMultistepScheduler(prediction_type="sample")
        scheduler.set_timesteps(6)
        for t in scheduler.timesteps:
            sample, _ = scheduler.step(network(sample, t), t, sample)
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta",
        solver_order: int = 2,
        prediction_type: str = DDPMPredictionType.SAMPLE,
        timestep_spacing: str = "logsnr",
        lower_order_final: bool = True,
        **schedule_args,
    ) -> None:
        super().__init__(num_train_timesteps, schedule, **schedule_args)
        if solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order}.")
        if prediction_type not in DDPMPredictionType.__members__.values():
            valid = ", ".join(repr(str(v)) for v in DDPMPredictionType.__members__.values())
            raise ValueError(f"prediction_type must be one of {valid}, got {prediction_type!r}.")
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}.")
        self.solver_order = solver_order
        self.prediction_type = prediction_type
        self.timestep_spacing = timestep_spacing
        self.lower_order_final = lower_order_final
        self.set_timesteps(num_train_timesteps)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Set ``N`` timesteps ending at 0 (spaced by ``timestep_spacing``) and forget the history.

        Args:
            num_inference_steps: ``N``, in ``[1, num_train_timesteps]``.
            device: where to put ``timesteps``.
        """
        self.num_inference_steps = num_inference_steps
        if self.timestep_spacing == "logsnr":
            timesteps = logsnr_timesteps(num_inference_steps, self.alphas_cumprod)
        else:
            timesteps = leading_timesteps(num_inference_steps, self.num_train_timesteps)
        self.timesteps = timesteps.to(device)
        self._next_timestep = dict(zip(self.timesteps.tolist(), self.timesteps.tolist()[1:] + [-1], strict=True))
        self._history: list[tuple[Tensor, float]] = []  # (x0, lambda) of the earlier steps, newest first

    def _alpha_sigma_lambda(self, timestep: int) -> tuple[float, float, float]:
        """``(alpha, sigma, lambda)`` at ``timestep``; past the end (``timestep < 0``), clean data: ``(1, 0, inf)``."""
        if timestep < 0:
            return 1.0, 0.0, math.inf
        alpha_cumprod = float(self.alphas_cumprod[timestep])
        alpha, sigma = math.sqrt(alpha_cumprod), math.sqrt(1 - alpha_cumprod)
        return alpha, sigma, math.log(alpha / sigma)

    def _x0(self, model_output: Tensor, timestep: int, sample: Tensor) -> Tensor:
        alpha, sigma, _ = self._alpha_sigma_lambda(timestep)
        if self.prediction_type == DDPMPredictionType.SAMPLE:
            return model_output
        if self.prediction_type == DDPMPredictionType.EPSILON:
            return (sample - sigma * model_output) / alpha
        return alpha * sample - sigma * model_output

    def step(
        self,
        model_output: Tensor,
        timestep: int,
        sample: Tensor,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """
        One solver step from ``timestep`` to the next of ``timesteps`` (past the last one: to the clean data).

        Args:
            model_output: the network's output at ``(sample, timestep)``, of ``prediction_type``; any shape.
            timestep: one of ``timesteps`` (an int or a 0-d tensor), in order.
            sample: the current noisy sample ``x_s``, ``model_output``'s shape.
            eta: 0 for the ODE step (deterministic), > 0 for the SDE step (see the class docstring); as the ``eta``
                of MONAI's ``DDIMScheduler.step``.
            generator: random generator of the SDE step's noise (on ``sample``'s device); unused with ``eta = 0``.

        Returns:
            ``(x_t, x0)``: the sample at the next timestep and the prediction of the clean data.
        """
        timestep = int(timestep)
        if eta < 0:
            raise ValueError(f"eta must be >= 0 (0: the ODE step, 1: the SDE step), got {eta}.")
        if timestep not in self._next_timestep:
            raise ValueError(
                f"timestep {timestep} is not one of the scheduler's timesteps {list(self._next_timestep)}."
            )
        if timestep == next(iter(self._next_timestep)):  # the first timestep: a new trajectory
            self._history = []
        x0 = self._x0(model_output, timestep, sample)
        next_timestep = self._next_timestep[timestep]
        _, sigma_s, lambda_s = self._alpha_sigma_lambda(timestep)
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(next_timestep)
        step_size = lambda_t - lambda_s  # h; inf past the end
        final = next_timestep <= 0 if self.lower_order_final else next_timestep < 0
        history = [] if final else self._history
        self._history = [(x0, lambda_s), *self._history][: self.solver_order - 1]
        data = x0
        if self.solver_order == 2 and history:
            previous_x0, previous_lambda = history[0]
            ratio = (lambda_s - previous_lambda) / step_size
            data = (1 + 0.5 / ratio) * x0 - (0.5 / ratio) * previous_x0
        sample_decay = math.exp(-eta * step_size) if eta > 0 else 1.0  # exp(-eta h); h is inf past the end
        next_sample = (sigma_t / sigma_s) * sample_decay * sample
        next_sample = next_sample + alpha_t * -math.expm1(-(1 + eta) * step_size) * data
        if self.solver_order == 3 and history:
            next_sample = next_sample + alpha_t * _third_order_correction(x0, lambda_s, history, step_size, eta)
        if eta > 0 and sigma_t > 0:
            noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            next_sample = next_sample + sigma_t * math.sqrt(-math.expm1(-2 * eta * step_size)) * noise
        return next_sample, x0
