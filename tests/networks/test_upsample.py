"""NearestUpsample against nn.Upsample / F.interpolate, and the network rewrite."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import UpSample
from tiny_network import tiny_network

from medsegdiff_monai.networks import NearestUpsample, replace_nearest_upsampling


@pytest.mark.parametrize(
    "shape, factor, memory_format",
    [
        ((2, 3, 5, 7), 2, torch.contiguous_format),
        ((2, 6, 5, 7), 2, torch.channels_last),
        ((1, 4, 3, 4), 3, torch.channels_last),
        ((2, 1, 4, 4), 2, torch.channels_last),
        ((1, 2, 3, 4, 5), 2, torch.contiguous_format),
        ((1, 3, 3, 4, 2), 2, torch.channels_last_3d),
        ((2, 3, 9), 4, torch.contiguous_format),
    ],
)
def test_matches_interpolate_in_values_gradients_and_layout(shape, factor, memory_format):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator, dtype=torch.float64).contiguous(memory_format=memory_format)
    leaf, reference_leaf = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = NearestUpsample(factor)(leaf)
    reference = F.interpolate(reference_leaf, scale_factor=factor, mode="nearest")
    assert y.shape == reference.shape
    assert torch.equal(y, reference)
    assert y.is_contiguous(memory_format=memory_format)
    grad = torch.randn(reference.shape, generator=generator, dtype=torch.float64)
    y.backward(grad)
    reference.backward(grad)
    torch.testing.assert_close(leaf.grad, reference_leaf.grad, rtol=1e-12, atol=1e-12)
    # the gradient is the sum of each factor**d block of the output gradient, computed by hand
    block_sum = grad
    for dim in range(2, grad.ndim):
        block_sum = block_sum.unflatten(dim, (-1, factor)).sum(dim + 1)
    torch.testing.assert_close(leaf.grad, block_sum, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("factor", [0, 1.5, -2])
def test_rejects_non_integer_factor(factor):
    with pytest.raises(ValueError, match="scale_factor must be a positive integer"):
        NearestUpsample(factor)


def test_rewrite_replaces_only_integer_nearest_upsampling():
    network = nn.Sequential(
        UpSample(2, 4, 4, scale_factor=2, mode="nontrainable", interp_mode="nearest", align_corners=None),
        nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest"),
        nn.Upsample(scale_factor=2, mode="bilinear"),
        nn.Upsample(size=(8, 8), mode="nearest"),
        nn.Upsample(scale_factor=(2, 3), mode="nearest"),
    )
    replace_nearest_upsampling(network)
    kinds = [type(module).__name__ for module in network.modules() if "Upsample" in type(module).__name__]
    assert kinds == ["NearestUpsample", "NearestUpsample", "Upsample", "Upsample", "Upsample"]
    assert network[0].upsample_non_trainable.scale_factor == 2


def test_network_has_no_interpolating_upsample_left_and_matches_plain_upsampling():
    network = tiny_network()
    assert not any(type(module) is nn.Upsample for module in network.modules())
    replaced = [module for module in network.modules() if isinstance(module, NearestUpsample)]
    assert len(replaced) >= 2  # condition UNet decoder and diffusion UNet up blocks
    image, x_t, t = torch.randn(2, 4, 16, 16), torch.randn(2, 3, 16, 16), torch.tensor([3, 500])
    outputs = network(x_t, t, image)
    for module in replaced:  # back to interpolation: the very same outputs
        module.forward = lambda x, factor=module.scale_factor: F.interpolate(x, scale_factor=factor, mode="nearest")
    plain = network(x_t, t, image)
    for output, reference in zip(outputs, plain):
        assert torch.equal(output, reference)
