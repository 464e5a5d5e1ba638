"""AdamW over the network and the loss module's learnable weights, with weight decay only where it belongs."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["build_optimizer", "count_parameters"]


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``module`` (only those with ``requires_grad`` when ``trainable_only``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def build_optimizer(
    network: nn.Module,
    loss_module: nn.Module | None = None,
    lr: float = 1e-4,
    weight_decay: float = 1e-4,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW with two groups: weight decay on conv/linear weights (ndim > 1); none on biases, norm parameters and
    the loss module's log-sigmas (`docs/design.md`, section 2).

    Args:
        network: the model.
        loss_module: e.g. :class:`~medsegdiff_monai.losses.UncertaintyWeightedLoss` (its parameters join the
            no-decay group).
        lr: base learning rate (stages multiply it).
        weight_decay: decoupled weight decay of the first group.
        fused: fused AdamW kernel; None uses it when every parameter is on CUDA.
    """
    decay, no_decay = [], []
    for parameter in network.parameters():
        (decay if parameter.ndim > 1 else no_decay).append(parameter)
    if loss_module is not None:
        no_decay.extend(loss_module.parameters())
    if fused is None:
        fused = all(p.is_cuda for p in decay + no_decay)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=fused)
