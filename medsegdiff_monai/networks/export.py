"""Export of the network's inference path with ``torch.export``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.export import Dim, ExportedProgram

from medsegdiff_monai.networks.diffusion_unet_cls import DiffusionUNetWithClsHead

__all__ = ["export_network"]


def export_network(
    network: DiffusionUNetWithClsHead, image_shape: Sequence[int], dynamic_batch: bool = True
) -> ExportedProgram:
    """
    Export ``network.forward(x_t, t, image) -> (seg_logits, cls_logits, calib_map)`` in eval mode with
    :py:func:`torch.export.export` (the FFTs, the anchor blur and MONAI's blocks all export; no TorchScript needed).

    Args:
        network: the network to export (switched to eval mode; its parameters are captured, not copied).
        image_shape: example image shape (B, in_channels, *S); the spatial size is fixed in the exported program.
        dynamic_batch: export with a symbolic batch size (1 .. 4096), so one program serves any batch
            (e.g. slices x ensemble members); False fixes B too.

    Returns:
        the :py:class:`torch.export.ExportedProgram`; call ``program.module()(x_t, t, image)``, save it with
        ``torch.export.save(program, "network.pt2")``.
    """
    if len(image_shape) != network.spatial_dims + 2 or image_shape[1] != network.in_channels:
        raise ValueError(
            f"export_network: image_shape must be (B, {network.in_channels}, *spatial) with {network.spatial_dims} "
            f"spatial sizes, got {tuple(image_shape)}."
        )
    device = next(network.parameters()).device
    batch, _, *spatial = image_shape
    example = (
        torch.zeros(batch, network.mask_channels, *spatial, device=device),
        torch.zeros(batch, dtype=torch.long, device=device),
        torch.zeros(*image_shape, device=device),
    )
    dynamic_shapes = None
    if dynamic_batch:
        batch_dim = Dim("batch", min=1, max=4096)
        dynamic_shapes = ({0: batch_dim}, {0: batch_dim}, {0: batch_dim})
    network.eval()
    return torch.export.export(network, example, dynamic_shapes=dynamic_shapes)
