"""The network inside MONAI's own diffusion pipeline: DiffusionInferer's training call and its sampling loop."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from medsegdiff_monai.networks import DiffusionInfererAdapter
from tests.networks.tiny_network import tiny_network

SIZE = 16


def alphas_cumprod() -> torch.Tensor:
    """abar_t of the linear beta schedule 1e-4 .. 0.02 over 1000 steps, by hand, in float64."""
    return torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(2, 4, SIZE, SIZE, generator=generator)
    mask = (torch.rand(2, 3, SIZE, SIZE, generator=generator) > 0.5).float() * 2 - 1
    return image, mask


def test_inferer_call_noises_the_mask_and_returns_the_clean_mask_estimate():
    network = tiny_network()
    image, mask = inputs()
    noise = torch.randn_like(mask)
    timesteps = torch.tensor([10, 900])
    inferer = DiffusionInferer(DDPMScheduler(1000, prediction_type="sample"))
    with torch.no_grad():
        prediction = inferer(
            inputs=mask,
            diffusion_model=DiffusionInfererAdapter(network),
            noise=noise,
            timesteps=timesteps,
            condition=image,
            mode="crossattn",
        )
        abar = alphas_cumprod()[timesteps].view(-1, 1, 1, 1)
        x_t = (abar.sqrt() * mask + (1 - abar).sqrt() * noise).float()
        expected = torch.tanh(network(x_t, timesteps, image)[0] / 2)
    torch.testing.assert_close(prediction, expected, rtol=1e-4, atol=1e-5)


def test_inferer_sample_runs_ddim_end_to_end():
    """DiffusionInferer.sample with a MONAI DDIM scheduler equals deterministic DDIM written out by hand."""
    network = tiny_network()
    image, _ = inputs()
    start = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    scheduler = DDIMScheduler(1000, prediction_type="sample")
    scheduler.set_timesteps(5)
    with torch.no_grad():
        sample = DiffusionInferer(scheduler).sample(
            start, DiffusionInfererAdapter(network), conditioning=image, mode="crossattn", verbose=False
        )
        abar = alphas_cumprod()
        x = start.double()
        condition = network.encode_condition(image)
        for t in scheduler.timesteps.tolist():  # 5 of 1000: each step goes back 200 timesteps
            x0 = torch.tanh(network.denoise(x.float(), torch.full((2,), t), condition).double() / 2)
            eps = (x - abar[t].sqrt() * x0) / (1 - abar[t]).sqrt()
            abar_prev = abar[t - 200] if t >= 200 else torch.tensor(1.0, dtype=torch.float64)
            x = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps
    assert sample.shape == (2, 3, SIZE, SIZE)
    torch.testing.assert_close(sample.double(), x, rtol=1e-4, atol=1e-4)


def test_adapter_without_the_image_says_how_to_call_it():
    with pytest.raises(ValueError, match="condition=image"):
        DiffusionInfererAdapter(tiny_network())(torch.zeros(1, 3, SIZE, SIZE), torch.tensor([5]))
