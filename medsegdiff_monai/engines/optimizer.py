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
    log_sigma_lr: float | None = None,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW with weight decay only where it belongs (`docs/design.md`, section 2), and the uncertainty weights at
    their own learning rate.

    Groups, in order:

    - conv/linear weights (ndim > 1) of ``network``: ``lr``, weight decay ``weight_decay``;
    - biases and norm parameters of ``network``: ``lr``, no weight decay;
    - the parameters of ``loss_module`` (the log-sigmas ``s_t`` of the uncertainty weighting), when given:
      ``log_sigma_lr``, no weight decay, ``"follows_stage_lr": False`` (the stages' ``lr_multiplier`` leaves it
      alone, see :class:`~medsegdiff_monai.handlers.StagedTraining`). Each ``s_t`` is a scalar whose optimum
      ``log sqrt(L_t)`` lies about 1 away from its start: at the network's rate (1e-4 to 1e-3 per Adam step) it would
      need thousands of steps to get there; ``log_sigma_lr=1e-2`` gets there in a few hundred.

    Args:
        network: the model.
        loss_module: e.g. :class:`~medsegdiff_monai.losses.UncertaintyWeightedLoss`.
        lr: base learning rate of the network (stages multiply it).
        weight_decay: decoupled weight decay of the first group.
        log_sigma_lr: learning rate of the loss module's parameters; None uses ``lr``.
        fused: fused AdamW kernel; None uses it when every parameter is on CUDA.
    """
    decay, no_decay = [], []
    for parameter in network.parameters():
        (decay if parameter.ndim > 1 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    sigmas = list(loss_module.parameters()) if loss_module is not None else []
    if sigmas:
        sigma_lr = lr if log_sigma_lr is None else log_sigma_lr
        if not sigma_lr > 0:
            raise ValueError(f"log_sigma_lr must be > 0, got {log_sigma_lr}.")
        groups.append({"params": sigmas, "weight_decay": 0.0, "lr": sigma_lr, "follows_stage_lr": False})
    if fused is None:
        fused = all(p.is_cuda for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, lr=lr, fused=fused)
