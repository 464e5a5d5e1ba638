"""The network as a MONAI diffusion model: ``(x, timesteps, context) -> x0 estimate``, for MONAI's DiffusionInferer."""

from __future__ import annotations

import torch
import torch.nn as nn

from medsegdiff_monai.networks.diffusion_unet_grade import DiffusionUNetWithGradeHead

__all__ = ["DiffusionInfererAdapter"]


class DiffusionInfererAdapter(nn.Module):
    """:class:`DiffusionUNetWithGradeHead` with the call signature of MONAI's diffusion models.

    MONAI's :class:`~monai.inferers.DiffusionInferer` calls ``diffusion_model(x=..., timesteps=..., context=...)``
    and expects one tensor back, which its scheduler's ``step`` takes as the model output. This module runs the
    wrapped network on the noisy mask ``x`` with the image as ``context`` (``mode="crossattn"``: the inferer passes
    the condition through unchanged) and returns the clean-mask estimate ``tanh(seg_logits / 2)`` in [-1, 1], the
    model output of a scheduler built with ``prediction_type="sample"`` (how the network is trained). The grade and
    the calibration map come from ``network.encode_condition(image)``; the adapter holds no parameters of its own
    (its state dict is the network's under ``network.``).

    Example::

        from monai.inferers import DiffusionInferer
        from monai.networks.schedulers import DDIMScheduler

        scheduler = DDIMScheduler(1000, prediction_type="sample")
        scheduler.set_timesteps(10)
        model = DiffusionInfererAdapter(network)
        mask = DiffusionInferer(scheduler).sample(torch.randn(2, 3, 64, 64), model, conditioning=image)

    Args:
        network: the segmentation network (its grade head, if any, is not used here).
    """

    def __init__(self, network: DiffusionUNetWithGradeHead) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            x: noisy mask (B, mask_channels, *S).
            timesteps: (B,), (1,) or a scalar, long or float, in [0, num_train_timesteps); one value serves the
                whole batch (``DiffusionInferer.sample`` passes one).
            context: the conditioning image (B, in_channels, *S).

        Returns:
            the clean-mask estimate (B, mask_channels, *S) in [-1, 1].
        """
        if context is None:
            raise ValueError(
                "DiffusionInfererAdapter needs the image as context: call the DiffusionInferer with "
                "condition=image (conditioning=image for sample) and mode='crossattn'."
            )
        if timesteps.numel() == 1:
            timesteps = timesteps.reshape(()).expand(x.shape[0])
        seg_logits = self.network.denoise(x, timesteps, self.network.encode_condition(context))
        return torch.tanh(seg_logits / 2)
