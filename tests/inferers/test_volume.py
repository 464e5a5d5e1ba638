from __future__ import annotations

import math

import pytest
import torch

from medsegdiff_monai.inferers import (
    DiffusionSampler,
    balanced_batch_size,
    brain_slice_mask,
    default_slice_batch_size,
    sample_volume,
    slice_batch_size_for_memory,
    subject_p_hgg,
)
from medsegdiff_monai.networks import get_network


def _volume(depth: int = 9, empty: tuple[int, ...] = (0, 1, 8)) -> torch.Tensor:
    image = torch.randn(4, 12, 12, depth, generator=torch.Generator().manual_seed(5))
    image[..., list(empty)] = 0
    return image


def test_brain_slice_mask():
    image = _volume()
    image[2, 3, 3, 1] = 0.2  # one faint voxel in one channel
    assert brain_slice_mask(image).tolist() == [False, True] + [True] * 6 + [False]
    assert brain_slice_mask(image, brain_threshold=0.5).tolist() == [False, False] + [True] * 6 + [False]


def test_skips_slices_without_brain_and_matches_slice_sampling(stand_in_network):
    network = stand_in_network(noise_gain=0.0)
    image = _volume()
    sampler = DiffusionSampler(num_inference_steps=3, ensemble_size=2)
    out = sample_volume(network, image, sampler, slice_batch_size=4)
    assert out.probs.shape == out.uncertainty.shape == (3, 12, 12, 9)
    assert network.encode_batches == [3, 3]  # only the 6 brain slices, in two equal batches of at most 4
    for empty in (0, 1, 8):
        assert float(out.probs[..., empty].abs().max()) == 0.0
        assert float(out.uncertainty[..., empty].abs().max()) == 0.0
        assert math.isnan(float(out.slice_p_hgg[empty]))
    direct = sampler(network, image[..., 4].unsqueeze(0))
    torch.testing.assert_close(out.probs[..., 4], direct.probs[0])
    torch.testing.assert_close(out.slice_p_hgg[4], direct.p_hgg[0])


def test_batch_size_does_not_change_a_noise_free_result(stand_in_network):
    network = stand_in_network(noise_gain=0.0)
    sampler = DiffusionSampler(num_inference_steps=2, ensemble_size=2)
    image = _volume()
    one = sample_volume(network, image, sampler, slice_batch_size=1)
    many = sample_volume(network, image, sampler, slice_batch_size=32)
    torch.testing.assert_close(one.probs, many.probs)
    assert one.p_hgg == pytest.approx(many.p_hgg)


@pytest.mark.parametrize("shared_steps, batch_shapes", [(0, {8}), (1, {4, 8})])
def test_compiled_sampler_gets_static_batch_shapes(stand_in_network, monkeypatch, shared_steps, batch_shapes):
    network = stand_in_network(noise_gain=0.0)
    image = _volume()
    options = {"num_inference_steps": 2, "ensemble_size": 2, "shared_steps": shared_steps}
    eager = sample_volume(network, image, DiffusionSampler(**options), slice_batch_size=4)
    compiled = DiffusionSampler(**options, compile=True)
    # the padding depends on the flag alone; the plain denoise keeps the test free of compilation time
    monkeypatch.setattr(compiled, "_denoise_function", lambda network: network.denoise)
    network.encode_batches.clear()
    network.denoise_inputs.clear()
    padded = sample_volume(network, image, compiled, slice_batch_size=4)
    assert network.encode_batches == [4, 4]  # 6 brain slices: the second batch padded from 2 to 4
    # one shape for the members' passes, one for the shared passes (slices alone)
    assert {x_t.shape[0] for x_t, _ in network.denoise_inputs} == batch_shapes
    torch.testing.assert_close(padded.probs, eager.probs)
    torch.testing.assert_close(padded.uncertainty, eager.uncertainty)
    torch.testing.assert_close(padded.slice_p_hgg, eager.slice_p_hgg, equal_nan=True)
    assert padded.p_hgg == pytest.approx(eager.p_hgg)


@pytest.mark.parametrize(
    "count, max_batch_size, multiple, expected",
    [
        (136, 16, 1, 16),  # 9 batches: 8 x 16 + 8
        (136, 68, 8, 68),  # 68 is its own bound
        (140, 68, 1, 47),  # 3 batches: 47, 47, 46 instead of 68, 68, 4
        (140, 68, 8, 48),
        (130, 68, 8, 68),  # 65 rounds to 72, past the bound
        (5, 16, 8, 8),
        (0, 16, 8, 16),
    ],
)
def test_balanced_batch_size(count, max_batch_size, multiple, expected):
    size = balanced_batch_size(count, max_batch_size, multiple)
    assert size == expected
    if count:  # never more batches than the fewest at the bound
        assert math.ceil(count / size) == math.ceil(count / max_batch_size)


def test_compiled_sampler_balances_its_batches(stand_in_network, monkeypatch):
    network = stand_in_network(noise_gain=0.0)
    image = _volume(depth=21, empty=(0,))  # 20 brain slices, at most 16 per batch
    compiled = DiffusionSampler(num_inference_steps=1, ensemble_size=1, compile=True)
    monkeypatch.setattr(compiled, "_denoise_function", lambda network: network.denoise)
    sample_volume(network, image, compiled, slice_batch_size=16)
    assert network.encode_batches == [16, 16]  # two batches of 10, each padded to 16 (multiple of 8, bound 16)
    network.encode_batches.clear()
    sample_volume(network, image, compiled, slice_batch_size=12)
    assert network.encode_batches == [12, 12]  # 10 rounds up to 16, past the bound of 12
    network.encode_batches.clear()
    sample_volume(network, _volume(depth=25, empty=(0,)), compiled, slice_batch_size=20)
    assert network.encode_batches == [16, 16]  # 24 slices: two batches of 12, padded to 16 (not to 20)


def _pooled(p: torch.Tensor) -> float:
    """sigmoid of the mean log-odds (torch.logit as the reference)."""
    return float(torch.sigmoid(torch.logit(p.double()).mean()))


def test_subject_p_hgg_pools_log_odds_of_tumour_slices_then_falls_back():
    slice_p = torch.tensor([0.2, 0.9, 0.7, 0.1])
    # by hand: logit 0.9 = log 9, logit 0.7 = log(7/3); sigmoid of their mean = sqrt(21) / (1 + sqrt(21))
    assert subject_p_hgg(slice_p, torch.tensor([False, True, True, False])) == pytest.approx(21**0.5 / (1 + 21**0.5))
    # the four slices: logits log(1/4), log 9, log(7/3), log(1/9) -> sigmoid((log(7/12)) / 4)
    assert subject_p_hgg(slice_p, torch.zeros(4, dtype=torch.bool)) == pytest.approx(_pooled(slice_p))
    assert _pooled(slice_p) == pytest.approx(1 / (1 + (12 / 7) ** 0.25))
    # one confident slice among uncertain ones moves the log-odds pool more than the mean probability
    assert subject_p_hgg(torch.tensor([0.999, 0.5, 0.5]), torch.ones(3, dtype=torch.bool)) > 0.9
    # saturated slices stay finite
    assert 0.5 < subject_p_hgg(torch.tensor([1.0, 0.0, 1.0]), torch.ones(3, dtype=torch.bool)) < 1.0
    with pytest.warns(UserWarning, match="no brain slice"):
        assert math.isnan(subject_p_hgg(torch.zeros(0), torch.zeros(0, dtype=torch.bool)))


def test_volume_grade_is_mean_over_slices_with_predicted_tumour(stand_in_network):
    network = stand_in_network(noise_gain=0.0)
    image = _volume()
    sampler = DiffusionSampler(num_inference_steps=2, ensemble_size=1)
    reference = sample_volume(network, image, sampler)
    brain = [2, 3, 4, 5, 6, 7]
    slice_max = {d: float(reference.probs[..., d].max()) for d in brain}
    threshold = sorted(slice_max.values())[2]  # three slices above it, three at or below
    tumour = [d for d in brain if slice_max[d] > threshold]
    assert len(tumour) == 3
    out = sample_volume(network, image, sampler, tumour_threshold=threshold)
    assert out.p_hgg == pytest.approx(_pooled(reference.slice_p_hgg[tumour]))
    assert out.p_hgg != pytest.approx(_pooled(reference.slice_p_hgg[brain]))
    # a threshold no voxel reaches falls back to every brain slice
    strict = sample_volume(network, image, sampler, tumour_threshold=1.0)
    assert strict.p_hgg == pytest.approx(_pooled(reference.slice_p_hgg[brain]))


def test_volume_without_brain(stand_in_network):
    with pytest.warns(UserWarning, match="no brain slice"):
        out = sample_volume(stand_in_network(), torch.zeros(4, 8, 8, 3), DiffusionSampler(num_inference_steps=2))
    assert out.probs.shape == (3, 8, 8, 3) and float(out.probs.abs().max()) == 0.0
    assert math.isnan(out.p_hgg)
    out = sample_volume(stand_in_network(use_grade_head=False), torch.zeros(4, 8, 8, 3), DiffusionSampler(2))
    assert out.p_hgg is None and out.slice_p_hgg is None
    # an empty volume cropped to its (absent) brain has no slice at all
    with pytest.warns(UserWarning, match="no brain slice"):
        out = sample_volume(stand_in_network(), torch.zeros(4, 8, 8, 0), DiffusionSampler(num_inference_steps=2))
    assert out.probs.shape == (3, 8, 8, 0) and math.isnan(out.p_hgg)


def test_rejects_a_slice_batch_instead_of_a_volume(stand_in_network):
    with pytest.raises(ValueError, match="channels, H, W, D"):
        sample_volume(stand_in_network(), torch.zeros(2, 4, 8, 8, 3), DiffusionSampler(2))


@pytest.mark.parametrize(
    "device, roi_size, expected",
    [("cuda", (192, 192), 32), ("cuda:1", (64, 64), 32), ("cpu", (64, 64), 4), ("cpu", (32, 32), 16),
     ("cpu", (96, 96), 1), ("cpu", (192, 192), 1), (torch.device("cpu"), [48, 64], 5)],
)  # fmt: skip
def test_default_slice_batch_size(device, roi_size, expected):
    """On a CPU 4 x 64 x 64 in-plane pixels per call (48 x 64: 16384 // 3072 = 5), at least one slice."""
    assert default_slice_batch_size(device, roi_size) == expected


@pytest.mark.parametrize(
    "free_gib, ensemble_size, expected",
    [
        (24, 5, 23),  # 0.6 * 24 GiB = 15,461,882,265 B / (5 * 192 * 192 * 3,584 B = 660,602,880 B) = 23.4
        (79.19, 5, 68),  # an idle H100's 79.19 GiB: 77.2 slices, capped at 68
        (79.19, 10, 38),  # ten members: half the slices, 38.6
        (1, 5, 1),  # 0.98 of a slice: at least one
    ],
)
def test_slice_batch_size_for_memory_on_a_gpu(monkeypatch, free_gib, ensemble_size, expected):
    """The most slices whose inputs, at 3,584 bytes per input pixel, fit in 60 % of the card's free memory, at most
    68."""
    asked = []

    def memory(device):
        asked.append(device)
        return int(free_gib * 2**30), 80 * 2**30

    monkeypatch.setattr(torch.cuda, "mem_get_info", memory)
    assert slice_batch_size_for_memory("cuda:1", (192, 192), ensemble_size) == expected
    assert asked == [torch.device("cuda:1")]


def test_slice_batch_size_for_memory_elsewhere_is_the_device_rule(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: pytest.fail("no GPU is asked"))
    assert slice_batch_size_for_memory("cpu", (64, 64), 5) == default_slice_batch_size("cpu", (64, 64)) == 4


def test_slice_batch_defaults_to_the_device_rule(stand_in_network):
    """Without ``slice_batch_size`` a CPU call takes the slices of 4 x 64 x 64 in-plane pixels: all 6 brain slices of
    a 12 x 12 volume at once, one 96 x 96 slice at a time."""
    network = stand_in_network(noise_gain=0.0)
    sampler = DiffusionSampler(num_inference_steps=2, ensemble_size=2)
    sample_volume(network, _volume(), sampler)
    assert network.encode_batches == [6]
    network.encode_batches.clear()
    large = torch.randn(4, 96, 96, 3, generator=torch.Generator().manual_seed(1))
    sample_volume(network, large, sampler)
    assert network.encode_batches == [1, 1, 1]


def test_a_volume_with_the_wrong_number_of_modalities_is_named_as_given():
    network = get_network("small", use_grade_head=False)
    with pytest.raises(ValueError, match=r"image must have shape \(4, H, W, D\) .*got \(3, 16, 16, 4\)"):
        sample_volume(network, torch.zeros(3, 16, 16, 4), DiffusionSampler(num_inference_steps=1, ensemble_size=1))
