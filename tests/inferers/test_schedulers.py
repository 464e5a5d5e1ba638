from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from medsegdiff_monai.inferers import DiffusionSampler
from medsegdiff_monai.inferers.schedulers import DPMSolverMultistepScheduler, leading_timesteps, logsnr_timesteps

CONFIGS = Path(__file__).resolve().parents[2] / "bundle" / "configs"


def _run(scheduler, x0_of, sample: torch.Tensor, steps: int) -> torch.Tensor:
    """Run ``scheduler`` from ``sample`` at its first timestep over ``steps`` steps; returns the final sample."""
    scheduler.set_timesteps(steps)
    if isinstance(scheduler, DDIMScheduler):
        scheduler.timesteps = leading_timesteps(steps, scheduler.num_train_timesteps)
    for timestep in scheduler.timesteps:  # 0-d tensors, as in MONAI's loops
        sample = scheduler.step(x0_of(sample, timestep), timestep, sample)[0]
    return sample


def _gaussian_data(mean: float, std: float, alphas_cumprod: torch.Tensor):
    """Data x0 ~ N(mean, std^2): the exact x0 predictor E[x0 | x_t] and the exact probability-flow ODE map."""

    def x0_of(sample: torch.Tensor, timestep: int) -> torch.Tensor:
        a = alphas_cumprod[timestep].double()
        alpha, var = a.sqrt(), a * std**2 + (1 - a)
        return mean + alpha * std**2 / var * (sample - alpha * mean)

    def ode_solution(sample: torch.Tensor, start: int) -> torch.Tensor:
        # along the ODE x_t = alpha_t mean + sqrt(alpha_t^2 std^2 + sigma_t^2) z with z fixed; at the end alpha = 1
        a = alphas_cumprod[start].double()
        z = (sample - a.sqrt() * mean) / (a * std**2 + (1 - a)).sqrt()
        return mean + std * z

    return x0_of, ode_solution


def _first_order_paths(eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples after every step but the last (which lands on the prediction whatever the update) of MONAI's
    DDIM and of the first-order solver, 7 steps with the same predictions and the same noise generator."""
    generator = torch.Generator().manual_seed(4)
    sample = torch.randn(2, 3, 5, 5, generator=generator, dtype=torch.float64)
    outputs = torch.tanh(torch.randn(7, 2, 3, 5, 5, generator=generator, dtype=torch.float64))
    ddim = DDIMScheduler(1000, "linear_beta", clip_sample=False, prediction_type="sample")
    solver = DPMSolverMultistepScheduler(1000, solver_order=1, prediction_type="sample", timestep_spacing="leading")
    paths = []
    for scheduler in (ddim, solver):
        scheduler.set_timesteps(7)
        scheduler.timesteps = leading_timesteps(7, 1000)
        noise, x, path = torch.Generator().manual_seed(5), sample, []
        for index, timestep in enumerate(scheduler.timesteps[:-1]):  # 0-d tensors, as in MONAI's loops
            x = scheduler.step(outputs[index], timestep, x, eta=eta, generator=noise)[0]
            path.append(x)
        paths.append(torch.stack(path))
    assert solver.timesteps.tolist() == [852, 710, 568, 426, 284, 142, 0]
    return paths[0], paths[1]


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_first_order_is_monai_ddim(eta):
    # eta = 1: the SDE step of the first order is DDIM's stochastic step, noise draws included
    expected, ours = _first_order_paths(eta)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


def test_sde_and_ode_steps_take_different_paths():
    assert (_first_order_paths(1.0)[1] - _first_order_paths(0.0)[1]).abs().mean() > 0.1


def _k_diffusion_start(order: int, steps: int, predictions: int, seed: int):
    """A solver of ``order`` on DDIM's ``steps`` timesteps; 64 start values and ``predictions`` x0 predictions in
    float64; the start in k-diffusion's variance-exploding form (x / alpha); two noise generators seeded alike, one
    for the solver and one for the reference."""
    solver = DPMSolverMultistepScheduler(solver_order=order, prediction_type="sample", timestep_spacing="leading")
    solver.set_timesteps(steps)
    a_t = solver.alphas_cumprod.double()
    generator = torch.Generator().manual_seed(seed)
    x_vp = torch.randn(64, generator=generator, dtype=torch.float64)
    outputs = torch.tanh(torch.randn(predictions, 64, generator=generator, dtype=torch.float64))
    x_ve = x_vp / a_t[int(solver.timesteps[0])].sqrt()
    noises = (torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 1))
    return solver, a_t, outputs, x_vp, x_ve, noises


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_second_order_sde_step_is_the_k_diffusion_update(eta):
    # k-diffusion's sample_dpmpp_2m_sde (midpoint) in its variance-exploding form: x / alpha, sigma / alpha
    # 800 -> 600 -> 400 -> 200 -> 0: the first three steps, away from the last one
    solver, a_t, predictions, ours, x_ve, (noise, reference_noise) = _k_diffusion_start(2, 5, 3, seed=6)
    h_last = old_denoised = None
    for index, (timestep, following) in enumerate(((800, 600), (600, 400), (400, 200))):
        ours = solver.step(predictions[index], timestep, ours, eta=eta, generator=noise)[0]
        sigma_s, sigma_t = (((1 - a_t[t]) / a_t[t]).sqrt() for t in (timestep, following))
        h = (sigma_s / sigma_t).log()
        eta_h = eta * h
        denoised = predictions[index]
        x_ve = sigma_t / sigma_s * (-eta_h).exp() * x_ve + (-h - eta_h).expm1().neg() * denoised
        if old_denoised is not None:
            r = h_last / h
            x_ve = x_ve + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old_denoised)
        z = torch.randn(x_ve.shape, generator=reference_noise, dtype=torch.float64)
        x_ve = x_ve + z * sigma_t * (-2 * eta_h).expm1().neg().sqrt()
        h_last, old_denoised = h, denoised
        torch.testing.assert_close(ours, x_ve * a_t[following].sqrt())


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_third_order_step_is_the_k_diffusion_update(eta):
    # k-diffusion's sample_dpmpp_3m_sde in its variance-exploding form (x / alpha, sigma / alpha): first, second
    # and then third order, away from the last step
    # 830 -> 664 -> 498 -> 332 -> 166 -> 0
    solver, a_t, predictions, ours, x_ve, (noise, reference_noise) = _k_diffusion_start(3, 6, 4, seed=9)
    h_1 = h_2 = denoised_1 = denoised_2 = None
    steps = ((830, 664), (664, 498), (498, 332), (332, 166))
    for index, (timestep, following) in enumerate(steps):
        ours = solver.step(predictions[index], timestep, ours, eta=eta, generator=noise)[0]
        sigma_s, sigma_t = (((1 - a_t[t]) / a_t[t]).sqrt() for t in (timestep, following))
        h = (sigma_s / sigma_t).log()
        h_eta = h * (eta + 1)
        denoised = predictions[index]
        x_ve = torch.exp(-h_eta) * x_ve + (-h_eta).expm1().neg() * denoised
        if h_2 is not None:
            r0, r1 = h_1 / h, h_2 / h
            d1_0, d1_1 = (denoised - denoised_1) / r0, (denoised_1 - denoised_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_2 = h_eta.neg().expm1() / h_eta + 1
            phi_3 = phi_2 / h_eta - 0.5
            x_ve = x_ve + phi_2 * d1 - phi_3 * d2
        elif h_1 is not None:
            r = h_1 / h
            phi_2 = h_eta.neg().expm1() / h_eta + 1
            x_ve = x_ve + phi_2 * (denoised - denoised_1) / r
        if eta:
            z = torch.randn(x_ve.shape, generator=reference_noise, dtype=torch.float64)
            x_ve = x_ve + z * sigma_t * (-2 * h * eta).expm1().neg().sqrt()
        denoised_1, denoised_2, h_1, h_2 = denoised, denoised_1, h, h_1
        torch.testing.assert_close(ours, x_ve * a_t[following].sqrt())


def test_sde_sampling_of_gaussian_data_has_the_data_distribution():
    # with the exact x0 predictor of N(0.4, 0.5^2) data, the SDE's end point is distributed as the data
    alphas_cumprod = DDPMScheduler(1000, "linear_beta").alphas_cumprod
    x0_of, _ = _gaussian_data(mean=0.4, std=0.5, alphas_cumprod=alphas_cumprod)
    solver = DPMSolverMultistepScheduler(solver_order=2)
    solver.set_timesteps(50)
    generator = torch.Generator().manual_seed(8)
    sample = torch.randn(40000, generator=generator, dtype=torch.float64)  # alpha_999 ~ 0.006: nearly pure noise
    for timestep in solver.timesteps:
        sample = solver.step(x0_of(sample, timestep), timestep, sample, eta=1.0, generator=generator)[0]
    # 40,000 draws: the standard errors of the mean and the standard deviation are 0.0025 and 0.0018
    assert abs(float(sample.mean()) - 0.4) < 0.01 and abs(float(sample.std()) - 0.5) < 0.01


@pytest.mark.parametrize("order", [1, 2])
def test_constant_prediction_is_exact_in_one_step(order):
    # with x0 constant the ODE's solution is x_t = alpha_t c + sigma_t eps, eps fixed: one step lands on it
    solver = DPMSolverMultistepScheduler(solver_order=order, prediction_type="sample", timestep_spacing="leading")
    a_t = solver.alphas_cumprod.double()
    constant = torch.full((4,), 0.3, dtype=torch.float64)
    noise = torch.randn(4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    solver.set_timesteps(4)  # 750 -> 500 -> 250 -> 0 -> clean
    sample = a_t[750].sqrt() * constant + (1 - a_t[750]).sqrt() * noise
    for timestep, following in ((750, 500), (500, 250), (250, 0)):
        sample = solver.step(constant, timestep, sample)[0]
        torch.testing.assert_close(sample, a_t[following].sqrt() * constant + (1 - a_t[following]).sqrt() * noise)
    clean, x0 = solver.step(constant, 0, sample)
    torch.testing.assert_close(clean, constant)
    torch.testing.assert_close(x0, constant)


@pytest.mark.parametrize("std", [0.1, 0.5, 1.0])
def test_second_order_follows_the_exact_ode_of_gaussian_data(std):
    alphas_cumprod = DDPMScheduler(1000, "linear_beta").alphas_cumprod
    x0_of, ode_solution = _gaussian_data(mean=0.4, std=std, alphas_cumprod=alphas_cumprod)
    noise = torch.randn(256, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    errors = {}
    for name, order, spacing in (("ddim", 1, "leading"), ("2m", 2, "logsnr")):
        for steps in (10, 20, 40):
            solver = DPMSolverMultistepScheduler(solver_order=order, timestep_spacing=spacing)
            solver.set_timesteps(steps)
            start = int(solver.timesteps[0])
            a = alphas_cumprod[start].double()  # the sample at the first timestep, a point of the ODE
            sample = 0.4 * a.sqrt() + (a * std**2 + 1 - a).sqrt() * noise
            errors[name, steps] = float((_run(solver, x0_of, sample, steps) - ode_solution(sample, start)).abs().max())
    for steps in (10, 20, 40):
        assert errors["2m", steps] < errors["ddim", steps] / 2, errors
    assert errors["2m", 40] < errors["2m", 10] / 4, errors


@pytest.mark.parametrize("std", [0.5, 1.0])
def test_third_order_beats_second_order_in_many_steps(std):
    alphas_cumprod = DDPMScheduler(1000, "linear_beta").alphas_cumprod
    x0_of, ode_solution = _gaussian_data(mean=0.4, std=std, alphas_cumprod=alphas_cumprod)
    noise = torch.randn(256, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    errors = {}
    for order in (2, 3):
        solver = DPMSolverMultistepScheduler(solver_order=order)
        solver.set_timesteps(40)
        a = alphas_cumprod[int(solver.timesteps[0])].double()
        sample = 0.4 * a.sqrt() + (a * std**2 + 1 - a).sqrt() * noise
        errors[order] = float((_run(solver, x0_of, sample, 40) - ode_solution(sample, 999)).abs().max())
    assert errors[3] < errors[2] / 2, errors


def test_logsnr_timesteps_are_distinct_and_even_in_lambda():
    alphas_cumprod = DDPMScheduler(1000, "linear_beta").alphas_cumprod.double()
    lambdas = 0.5 * (alphas_cumprod / (1 - alphas_cumprod)).log()
    for steps in (2, 7, 200, 999, 1000):
        timesteps = logsnr_timesteps(steps, alphas_cumprod).tolist()
        assert len(set(timesteps)) == steps and timesteps == sorted(timesteps, reverse=True) and timesteps[-1] == 0
    timesteps = logsnr_timesteps(8, alphas_cumprod)
    spans = lambdas[timesteps[1:]] - lambdas[timesteps[:-1]]
    assert int(timesteps[0]) == 999
    torch.testing.assert_close(spans, spans.mean().expand(7), rtol=0.05, atol=0)


def test_epsilon_and_v_predictions_give_the_same_step():
    a_t = DDPMScheduler(1000, "linear_beta").alphas_cumprod.double()
    generator = torch.Generator().manual_seed(3)
    sample, x0 = torch.randn(2, 6, generator=generator, dtype=torch.float64)
    alpha, sigma = a_t[500].sqrt(), (1 - a_t[500]).sqrt()
    epsilon = (sample - alpha * x0) / sigma
    outputs = {"sample": x0, "epsilon": epsilon, "v_prediction": alpha * epsilon - sigma * x0}
    steps = {}
    for kind, output in outputs.items():
        solver = DPMSolverMultistepScheduler(prediction_type=kind, timestep_spacing="leading")
        solver.set_timesteps(2)
        steps[kind] = solver.step(output, 500, sample)[0]
    torch.testing.assert_close(steps["epsilon"], steps["sample"])
    torch.testing.assert_close(steps["v_prediction"], steps["sample"])


def test_invalid_solver_arguments():
    with pytest.raises(ValueError, match="solver_order must be 1, 2 or 3"):
        DPMSolverMultistepScheduler(solver_order=4)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        DPMSolverMultistepScheduler(prediction_type="score")
    solver = DPMSolverMultistepScheduler()
    with pytest.raises(ValueError, match=r"num_inference_steps must be in \[1, num_train_timesteps=1000\]"):
        solver.set_timesteps(0)
    solver.set_timesteps(5)
    with pytest.raises(ValueError, match="not one of the scheduler's timesteps"):
        solver.step(torch.zeros(1), 998, torch.zeros(1))


def test_sampler_names_and_step_counts_are_checked():
    with pytest.raises(ValueError, match="'ddim', 'dpmpp_2m', 'dpmpp_3m', 'ddpm'"):
        DiffusionSampler(scheduler="euler")
    with pytest.raises(ValueError, match=r"\[1, num_train_timesteps=1000\]"):
        DiffusionSampler(scheduler="dpmpp_2m", num_inference_steps=1001)
    with pytest.raises(ValueError, match="'ddim', 'dpmpp_2m' or 'dpmpp_3m' for 1 to 1000 steps"):
        DiffusionSampler(scheduler="ddpm", num_inference_steps=10)


def test_sampler_takes_the_training_noise_schedule():
    training = DDPMScheduler(200, "scaled_linear_beta", beta_start=1e-3, beta_end=3e-2, prediction_type="sample")
    for name, steps in (("ddim", 8), ("dpmpp_2m", 8), ("dpmpp_3m", 8), ("ddpm", 200)):
        sampler = DiffusionSampler(scheduler=name, num_inference_steps=steps, noise_scheduler=training)
        torch.testing.assert_close(sampler.scheduler.alphas_cumprod, training.alphas_cumprod, rtol=0, atol=0)
        assert sampler.timesteps[0] < 200 and sampler.timesteps[-1] == 0
    assert DiffusionSampler(scheduler="dpmpp_3m").scheduler.solver_order == 3


def test_bundle_training_and_inference_share_the_noise_schedule():
    schedules = []
    for name in ("train.json", "inference.json"):
        parser = ConfigParser(json.loads((CONFIGS / name).read_text()))
        schedules.append(parser.get_parsed_content("noise_scheduler").alphas_cumprod)
    torch.testing.assert_close(schedules[0], schedules[1], rtol=0, atol=0)


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m", "dpmpp_3m"])
def test_one_step_starts_from_pure_noise_and_returns_its_clean_estimate(stand_in_network, scheduler):
    network = stand_in_network()
    sampler = DiffusionSampler(num_inference_steps=1, ensemble_size=2, scheduler=scheduler)
    assert sampler.timesteps == [999]
    image = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = sampler(network, image, generator=torch.Generator().manual_seed(1))
    (x_t, t), *later = network.denoise_inputs
    assert not later and t.tolist() == [999] * 6
    condition = network.encode_condition(image.repeat(2, 1, 1, 1))
    members = torch.sigmoid(network.denoise(x_t, t, condition)).view(2, 3, 3, 8, 8)  # member-major
    torch.testing.assert_close(out.probs, members.mean(0))
