"""The network traces into one graph for torch.compile (no graph break), forward and backward, as on the GPU.

A graph break splits the compiled training step and the compiled sampler step, and with CUDA graphs every piece
costs a separate replay and host round trip; the ``aot_eager`` backend traces exactly what inductor would receive
(Dynamo, then AOTAutograd's joint forward + backward graph) without generating code, so it runs in seconds on a CPU.
"""

from __future__ import annotations

import torch
from tiny_network import tiny_network


def test_forward_backward_and_denoise_compile_without_graph_breaks():
    # eval (tiny_network's): the grade head's dropout would draw different masks in the two runs
    network = tiny_network(channels_last=True)
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(2, 4, 16, 16, generator=generator).contiguous(memory_format=torch.channels_last)
    x_t = torch.randn(2, 3, 16, 16, generator=generator).contiguous(memory_format=torch.channels_last)
    t = torch.tensor([7, 650])

    def loss_and_grads(forward) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        network.zero_grad(set_to_none=True)
        outputs = forward(x_t, t, image)
        sum(output.square().mean() for output in outputs).backward()
        return [output.detach() for output in outputs], [p.grad.clone() for p in network.parameters()]

    eager_outputs, eager_grads = loss_and_grads(network)
    compiled_outputs, compiled_grads = loss_and_grads(torch.compile(network, backend="aot_eager", fullgraph=True))
    for compiled, eager in zip(compiled_outputs + compiled_grads, eager_outputs + eager_grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)

    with torch.no_grad():
        condition = network.encode_condition(image)
        denoise = torch.compile(network.denoise, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(denoise(x_t, t, condition), network.denoise(x_t, t, condition))
