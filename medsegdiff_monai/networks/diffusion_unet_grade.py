"""MedSegDiff-V2 conditional diffusion UNet with a switchable tumour-grade head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution, SpatialAttentionBlock, UpSample
from monai.networks.nets.diffusion_model_unet import (
    DiffusionUnetDownsample,
    DiffusionUNetResnetBlock,
    get_down_block,
    get_mid_block,
    get_timestep_embedding,
    get_up_block,
)
from monai.utils import ensure_tuple_rep

from medsegdiff_monai.networks.anchor import AnchorGate
from medsegdiff_monai.networks.calibration import GradeCalibration
from medsegdiff_monai.networks.condition_unet import ConditionResBlock, ConditionUNet
from medsegdiff_monai.networks.fused_norm import fuse_group_norms
from medsegdiff_monai.networks.grade_head import GradeHead
from medsegdiff_monai.networks.gradient_layout import densify_block_gradients
from medsegdiff_monai.networks.ss_former import SSFormerBlock
from medsegdiff_monai.networks.upsample import replace_nearest_upsampling
from medsegdiff_monai.utils import moved_names, rename_state_dict_keys, renamed_args, warn_renamed

__all__ = ["ConditionFeatures", "DiffusionUNetWithGradeHead"]


class ConditionFeatures(NamedTuple):
    """
    Everything the condition UNet computes from the image alone (independent of the timestep and the noise).
    Every element is a batch-first tensor, so a sampler repeats them along dim 0 for an ensemble (member-major, as
    :func:`~medsegdiff_monai.inferers.repeat_condition` does, to pair with noise of shape (K * B, ...)).

    Attributes:
        features: ``L + 1`` tensors for a network with ``L = len(channels)`` levels: ``features[i]`` for
            ``i < L`` is the condition encoder's feature at scale ``2**-i``, (B, condition_channels[i], *S/2**i);
            ``features[L]`` is the condition bottleneck, (B, condition_channels[-1], *S/2**(L-1)).
        calib_map: calibration map logits (B, mask_channels, *S); also the anchor of the anchor conditioning.
        grade_logits: grade logits (B, num_classes), or None when the grade head is off.
    """

    features: tuple[torch.Tensor, ...]
    calib_map: torch.Tensor
    grade_logits: torch.Tensor | None

    @property
    def cls_logits(self) -> torch.Tensor | None:
        """Deprecated name of :attr:`grade_logits`."""
        warn_renamed("ConditionFeatures.cls_logits", "grade_logits")
        return self.grade_logits


class DiffusionUNetWithGradeHead(nn.Module):
    """
    MedSegDiff-V2 (Wu et al., "MedSegDiff-V2: Diffusion based Medical Image Segmentation with Transformer",
    AAAI 2024, https://arxiv.org/abs/2301.11798) with a tumour-grade head, built from MONAI diffusion UNet blocks.

    - condition UNet (:py:class:`ConditionUNet`) on the image: encoder features per level, bottleneck, and the
      calibration map (1x1 conv of its last decoder feature, C_mask logits);
    - diffusion UNet (MONAI ``DiffusionUNetResnetBlock`` down/mid/up blocks, sinusoidal timestep embedding) on the
      noisy mask ``x_t``; at the first ``num_anchor_levels`` levels its features are gated by the anchor
      (:py:class:`AnchorGate` on the calibration map), at the other levels the condition encoder feature of the
      same scale is added after a 1x1 conv; after the mid block, ``num_ss_former_blocks`` SS-Former blocks
      (:py:class:`SSFormerBlock`) cross-attend from the diffusion to the condition bottleneck in the Fourier domain;
    - grade head (:py:class:`GradeHead`, attribute ``grade_head``) on the condition bottleneck, followed by its
      Platt scaling (:py:class:`GradeCalibration`, attribute ``grade_calibration``, two buffers: the identity until
      fitted on validation subjects after training).

    The diffusion UNet predicts the clean mask as logits (``seg_logits``); the x0 estimate is ``tanh(seg_logits / 2)``.
    Nothing is detached: every loss reaches the condition UNet. The defaults are the ``small`` preset.

    Args:
        spatial_dims: number of spatial dimensions (SS-Former blocks need 2; use ``num_ss_former_blocks=0`` for 3).
        in_channels: image channels (4 MRI modalities: t1, t1ce, t2, flair).
        mask_channels: mask channels C_mask (3 for TC/WT/ET, 1 for the whole tumour).
        channels: diffusion UNet channels per level; level ``i`` works at scale ``2**-i``.
        num_res_blocks: diffusion UNet residual blocks per level (int or one per level).
        attention_levels: per level, whether the diffusion UNet adds spatial self-attention (the mid block always
            has one).
        num_head_channels: channels per attention head (self-attention and SS-Former).
        norm_num_groups: GroupNorm groups everywhere (must divide all channel counts).
        condition_channels: condition UNet channels per level (same length as ``channels``); None = ``channels``.
        num_anchor_levels: number of leading levels conditioned by the anchor gate instead of feature addition.
        num_ss_former_blocks: SS-Former blocks at the bottleneck (0 disables them).
        use_grade_head: build the grade head; when False ``grade_head`` is None and ``grade_logits`` is None.
        num_classes: number of grades.
        grade_hidden_channels: hidden width of the grade head.
        grade_dropout: dropout of the grade head.
        condition_num_res_blocks: condition UNet residual blocks per encoder level.
        anchor_blur_kernel_size: Gaussian kernel size of the anchor blur.
        anchor_blur_sigma: initial Gaussian sigma of the anchor blur (voxels of each anchored level).
        learnable_anchor_sigma: learn the anchor blur's sigma.
        ss_former_filter_bins: radial bins of the SS-Former's learnable frequency filter.
        norm_eps: GroupNorm epsilon.
        use_flash_attention: use ``torch.nn.functional.scaled_dot_product_attention`` in MONAI's attention blocks.
        fused_norm: swap every GroupNorm (and the SiLU after it) for a ``FusedGroupNorm``, which runs fused Triton
            kernels on CUDA inputs in channels-last memory and is exactly ``nn.GroupNorm`` (+ SiLU) otherwise
            (``fuse_group_norms``; the same parameters and state-dict keys either way).

    Every nearest-neighbour upsampling runs as a broadcast (:py:class:`~medsegdiff_monai.networks.NearestUpsample`,
    the same output as ``nn.Upsample``), whose gradient is a block sum rather than a scatter-add, and the outputs of
    the blocks that feed the decoders' concatenations pass through ``dense_gradient`` (identity; their gradients,
    channel slices of the concatenation's, are made dense once before the convolutions read them).

    The keyword arguments ``use_cls_head``, ``cls_hidden_channels`` and ``cls_dropout``, and the state-dict keys
    ``cls_head.*`` of checkpoints written before the grade head was called ``grade_head``, are still accepted (with a
    ``DeprecationWarning``) for one release.

    Example::

        net = DiffusionUNetWithGradeHead()
        x_t, t, image = torch.randn(2, 3, 64, 64), torch.tensor([10, 900]), torch.randn(2, 4, 64, 64)
        seg_logits, grade_logits, calib_map = net(x_t, t, image)
    """

    @renamed_args(
        use_cls_head="use_grade_head", cls_hidden_channels="grade_hidden_channels", cls_dropout="grade_dropout"
    )
    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 4,
        mask_channels: int = 3,
        channels: Sequence[int] = (32, 48, 64, 64),
        num_res_blocks: int | Sequence[int] = 1,
        attention_levels: Sequence[bool] = (False, False, False, True),
        num_head_channels: int = 32,
        norm_num_groups: int = 8,
        condition_channels: Sequence[int] | None = (16, 32, 48, 64),
        num_anchor_levels: int = 1,
        num_ss_former_blocks: int = 1,
        use_grade_head: bool = True,
        num_classes: int = 2,
        grade_hidden_channels: int = 64,
        grade_dropout: float = 0.2,
        condition_num_res_blocks: int = 1,
        anchor_blur_kernel_size: int = 7,
        anchor_blur_sigma: float = 1.0,
        learnable_anchor_sigma: bool = True,
        ss_former_filter_bins: int = 8,
        norm_eps: float = 1e-6,
        use_flash_attention: bool = False,
        fused_norm: bool = True,
    ) -> None:
        super().__init__()
        channels = tuple(channels)
        condition_channels = channels if condition_channels is None else tuple(condition_channels)
        num_levels = len(channels)
        if num_levels < 2:
            raise ValueError(f"DiffusionUNetWithGradeHead needs at least 2 levels, got {channels=}.")
        if len(condition_channels) != num_levels or len(attention_levels) != num_levels:
            raise ValueError(
                f"condition_channels {condition_channels} and attention_levels {tuple(attention_levels)} must have "
                f"one entry per level of channels {channels}."
            )
        if any(c % norm_num_groups for c in channels + condition_channels):
            raise ValueError(
                f"all channels {channels} and {condition_channels} must be multiples of {norm_num_groups=}."
            )
        if not 0 <= num_anchor_levels <= num_levels:
            raise ValueError(f"num_anchor_levels must be in [0, {num_levels}], got {num_anchor_levels}.")
        if num_ss_former_blocks > 0 and spatial_dims != 2:
            raise ValueError(
                f"SS-Former blocks are 2D only (rfft2), got {spatial_dims=}; set num_ss_former_blocks=0 for 3D."
            )
        num_res_blocks = ensure_tuple_rep(num_res_blocks, num_levels)
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.mask_channels = mask_channels
        self.channels = channels
        self.num_anchor_levels = num_anchor_levels

        self.condition_unet = ConditionUNet(
            spatial_dims,
            in_channels,
            condition_channels,
            mask_channels,
            condition_num_res_blocks,
            norm_num_groups,
            norm_eps,
        )
        self.grade_head: nn.Module | None = (
            GradeHead(condition_channels[-1], grade_hidden_channels, num_classes, grade_dropout)
            if use_grade_head
            else None
        )
        # Platt scaling of the two grade logits, fitted on validation subjects after training (identity until then)
        self.grade_calibration: GradeCalibration | None = (
            GradeCalibration() if use_grade_head and num_classes == 2 else None
        )

        time_embed_dim = 4 * channels[0]
        self.time_embed = nn.Sequential(
            nn.Linear(channels[0], time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        self.conv_in = Convolution(spatial_dims, mask_channels, channels[0], kernel_size=3, padding=1, conv_only=True)
        # channels of the diffusion feature entering level i: conv_in output for level 0, else previous level's
        level_input_channels = (channels[0],) + channels[:-1]
        self.anchor_gates = nn.ModuleList(
            AnchorGate(
                spatial_dims,
                mask_channels,
                level_input_channels[level],
                downsample_factor=2**level,
                blur_kernel_size=anchor_blur_kernel_size,
                blur_sigma=anchor_blur_sigma,
                learnable_sigma=learnable_anchor_sigma,
            )
            for level in range(num_anchor_levels)
        )
        self.feature_injections = nn.ModuleList(
            Convolution(
                spatial_dims,
                condition_channels[level],
                level_input_channels[level],
                kernel_size=1,
                padding=0,
                conv_only=True,
            )
            for level in range(num_anchor_levels, num_levels)
        )

        block_options = {
            "spatial_dims": spatial_dims,
            "temb_channels": time_embed_dim,
            "norm_num_groups": norm_num_groups,
            "norm_eps": norm_eps,
            "resblock_updown": False,
            "with_cross_attn": False,
            "num_head_channels": num_head_channels,
            "transformer_num_layers": 1,
            "cross_attention_dim": None,
            "use_flash_attention": use_flash_attention,
        }
        self.down_blocks = nn.ModuleList(
            get_down_block(
                in_channels=level_input_channels[level],
                out_channels=channels[level],
                num_res_blocks=num_res_blocks[level],
                add_downsample=level < num_levels - 1,
                with_attn=attention_levels[level],
                **block_options,
            )
            for level in range(num_levels)
        )
        self.middle_block = get_mid_block(
            spatial_dims=spatial_dims,
            in_channels=channels[-1],
            temb_channels=time_embed_dim,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            with_conditioning=False,
            num_head_channels=num_head_channels,
            transformer_num_layers=1,
            cross_attention_dim=None,
            use_flash_attention=use_flash_attention,
        )
        self.ss_former = nn.ModuleList(
            SSFormerBlock(
                channels[-1], condition_channels[-1], num_head_channels, norm_num_groups, ss_former_filter_bins
            )
            for _ in range(num_ss_former_blocks)
        )
        self.up_blocks = nn.ModuleList()
        for level in reversed(range(num_levels)):
            self.up_blocks.append(
                get_up_block(
                    in_channels=channels[max(level - 1, 0)],
                    prev_output_channel=channels[min(level + 1, num_levels - 1)],
                    out_channels=channels[level],
                    num_res_blocks=num_res_blocks[level] + 1,
                    add_upsample=level > 0,
                    with_attn=attention_levels[level],
                    **block_options,
                )
            )
        self.out = nn.Sequential(
            nn.GroupNorm(norm_num_groups, channels[0], eps=norm_eps),
            nn.SiLU(),
            Convolution(spatial_dims, channels[0], mask_channels, kernel_size=3, padding=1, conv_only=True),
        )
        replace_nearest_upsampling(self)
        if fused_norm:
            fuse_group_norms(self)
        # the blocks whose outputs the decoders concatenate with skip features (docs/network.md, speed section)
        densify_block_gradients(
            self,
            (DiffusionUNetResnetBlock, ConditionResBlock, DiffusionUnetDownsample, UpSample, SpatialAttentionBlock),
        )
        # checkpoints written when the grade head was called cls_head
        rename_state_dict_keys(self, {"cls_head": "grade_head"})

    @property
    def cls_head(self) -> nn.Module | None:
        """Deprecated name of the ``grade_head`` attribute."""
        warn_renamed(f"{type(self).__name__}.cls_head", "grade_head")
        return self.grade_head

    def _check_image(self, image: torch.Tensor) -> None:
        if image.ndim != self.spatial_dims + 2 or image.shape[1] != self.in_channels:
            raise ValueError(
                f"image must have shape (B, {self.in_channels}, {', '.join(['S'] * self.spatial_dims)}) "
                f"(one channel per modality), got {tuple(image.shape)}."
            )
        factor = 2 ** (len(self.channels) - 1)
        if any(size % factor for size in image.shape[2:]):
            raise ValueError(
                f"image spatial size {tuple(image.shape[2:])} must be divisible by 2**(len(channels)-1) = {factor} "
                f"for {len(self.channels)} levels; pad or crop it (e.g. roi_size a multiple of {factor})."
            )

    def _check_mask_input(self, x_t: torch.Tensor, t: torch.Tensor, condition: ConditionFeatures) -> None:
        expected = (condition.calib_map.shape[0], self.mask_channels, *condition.calib_map.shape[2:])
        if tuple(x_t.shape) != expected:
            raise ValueError(
                f"x_t must have shape {expected} (B, mask_channels, spatial size of the conditioning image), "
                f"got {tuple(x_t.shape)}."
            )
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != x_t.shape[0]):
            raise ValueError(f"t must have shape ({x_t.shape[0]},) or be a scalar, got {tuple(t.shape)}.")

    def encode_condition(self, image: torch.Tensor) -> ConditionFeatures:
        """
        Run the condition UNet and the grade head on the image (independent of the timestep and the noise).

        Args:
            image: (B, in_channels, *S), every spatial size divisible by ``2**(len(channels)-1)``.

        Returns:
            :py:class:`ConditionFeatures` with ``len(channels) + 1`` features, calib_map (B, mask_channels, *S) and
            grade_logits (B, num_classes) or None, after the grade calibration.
        """
        self._check_image(image)
        encoder_features, bottleneck, _, calib_map = self.condition_unet(image)
        grade_logits = self.grade_head(bottleneck) if self.grade_head is not None else None
        if self.grade_calibration is not None:
            grade_logits = self.grade_calibration(grade_logits)
        return ConditionFeatures(
            features=(*encoder_features, bottleneck), calib_map=calib_map, grade_logits=grade_logits
        )

    def _condition_level(self, level: int, h: torch.Tensor, condition: ConditionFeatures) -> torch.Tensor:
        """Inject the condition into the diffusion feature ``h`` entering ``level``."""
        if level < self.num_anchor_levels:
            return self.anchor_gates[level](h, condition.calib_map)
        return h + self.feature_injections[level - self.num_anchor_levels](condition.features[level])

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor | int, condition: ConditionFeatures) -> torch.Tensor:
        """
        One pass of the diffusion UNet.

        Args:
            x_t: noisy mask (B, mask_channels, *S), the same B and S as the image of ``condition``.
            t: DDPM timesteps (B,) (long or float, in [0, 1000)), or a scalar (0-d tensor or int) for the whole batch.
            condition: output of :py:meth:`encode_condition` (possibly repeated along the batch).

        Returns:
            seg_logits (B, mask_channels, *S): logits of the clean mask.
        """
        t = torch.as_tensor(t, device=x_t.device)
        self._check_mask_input(x_t, t, condition)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        emb = self.time_embed(get_timestep_embedding(t, self.channels[0]).to(x_t.dtype))
        h = self._condition_level(0, self.conv_in(x_t), condition)
        skips = [h]
        for level, down_block in enumerate(self.down_blocks):
            h, level_skips = down_block(hidden_states=h, temb=emb)
            skips.extend(level_skips)
            if level + 1 < len(self.down_blocks):
                h = self._condition_level(level + 1, h, condition)
                skips[-1] = h
        h = self.middle_block(hidden_states=h, temb=emb)
        for block in self.ss_former:
            h = block(h, condition.features[-1])
        for up_block in self.up_blocks:
            num_skips = len(up_block.resnets)
            h = up_block(hidden_states=h, res_hidden_states_list=skips[-num_skips:], temb=emb)
            skips = skips[:-num_skips]
        return self.out(h)

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """
        Args:
            x_t: noisy mask (B, mask_channels, *S) in about [-1, 1].
            t: DDPM timesteps (B,), long or float, in [0, 1000).
            image: (B, in_channels, *S), every spatial size divisible by ``2**(len(channels)-1)``.

        Returns:
            ``(seg_logits, grade_logits, calib_map)``: (B, mask_channels, *S), (B, num_classes) or None,
            (B, mask_channels, *S); the same as ``denoise(x_t, t, encode_condition(image))``.
        """
        condition = self.encode_condition(image)
        return self.denoise(x_t, t, condition), condition.grade_logits, condition.calib_map


__getattr__ = moved_names(__name__, {"DiffusionUNetWithClsHead": f"{__name__}.DiffusionUNetWithGradeHead"})
