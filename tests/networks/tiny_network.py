"""The tiny network the network tests share: the ``small`` preset shrunk to 3 levels of 8-16 channels, attention at
the last level (every block type of the full network, seconds on a CPU)."""

from __future__ import annotations

import torch

from medsegdiff_monai.networks import DiffusionUNetWithGradeHead, get_network

TINY = {
    "channels": (8, 8, 16),
    "condition_channels": (8, 8, 16),
    "attention_levels": (False, False, True),
    "num_head_channels": 8,
    "norm_num_groups": 4,
    "grade_hidden_channels": 8,
}


def tiny_network(channels_last: bool = False) -> DiffusionUNetWithGradeHead:
    """The tiny network with seed-0 weights in eval mode (no dropout), optionally in channels-last memory."""
    torch.manual_seed(0)
    network = get_network("small", **TINY).eval()
    return network.to(memory_format=torch.channels_last) if channels_last else network
