"""The small network overfits two synthetic slices (one LGG, one HGG) in 50 steps."""

from __future__ import annotations

import torch
from monai.networks.schedulers import DDPMScheduler

from medsegdiff_monai.losses import GradeFocalLoss, SegmentationLoss
from medsegdiff_monai.networks import get_network

SIZE = 32


def _disk(center: tuple[float, float], radius: float) -> torch.Tensor:
    coordinates = torch.arange(SIZE, dtype=torch.float32)
    yy, xx = torch.meshgrid(coordinates, coordinates, indexing="ij")
    return (((yy - center[0]) ** 2 + (xx - center[1]) ** 2) <= radius**2).float()


def _two_slices() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (2, 4, S, S) [t1, t1ce, t2, flair], TC/WT/ET masks (2, 3, S, S), grades (LGG=0, HGG=1)."""
    generator = torch.Generator().manual_seed(0)
    brain = _disk((16, 16), 14)
    # LGG: small oedema, non-enhancing core, no ET; HGG: larger oedema, enhancing rim (bright on t1ce) around necrosis
    lgg_wt, lgg_tc = _disk((12, 18), 6), _disk((12, 18), 3)
    hgg_wt, hgg_tc, hgg_necrosis = _disk((18, 13), 9), _disk((18, 13), 6), _disk((18, 13), 3)
    hgg_et = hgg_tc - hgg_necrosis
    images, masks = [], []
    for wt, tc, et in ((lgg_wt, lgg_tc, torch.zeros_like(lgg_wt)), (hgg_wt, hgg_tc, hgg_et)):
        t1 = brain * (1.0 - 0.5 * tc)
        t1ce = brain * (1.0 - 0.5 * tc) + 2.0 * et
        t2 = brain + 1.5 * wt
        flair = brain + 1.0 * wt - 0.5 * (tc - et)
        image = torch.stack([t1, t1ce, t2, flair]) + 0.1 * torch.randn(4, SIZE, SIZE, generator=generator)
        images.append(image)
        masks.append(torch.stack([tc, wt, et]))
    return torch.stack(images), torch.stack(masks), torch.tensor([0, 1])


def _eval_seg_loss(network, scheduler, seg_loss, image, mask, noise, timesteps) -> float:
    network.eval()
    with torch.no_grad():
        x_t = scheduler.add_noise(2 * mask - 1, noise, timesteps)
        seg_logits, _, calib_map = network(x_t, timesteps, image)
        return float(seg_loss(seg_logits, mask, calib_map))


def test_small_network_overfits_two_slices_and_separates_grades():
    torch.manual_seed(0)
    image, mask, grade = _two_slices()
    network = get_network("small", grade_dropout=0.0)
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="sample")
    seg_loss, grade_loss = SegmentationLoss(), GradeFocalLoss(alpha=(1.0, 1.0))
    optimizer = torch.optim.AdamW(network.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(1)
    eval_noise = torch.randn(mask.shape, generator=generator)
    eval_t = torch.tensor([200, 700])
    before = _eval_seg_loss(network, scheduler, seg_loss, image, mask, eval_noise, eval_t)
    for _ in range(50):
        network.train()
        timesteps = torch.randint(0, 1000, (2,), generator=generator)
        x_t = scheduler.add_noise(2 * mask - 1, torch.randn(mask.shape, generator=generator), timesteps)
        seg_logits, grade_logits, calib_map = network(x_t, timesteps, image)
        loss = seg_loss(seg_logits, mask, calib_map) + grade_loss(grade_logits, grade)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    after = _eval_seg_loss(network, scheduler, seg_loss, image, mask, eval_noise, eval_t)
    assert after < 0.5 * before, (before, after)
    with torch.no_grad():
        grade_logits = network.eval().encode_condition(image).grade_logits
    assert torch.equal(grade_logits.argmax(dim=1), grade), grade_logits
