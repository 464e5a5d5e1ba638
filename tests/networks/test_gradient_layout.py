"""dense_gradient: identity forward, dense gradient in the input's layout; the network's hooks change no value."""

from __future__ import annotations

import pytest
import torch
from tiny_network import tiny_network

from medsegdiff_monai.networks.gradient_layout import dense_gradient


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_gradient_of_a_concatenated_tensor_becomes_dense(memory_format):
    conv = torch.nn.Conv2d(3, 4, 3, padding=1).to(memory_format=memory_format)
    x = torch.randn(2, 3, 5, 6).contiguous(memory_format=memory_format)
    skip = torch.randn(2, 5, 5, 6).contiguous(memory_format=memory_format)

    def gradient_reaching_conv_output(densify: bool) -> torch.Tensor:
        seen = []
        features = conv(x)
        features.register_hook(seen.append)
        out = dense_gradient(features) if densify else features
        torch.cat([out, skip], dim=1).square().sum().backward()
        return seen[0]

    plain, dense = gradient_reaching_conv_output(False), gradient_reaching_conv_output(True)
    assert not plain.is_contiguous(memory_format=memory_format)  # a channel slice of the concatenation's gradient
    assert dense.is_contiguous(memory_format=memory_format)
    assert torch.equal(plain, dense)


def test_forward_is_the_identity_without_a_copy():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    assert dense_gradient(x).data_ptr() == x.data_ptr()
    assert torch.equal(dense_gradient(x), x)


def test_network_hooks_change_neither_outputs_nor_gradients():
    network = tiny_network(channels_last=True)
    image = torch.randn(2, 4, 16, 16).contiguous(memory_format=torch.channels_last)
    x_t = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    t = torch.tensor([4, 800])
    hooked = [module for module in network.modules() if module._forward_hooks]
    assert len(hooked) >= 10

    def run() -> list[torch.Tensor]:
        network.zero_grad(set_to_none=True)
        outputs = network(x_t, t, image)
        sum(output.square().mean() for output in outputs).backward()
        return [output.detach() for output in outputs] + [p.grad.clone() for p in network.parameters()]

    with_hooks = run()
    for module in hooked:
        module._forward_hooks.clear()
    for value, reference in zip(with_hooks, run()):
        assert torch.equal(value, reference)
