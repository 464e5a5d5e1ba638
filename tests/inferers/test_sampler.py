from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from medsegdiff_monai.inferers import DiffusionSampler, make_sampling_scheduler, repeat_condition
from medsegdiff_monai.networks import get_network


def _image(batch: int = 2, size: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(seed))


def test_output_shapes_and_condition_reuse(stand_in_network):
    network = stand_in_network()
    image = _image(batch=3)
    sampler = DiffusionSampler(num_inference_steps=4, ensemble_size=5, return_members=True)
    out = sampler(network, image)
    assert out.probs.shape == (3, 3, 12, 12)
    assert out.uncertainty.shape == (3, 3, 12, 12)
    assert out.member_probs.shape == (5, 3, 3, 12, 12)
    assert out.p_hgg.shape == (3,)
    # the condition network ran once, on the 3 slices; the denoiser 4 times on 5 x 3 inputs
    assert network.encode_batches == [3]
    assert [x.shape[0] for x, _ in network.denoise_inputs] == [15] * 4
    with torch.no_grad():
        condition = network.encode_condition(image)
    torch.testing.assert_close(out.p_hgg, torch.softmax(condition.grade_logits, dim=1)[:, 1])
    torch.testing.assert_close(out.calib_probs, torch.sigmoid(condition.calib_map))


def test_mean_and_std_over_members(stand_in_network):
    sampler = DiffusionSampler(num_inference_steps=3, ensemble_size=4, return_members=True)
    out = sampler(stand_in_network(), _image())
    members = out.member_probs.numpy()
    assert not np.allclose(members[0], members[1])  # different noise, different draws
    np.testing.assert_allclose(out.probs.numpy(), members.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.uncertainty.numpy(), members.std(axis=0), rtol=1e-4, atol=1e-6)
    assert not np.allclose(out.probs.numpy(), (members**2).mean(axis=0))  # not the public code's squared mean


def test_members_agree_when_network_ignores_noise(stand_in_network):
    network = stand_in_network(noise_gain=0.0)
    image = _image()
    out = DiffusionSampler(num_inference_steps=5, ensemble_size=6, return_members=True)(network, image)
    assert out.member_probs.shape[0] == 6
    assert float(out.uncertainty.abs().max()) < 1e-6
    # the output is sigmoid of the logits of the last step, t = 0
    last_t = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        expected = torch.sigmoid(network.denoise(torch.zeros(2, 3, 12, 12), last_t, network.encode_condition(image)))
    torch.testing.assert_close(out.probs, expected)


def test_ddim_timesteps_match_the_step_stride_and_end_at_zero():
    assert DiffusionSampler(num_inference_steps=10).timesteps == list(range(900, -1, -100))
    assert DiffusionSampler(num_inference_steps=25).timesteps == list(range(960, -1, -40))
    assert DiffusionSampler(num_inference_steps=30).timesteps == list(range(957, -1, -33))
    assert DiffusionSampler(num_inference_steps=1000).timesteps == list(range(999, -1, -1))
    assert DiffusionSampler(scheduler="ddpm", num_inference_steps=1000).timesteps == list(range(999, -1, -1))


def test_ddim_update_matches_hand_formula(stand_in_network):
    network = stand_in_network()
    image = _image(batch=1)
    sampler = DiffusionSampler(num_inference_steps=10, ensemble_size=2)
    sampler(network, image)
    (x_900, t_900), (x_800, t_800) = network.denoise_inputs[:2]
    assert t_900.tolist() == [900, 900] and t_800.tolist() == [800, 800]
    with torch.no_grad():
        condition = repeat_condition(network.encode_condition(image), 2)
        x0 = torch.tanh(network.denoise(x_900, t_900, condition) / 2)
    alphas_cumprod = DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta").alphas_cumprod.double()
    a_t, a_prev = alphas_cumprod[900], alphas_cumprod[800]
    eps = (x_900.double() - a_t.sqrt() * x0.double()) / (1 - a_t).sqrt()
    expected = a_prev.sqrt() * x0.double() + (1 - a_prev).sqrt() * eps
    torch.testing.assert_close(x_800.double(), expected, rtol=1e-4, atol=1e-5)


def test_shared_steps_run_once_per_slice_and_feed_every_member(stand_in_network):
    network = stand_in_network()
    image = _image(batch=2)
    sampler = DiffusionSampler(num_inference_steps=10, ensemble_size=3, shared_steps=2, seed=5)
    sampler(network, image)
    # the first two passes see the first member's 2 slices, the others all 3 x 2 inputs
    assert [x.shape[0] for x, _ in network.denoise_inputs] == [2, 2] + [6] * 8
    x_900 = torch.randn(6, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(network.denoise_inputs[0][0], x_900[:2], rtol=0, atol=0)
    alphas_cumprod = DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta").alphas_cumprod.double()
    with torch.no_grad():
        condition = network.encode_condition(image)

        def ddim_step(x_t: torch.Tensor, t: int) -> torch.Tensor:
            # DDIM by hand, every member with the x0 estimate of the first member's sample, tiled member-major
            x0 = torch.tanh(network.denoise(x_t[:2], torch.full((2,), t), condition) / 2).double().repeat(3, 1, 1, 1)
            a_t, a_prev = alphas_cumprod[t], alphas_cumprod[t - 100]
            eps = (x_t.double() - a_t.sqrt() * x0) / (1 - a_t).sqrt()
            return (a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps).float()

        x_700 = ddim_step(ddim_step(x_900, 900), 800)
    torch.testing.assert_close(network.denoise_inputs[1][0], ddim_step(x_900, 900)[:2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(network.denoise_inputs[2][0], x_700, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(x_700[:2], x_700[2:4])  # the members keep their own noise


def test_seeded_generator_is_reproducible(stand_in_network):
    image = _image()
    first = DiffusionSampler(num_inference_steps=3, seed=7)(stand_in_network(), image)
    again = DiffusionSampler(num_inference_steps=3, seed=7)(stand_in_network(), image)
    other = DiffusionSampler(num_inference_steps=3, seed=8)(stand_in_network(), image)
    torch.testing.assert_close(first.probs, again.probs, rtol=0, atol=0)
    assert not torch.allclose(first.probs, other.probs)


def test_sde_sampling_is_reproducible_and_draws_its_own_noise(stand_in_network):
    image = _image()

    def probs(eta: float, seed: int) -> torch.Tensor:
        sampler = DiffusionSampler(scheduler="dpmpp_2m", num_inference_steps=4, eta=eta, seed=seed)
        return sampler(stand_in_network(), image).probs

    first = probs(1.0, 7)
    torch.testing.assert_close(probs(1.0, 7), first, rtol=0, atol=0)
    assert not torch.allclose(probs(1.0, 8), first)
    assert not torch.allclose(probs(0.0, 7), first)  # same initial noise, the SDE's own noise on top


def test_without_classification_head(stand_in_network):
    out = DiffusionSampler(num_inference_steps=2, ensemble_size=1)(stand_in_network(use_grade_head=False), _image())
    assert out.p_hgg is None and out.member_probs is None
    assert float(out.uncertainty.abs().max()) == 0.0


def test_invalid_arguments():
    with pytest.raises(ValueError, match="ddpm"):
        DiffusionSampler(scheduler="ddpm", num_inference_steps=10)
    with pytest.raises(ValueError, match="scheduler"):
        DiffusionSampler(scheduler="euler")
    with pytest.raises(ValueError, match="ensemble_size"):
        DiffusionSampler(ensemble_size=0)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        DiffusionSampler(scheduler="dpmpp_2m", eta=-0.5)
    for shared_steps in (-1, 4):
        with pytest.raises(ValueError, match=r"shared_steps must be in \[0, num_inference_steps\) = \[0, 4\)"):
            DiffusionSampler(num_inference_steps=4, shared_steps=shared_steps)
    # a step count out of range is named as such, not as a range of shared_steps
    for steps in (0, 1001):
        with pytest.raises(
            ValueError, match=rf"num_inference_steps must be in \[1, num_train_timesteps=1000\], got {steps}"
        ):
            DiffusionSampler(scheduler="dpmpp_2m", num_inference_steps=steps)
    with pytest.raises(ValueError, match="leave eta at 0 for 'ddpm'"):
        DiffusionSampler(scheduler="ddpm", num_inference_steps=1000, eta=1.0)
    with pytest.raises(ValueError, match="shape"):
        DiffusionSampler()(None, torch.zeros(4, 8, 8))


def test_scheduler_arguments_are_checked_against_class_and_schedule():
    # accepted: an argument of the scheduler class and one of the noise schedule, as MONAI's own class takes them
    built = make_sampling_scheduler("ddim", 10, schedule_args={"beta_end": 0.03}, scheduler_args={"clip_sample": False})
    reference = DDIMScheduler(1000, "linear_beta", clip_sample=False, prediction_type="sample", beta_end=0.03)
    torch.testing.assert_close(built.alphas_cumprod, reference.alphas_cumprod, rtol=0, atol=0)
    assert built.clip_sample is False
    # an argument only DPM-Solver++ takes is refused for DDIM, naming it and the accepted ones
    with pytest.raises(ValueError, match=r"takes none of \['timestep_spacing'\].*'beta_end'.*'clip_sample'"):
        make_sampling_scheduler("ddim", 10, scheduler_args={"timestep_spacing": "leading"})
    # the order is set by the name, the prediction type by the network
    for name, argument in (("dpmpp_2m", "solver_order"), ("ddim", "prediction_type")):
        with pytest.raises(ValueError, match=rf"takes none of \['{argument}'\]"):
            make_sampling_scheduler(name, 10, scheduler_args={argument: 3})
    with pytest.raises(ValueError, match="schedule must be one of 'linear_beta'.*got 'linear'"):
        make_sampling_scheduler("ddim", 10, schedule="linear")
    assert make_sampling_scheduler("dpmpp_2m", 10, scheduler_args={"timestep_spacing": "leading"}).timesteps[0] == 900


@pytest.mark.parametrize("config", ["train.json", "inference.json"])
def test_a_misspelled_noise_schedule_is_named_with_the_valid_ones(config):
    """The bundle builds MONAI's training scheduler first, whose own error says only "Component 'cosin' not found"."""
    from pathlib import Path

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(Path(__file__).resolve().parents[2] / "bundle" / "configs" / config))
    parser["noise_schedule"] = "cosine"
    assert parser.get_parsed_content("noise_scheduler").alphas_cumprod[-1] < 1e-3
    parser["noise_schedule"] = "cosin"
    with pytest.raises(RuntimeError) as raised:  # MONAI wraps the config's error
        parser.get_parsed_content("noise_scheduler", lazy=False)
    assert (
        "schedule must be one of 'linear_beta', 'scaled_linear_beta', 'sigmoid_beta' or 'cosine', got 'cosin'"
        in str(raised.value.__cause__)
    )


def _train_disc_model(network, steps: int = 60) -> None:
    """Train the stand-in for a few steps to predict the mask 'channel 0 > 0' from noisy masks."""
    generator = torch.Generator().manual_seed(0)
    scheduler = DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta", prediction_type="sample")
    optimizer = torch.optim.Adam(network.parameters(), lr=2e-2)
    network.train()
    for _ in range(steps):
        image = torch.randn(8, 4, 12, 12, generator=generator)
        mask = (image[:, :1] > 0).float().repeat(1, 3, 1, 1)
        t = torch.randint(0, 1000, (8,), generator=generator)
        x_t = scheduler.add_noise(2 * mask - 1, torch.randn(mask.shape, generator=generator), t)
        seg_logits, _, calib = network(x_t, t, image)
        loss = F.binary_cross_entropy_with_logits(seg_logits, mask) + F.binary_cross_entropy_with_logits(calib, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    network.eval()


def test_few_step_ddim_agrees_with_1000_step_ddpm(stand_in_network):
    network = stand_in_network()
    _train_disc_model(network)
    image = _image(batch=4, seed=3)
    target = image[:, :1] > 0
    ddim = DiffusionSampler(num_inference_steps=10, ensemble_size=2)(network, image).probs > 0.5
    ddpm = DiffusionSampler(scheduler="ddpm", num_inference_steps=1000, ensemble_size=2)(network, image).probs > 0.5
    agreement = (ddim == ddpm).float().mean()
    assert agreement > 0.95, f"DDIM-10 and DDPM-1000 agree on {float(agreement):.3f} of voxels"
    assert (ddim == target).float().mean() > 0.9


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m", "dpmpp_3m"])
def test_nan_probabilities_are_caught_and_named(stand_in_network, scheduler, monkeypatch):
    network = stand_in_network()  # its denoiser answers NaN, as an overflowing solver would
    monkeypatch.setattr(network, "denoise", lambda x_t, t, condition: torch.full_like(x_t, float("nan")))
    sampler = DiffusionSampler(scheduler=scheduler, num_inference_steps=3, ensemble_size=2)
    with pytest.raises(FloatingPointError, match=f"scheduler '{scheduler}' with 3 steps produced NaN"):
        sampler(network, _image())


def test_few_step_dpm_solver_agrees_with_1000_step_ddpm(stand_in_network):
    network = stand_in_network()
    _train_disc_model(network)
    image = _image(batch=4, seed=3)
    solver = DiffusionSampler(scheduler="dpmpp_2m", num_inference_steps=5, ensemble_size=2)(network, image).probs
    ddpm = DiffusionSampler(scheduler="ddpm", num_inference_steps=1000, ensemble_size=2)(network, image).probs
    agreement = ((solver > 0.5) == (ddpm > 0.5)).float().mean()
    assert agreement > 0.95, f"DPM-Solver++(2M) 5 steps and DDPM-1000 agree on {float(agreement):.3f} of voxels"


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m", "dpmpp_3m"])
def test_every_step_gets_the_same_layout_from_a_channels_last_network(stand_in_network, scheduler):
    # a compiled denoise recompiles when the strides of x_t change between steps
    network = stand_in_network().to(memory_format=torch.channels_last)
    image = _image().contiguous(memory_format=torch.channels_last)
    DiffusionSampler(scheduler=scheduler, num_inference_steps=3, ensemble_size=2)(network, image)
    assert [x_t.is_contiguous() for x_t, _ in network.denoise_inputs] == [True] * 3


def test_a_network_in_training_mode_is_warned_of_and_keeps_its_statistics_in_eval():
    network = get_network("small", use_grade_head=True).train()
    statistics = {name: buffer.clone() for name, buffer in network.named_buffers() if "running" in name}
    assert statistics
    image = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    sampler = DiffusionSampler(num_inference_steps=1, ensemble_size=1)
    with pytest.warns(UserWarning, match="in training mode: dropout is active"):
        sampler(network, image)
    changed = [
        name
        for name, buffer in network.named_buffers()
        if name in statistics and not torch.equal(buffer, statistics[name])
    ]
    assert changed  # what the warning is about
    network.eval()
    for name, buffer in network.named_buffers():
        if name in statistics:
            statistics[name] = buffer.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sampler(network, image)
    assert all(torch.equal(buffer, statistics[name]) for name, buffer in network.named_buffers() if name in statistics)


def test_a_step_count_that_is_not_a_whole_number_is_named():
    with pytest.raises(ValueError, match=r"num_inference_steps must be a whole number of steps, got 5.0"):
        DiffusionSampler(num_inference_steps=5.0)
    assert len(DiffusionSampler(num_inference_steps=np.int64(5)).timesteps) == 5
