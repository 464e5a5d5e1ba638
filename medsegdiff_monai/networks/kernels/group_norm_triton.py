"""Triton kernels of GroupNorm (optionally fused with SiLU) for 2D feature maps stored channels-last.

A (N, C, H, W) tensor in channels-last memory is a (N, H*W, C) array whose channels are contiguous, so a group's
``C/G`` channels are a short contiguous run in every pixel. Reducing per group along the channel dimension (as the
NCHW kernels of PyTorch and inductor do) would read it with a stride of ``C`` elements; these kernels instead read
tiles of (rows of pixels) x (all channels), fully coalesced, and keep everything per channel; only the two small
kernels that merge the per-chunk sums know about groups:

- forward: ``stats`` (per pixel chunk and channel: mean and centred sum of squares, summed around a shift close to
  the mean, so no ``E[x^2] - E[x]^2`` cancellation), ``combine`` (per sample and group, Chan's parallel formula over
  the chunks and channels of the group: mean and 1/std), ``apply`` (``y = x * scale + shift`` per channel, SiLU,
  cast back);
- backward: ``partial`` (per chunk and channel, the sums of ``dz`` and ``dz * x_hat``, where ``dz`` is the gradient
  entering the affine normalisation, i.e. after the SiLU backward), ``reduce`` (per group: the two sums per sample, the
  weight and bias gradients over the batch, in a fixed order so the result is deterministic), ``dx``;
- whole groups (``LaunchConfig(whole_groups=True)``, the default for small inputs whose groups fit one program's
  tile): one program per (sample, group) holds the group in registers; the forward is one kernel (exact two-pass
  mean and variance, then the output), the backward one kernel (the group's sums and ``dx``, and the per-channel
  sums as if from one pixel chunk) followed by ``reduce``.

An optional (N, C) ``offset`` is added to every pixel of each sample's channel before the norm without the sum being
stored: it moves the chunks' channel means in ``combine`` and the centring value in ``apply``, ``partial`` and ``dx``;
its gradient comes from one more per-channel sum in ``partial`` (of ``x_hat``), finished in ``reduce``. The row loops
of the pixel-chunk kernels are software-pipelined ``LaunchConfig.num_stages`` deep.

Every kernel takes explicit strides, so any layout whose two spatial dimensions collapse into one (channels-last or
contiguous) is correct; channels-last is the fast one. The arithmetic is float32 whatever the input dtype; outputs
have the input's dtype, weight and bias gradients the parameters' dtype.

These functions are plain launchers: they run on CUDA tensors, and on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1``), which is how the tests check them on a machine without a GPU. The autograd wiring and the
dispatch live in :py:mod:`medsegdiff_monai.networks.fused_norm`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["LaunchConfig", "group_norm_backward", "group_norm_forward", "whole_groups_fit"]

_MAX_CHUNKS = 512
MAX_WHOLE_GROUP_TILE = 8192  # elements of a whole group that one program holds (``LaunchConfig.whole_groups``)


def _whole_group_tile(num_rows: int, channels_per_group: int) -> int:
    """Elements of the register tile that holds a whole group: its pixel rows and channels, each padded to a power
    of two."""
    return triton.next_power_of_2(num_rows) * triton.next_power_of_2(channels_per_group)


def whole_groups_fit(shape: torch.Size | tuple[int, ...], num_groups: int) -> bool:
    """Whether ``LaunchConfig(whole_groups=True)`` can run a (N, C, H, W) input with ``num_groups`` groups: each
    group fits :data:`MAX_WHOLE_GROUP_TILE` once padded."""
    return _whole_group_tile(shape[2] * shape[3], shape[1] // num_groups) <= MAX_WHOLE_GROUP_TILE


@dataclass(frozen=True)
class LaunchConfig:
    """
    How a launcher tiles a (N, C, H, W) input; every value only changes speed, never the result's definition.

    Args:
        tile_elements: elements of the (pixel rows x channels) tile one program holds in registers per loop step.
        programs: programs of one launch over all samples, i.e. the number of pixel chunks times N (at most
            ``512 N``, at least N).
        num_warps: warps per program of the pixel-chunk kernels.
        reduce_tile_elements: elements of the (samples x chunks x channels of a group) tile of the backward's
            reduce kernel (one program per group).
        num_stages: software-pipelining depth of the pixel-chunk kernels' row loops (``tl.range(num_stages=...)``:
            the loads of the next ``num_stages - 1`` tiles are issued, through shared memory, before the current
            tile is used); 1 issues each tile's loads when it is used.
        whole_groups: instead of pixel chunks, one program per (sample, group) that holds the whole group in
            registers (up to :data:`MAX_WHOLE_GROUP_TILE` elements, rows and channels of the group each padded to a
            power of two): the forward is one kernel that reads the input once, the backward one kernel that reads
            it and the output gradient once, then the reduce kernel over the samples. ``tile_elements``,
            ``programs`` and ``num_stages`` are then unused.
    """

    tile_elements: int = 4096
    programs: int = 1024
    num_warps: int = 4
    reduce_tile_elements: int = 4096
    num_stages: int = 1
    whole_groups: bool = False

    @classmethod
    def for_input(
        cls, shape: torch.Size | tuple[int, ...], backward: bool, num_groups: int | None = None
    ) -> LaunchConfig:
        """
        The tiling the launchers use unless given one, chosen from ``benchmarks/bench_norm_kernels.py``'s sweeps of a
        training step's norm inputs (``docs/performance.md``): inputs of up to 2^22 elements whose groups fit one
        program (:func:`whole_groups_fit`) run as whole groups over 8 warps, other inputs of up to 2^22 elements as
        few programs of one large tile each; larger ones as small tiles looped over the pixel chunks,
        software-pipelined (backward: 2,048 elements, 4 warps, 3 stages; forward: 1,024 elements over 8 warps
        without pipelining from 256 channels on, 2,048 elements, 4 warps, 4 stages below).

        Args:
            shape: (N, C, H, W) of the input.
            backward: for the backward launcher instead of the forward.
            num_groups: the norm's groups; None never picks whole groups.
        """
        batch, channels, height, width = shape
        if batch * channels * height * width <= 2**22:
            if num_groups is not None and whole_groups_fit(shape, num_groups):
                return cls(num_warps=8, whole_groups=True)
            return cls(tile_elements=8192, programs=2048, num_warps=4)
        if backward:
            return cls(tile_elements=2048, programs=1024, num_warps=4, num_stages=3)
        if channels >= 256:
            return cls(tile_elements=1024, programs=1024, num_warps=8)
        return cls(tile_elements=2048, programs=1024, num_warps=4, num_stages=4)


@triton.jit
def _chunk_rows(chunk, rows_per_chunk, num_rows):
    """First and one-past-last pixel row of a chunk: the one partition of the rows that every kernel uses."""
    row_start = chunk * rows_per_chunk
    return row_start, tl.minimum(row_start + rows_per_chunk, num_rows)


@triton.jit
def _row_tile(start, row_end, channel, C: tl.constexpr, BLOCK_R: tl.constexpr):
    """Rows ``start .. start + BLOCK_R`` as an int64 (BLOCK_R, 1) column, and the mask of the (rows x channels) tile."""
    rows = (start + tl.arange(0, BLOCK_R)[:, None]).to(tl.int64)
    return rows, (rows < row_end) & (channel < C)[None, :]


@triton.jit
def _sample_base(pointer, sample, channel, stride_n, stride_c):
    """Pointers to pixel row 0 of one sample, one per channel ((1, BLOCK_C))."""
    return pointer + sample.to(tl.int64) * stride_n + (channel * stride_c)[None, :]


@triton.jit
def _stats_kernel(
    x_ptr,
    partial_ptr,
    num_rows,
    rows_per_chunk,
    num_chunks,
    stride_xn,
    stride_xr,
    stride_xc,
    C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    sample = tl.program_id(0)
    chunk = tl.program_id(1)
    channel = tl.arange(0, BLOCK_C)
    base = _sample_base(x_ptr, sample, channel, stride_xn, stride_xc)
    row_start, row_end = _chunk_rows(chunk, rows_per_chunk, num_rows)
    # per channel, sums are taken around a shift (the chunk's first tile's mean), so that the variance comes without
    # the cancellation of E[x^2] - E[x]^2; the loop accumulates element-wise and reduces across threads once at the end
    first_rows, first_mask = _row_tile(row_start, row_end, channel, C, BLOCK_R)
    first = tl.load(base + first_rows * stride_xr, mask=first_mask, other=0.0).to(tl.float32)
    shift = (tl.sum(first, axis=0) / tl.minimum(row_end - row_start, BLOCK_R))[None, :]
    sum_centred = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    sum_squares = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for start in tl.range(row_start, row_end, BLOCK_R, num_stages=NUM_STAGES):
        rows, mask = _row_tile(start, row_end, channel, C, BLOCK_R)
        x = tl.load(base + rows * stride_xr, mask=mask, other=0.0).to(tl.float32)
        centred = tl.where(mask, x - shift, 0.0)
        sum_centred += centred
        sum_squares += centred * centred
    count = row_end - row_start
    total_centred = tl.sum(sum_centred, axis=0)
    mean = tl.sum(shift, axis=0) + total_centred / count
    m2 = tl.sum(sum_squares, axis=0) - total_centred * total_centred / count
    out = partial_ptr + (sample * num_chunks + chunk) * 2 * C + channel
    tl.store(out, mean, mask=channel < C)
    tl.store(out + C, m2, mask=channel < C)


@triton.jit
def _combine_kernel(
    partial_ptr,
    offset_ptr,
    mean_ptr,
    rstd_ptr,
    num_rows,
    rows_per_chunk,
    num_chunks,
    eps,
    HAS_OFFSET: tl.constexpr,
    G: tl.constexpr,
    CG: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_CG: tl.constexpr,
):
    sample = tl.program_id(0)
    group = tl.program_id(1)
    chunks = tl.arange(0, BLOCK_S)[:, None]
    within = tl.arange(0, BLOCK_CG)[None, :]
    mask = (chunks < num_chunks) & (within < CG)
    base = partial_ptr + (sample * num_chunks + chunks) * 2 * (G * CG) + group * CG + within
    chunk_mean = tl.load(base, mask=mask, other=0.0)
    chunk_m2 = tl.load(base + G * CG, mask=mask, other=0.0)
    if HAS_OFFSET:
        # a per-channel offset moves every chunk's channel mean and leaves its centred sum of squares
        offset = tl.load(offset_ptr + sample * G * CG + group * CG + within, mask=within < CG, other=0.0)
        chunk_mean += offset.to(tl.float32)
    count = tl.where(mask, tl.minimum(rows_per_chunk, num_rows - chunks * rows_per_chunk), 0).to(tl.float32)
    total = num_rows * CG
    mean = tl.sum(tl.sum(count * chunk_mean, axis=1), axis=0) / total
    delta = chunk_mean - mean
    m2 = tl.sum(tl.sum(chunk_m2 + count * delta * delta, axis=1), axis=0)
    tl.store(mean_ptr + sample * G + group, mean)
    tl.store(rstd_ptr + sample * G + group, 1.0 / tl.sqrt(m2 / total + eps))


@triton.jit
def _channel_parameters(
    mean_ptr,
    rstd_ptr,
    weight_ptr,
    bias_ptr,
    offset_ptr,
    sample,
    channel,
    HAS_OFFSET: tl.constexpr,
    G: tl.constexpr,
    C: tl.constexpr,
):
    """Per channel of one sample, float32 (1, BLOCK_C): the value that the input's elements are centred by (the
    group's mean, less the channel's offset when there is one), the group's 1/std, the affine weight and bias."""
    channel_mask = channel < C
    group = sample * G + channel // (C // G)
    mean = tl.load(mean_ptr + group, mask=channel_mask, other=0.0)
    if HAS_OFFSET:
        mean -= tl.load(offset_ptr + sample * C + channel, mask=channel_mask, other=0.0).to(tl.float32)
    mean = mean[None, :]
    rstd = tl.load(rstd_ptr + group, mask=channel_mask, other=0.0)[None, :]
    weight = tl.load(weight_ptr + channel, mask=channel_mask, other=0.0).to(tl.float32)[None, :]
    bias = tl.load(bias_ptr + channel, mask=channel_mask, other=0.0).to(tl.float32)[None, :]
    return mean, rstd, weight, bias


@triton.jit
def _apply_kernel(
    x_ptr,
    y_ptr,
    weight_ptr,
    bias_ptr,
    mean_ptr,
    rstd_ptr,
    offset_ptr,
    num_rows,
    rows_per_chunk,
    stride_xn,
    stride_xr,
    stride_xc,
    stride_yn,
    stride_yr,
    stride_yc,
    SILU: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    G: tl.constexpr,
    C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    sample = tl.program_id(0)
    chunk = tl.program_id(1)
    channel = tl.arange(0, BLOCK_C)
    mean, rstd, weight, bias = _channel_parameters(
        mean_ptr, rstd_ptr, weight_ptr, bias_ptr, offset_ptr, sample, channel, HAS_OFFSET, G, C
    )
    scale = rstd * weight
    shift = bias - mean * scale
    x_base = _sample_base(x_ptr, sample, channel, stride_xn, stride_xc)
    y_base = _sample_base(y_ptr, sample, channel, stride_yn, stride_yc)
    row_start, row_end = _chunk_rows(chunk, rows_per_chunk, num_rows)
    for start in tl.range(row_start, row_end, BLOCK_R, num_stages=NUM_STAGES):
        rows, mask = _row_tile(start, row_end, channel, C, BLOCK_R)
        x = tl.load(x_base + rows * stride_xr, mask=mask, other=0.0).to(tl.float32)
        y = x * scale + shift
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_base + rows * stride_yr, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _normalized_and_grad(x, dy, mean, rstd, weight, bias, SILU: tl.constexpr):
    """x_hat and the gradient dz entering the affine normalisation (after the SiLU backward)."""
    x_hat = (x - mean) * rstd
    if SILU:
        z = x_hat * weight + bias
        gate = tl.sigmoid(z)
        dz = dy * gate * (1.0 + z * (1.0 - gate))
    else:
        dz = dy
    return x_hat, dz


@triton.jit
def _backward_partial_kernel(
    dy_ptr,
    x_ptr,
    weight_ptr,
    bias_ptr,
    mean_ptr,
    rstd_ptr,
    offset_ptr,
    partial_ptr,
    num_rows,
    rows_per_chunk,
    num_chunks,
    stride_xn,
    stride_xr,
    stride_xc,
    stride_dn,
    stride_dr,
    stride_dc,
    SILU: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    G: tl.constexpr,
    C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    sample = tl.program_id(0)
    chunk = tl.program_id(1)
    channel = tl.arange(0, BLOCK_C)
    mean, rstd, weight, bias = _channel_parameters(
        mean_ptr, rstd_ptr, weight_ptr, bias_ptr, offset_ptr, sample, channel, HAS_OFFSET, G, C
    )
    x_base = _sample_base(x_ptr, sample, channel, stride_xn, stride_xc)
    dy_base = _sample_base(dy_ptr, sample, channel, stride_dn, stride_dc)
    sum_dz = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    sum_dz_x_hat = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    sum_x_hat = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    row_start, row_end = _chunk_rows(chunk, rows_per_chunk, num_rows)
    for start in tl.range(row_start, row_end, BLOCK_R, num_stages=NUM_STAGES):
        rows, mask = _row_tile(start, row_end, channel, C, BLOCK_R)
        x = tl.load(x_base + rows * stride_xr, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_base + rows * stride_dr, mask=mask, other=0.0).to(tl.float32)
        x_hat, dz = _normalized_and_grad(x, dy, mean, rstd, weight, bias, SILU)
        dz = tl.where(mask, dz, 0.0)
        sum_dz += dz
        sum_dz_x_hat += dz * x_hat
        if HAS_OFFSET:
            sum_x_hat += tl.where(mask, x_hat, 0.0)
    out = partial_ptr + (sample * num_chunks + chunk) * (2 + HAS_OFFSET) * C + channel
    tl.store(out, tl.sum(sum_dz, axis=0), mask=channel < C)
    tl.store(out + C, tl.sum(sum_dz_x_hat, axis=0), mask=channel < C)
    if HAS_OFFSET:
        tl.store(out + 2 * C, tl.sum(sum_x_hat, axis=0), mask=channel < C)


@triton.jit
def _backward_reduce_kernel(
    partial_ptr,
    weight_ptr,
    rstd_ptr,
    coefficient_ptr,
    dweight_ptr,
    dbias_ptr,
    doffset_ptr,
    num_samples,
    num_rows,
    num_chunks,
    HAS_OFFSET: tl.constexpr,
    G: tl.constexpr,
    CG: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_CG: tl.constexpr,
):
    # one program per group; BLOCK_N samples at a time as a (samples x chunks x channels) tile, so that all of a
    # block's loads are in flight together
    group = tl.program_id(0)
    chunks = tl.arange(0, BLOCK_S)[None, :, None]
    within = tl.arange(0, BLOCK_CG)
    channel = group * CG + within
    weight = tl.load(weight_ptr + channel, mask=within < CG, other=0.0).to(tl.float32)[None, :]
    dweight = tl.zeros([BLOCK_CG], tl.float32)
    dbias = tl.zeros([BLOCK_CG], tl.float32)
    for sample_start in range(0, num_samples, BLOCK_N):
        samples = sample_start + tl.arange(0, BLOCK_N)
        mask = (samples[:, None, None] < num_samples) & (chunks < num_chunks) & (within[None, None, :] < CG)
        rows = (samples[:, None, None] * num_chunks + chunks) * (2 + HAS_OFFSET)
        base = partial_ptr + rows * (G * CG) + channel[None, None, :]
        sum_dz = tl.sum(tl.load(base, mask=mask, other=0.0), axis=1)
        sum_dz_x_hat = tl.sum(tl.load(base + G * CG, mask=mask, other=0.0), axis=1)
        dbias += tl.sum(sum_dz, axis=0)
        dweight += tl.sum(sum_dz_x_hat, axis=0)
        coefficient = tl.sum(weight * sum_dz, axis=1)
        coefficient_x_hat = tl.sum(weight * sum_dz_x_hat, axis=1)
        out = coefficient_ptr + (samples * G + group) * 2
        tl.store(out, coefficient, mask=samples < num_samples)
        tl.store(out + 1, coefficient_x_hat, mask=samples < num_samples)
        if HAS_OFFSET:
            # the offset's gradient is the sum over the channel's pixels of the dx kernel's formula
            sum_x_hat = tl.sum(tl.load(base + 2 * G * CG, mask=mask, other=0.0), axis=1)
            rstd = tl.load(rstd_ptr + samples * G + group, mask=samples < num_samples, other=0.0)[:, None]
            doffset = rstd * (
                weight * sum_dz - coefficient[:, None] / CG - coefficient_x_hat[:, None] * sum_x_hat / (num_rows * CG)
            )
            doffset_mask = (samples[:, None] < num_samples) & (within[None, :] < CG)
            doffset_out = doffset_ptr + samples[:, None] * (G * CG) + channel[None, :]
            tl.store(doffset_out, doffset.to(doffset_ptr.dtype.element_ty), mask=doffset_mask)
    tl.store(dweight_ptr + channel, dweight.to(dweight_ptr.dtype.element_ty), mask=within < CG)
    tl.store(dbias_ptr + channel, dbias.to(dbias_ptr.dtype.element_ty), mask=within < CG)


@triton.jit
def _backward_dx_kernel(
    dy_ptr,
    x_ptr,
    weight_ptr,
    bias_ptr,
    mean_ptr,
    rstd_ptr,
    offset_ptr,
    coefficient_ptr,
    dx_ptr,
    num_rows,
    rows_per_chunk,
    stride_xn,
    stride_xr,
    stride_xc,
    stride_dn,
    stride_dr,
    stride_dc,
    stride_gn,
    stride_gr,
    stride_gc,
    SILU: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    G: tl.constexpr,
    C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    sample = tl.program_id(0)
    chunk = tl.program_id(1)
    channel = tl.arange(0, BLOCK_C)
    mean, rstd, weight, bias = _channel_parameters(
        mean_ptr, rstd_ptr, weight_ptr, bias_ptr, offset_ptr, sample, channel, HAS_OFFSET, G, C
    )
    inverse_count = 1.0 / (num_rows * (C // G))
    coefficient = coefficient_ptr + (sample * G + channel // (C // G)) * 2
    mean_grad = (tl.load(coefficient, mask=channel < C, other=0.0) * inverse_count)[None, :]
    mean_grad_x_hat = (tl.load(coefficient + 1, mask=channel < C, other=0.0) * inverse_count)[None, :]
    x_base = _sample_base(x_ptr, sample, channel, stride_xn, stride_xc)
    dy_base = _sample_base(dy_ptr, sample, channel, stride_dn, stride_dc)
    dx_base = _sample_base(dx_ptr, sample, channel, stride_gn, stride_gc)
    row_start, row_end = _chunk_rows(chunk, rows_per_chunk, num_rows)
    for start in tl.range(row_start, row_end, BLOCK_R, num_stages=NUM_STAGES):
        rows, mask = _row_tile(start, row_end, channel, C, BLOCK_R)
        x = tl.load(x_base + rows * stride_xr, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_base + rows * stride_dr, mask=mask, other=0.0).to(tl.float32)
        x_hat, dz = _normalized_and_grad(x, dy, mean, rstd, weight, bias, SILU)
        dx = rstd * (weight * dz - mean_grad - x_hat * mean_grad_x_hat)
        tl.store(dx_base + rows * stride_gr, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _group_offsets(sample, channel, stride_n, stride_r, stride_c, BLOCK_R: tl.constexpr):
    """Element offsets of one sample's (BLOCK_R rows, ``channel``) tile, ``channel`` a (1, BLOCK_CG) row."""
    rows = tl.arange(0, BLOCK_R)[:, None].to(tl.int64)
    return sample.to(tl.int64) * stride_n + rows * stride_r + channel * stride_c


@triton.jit
def _whole_group(
    x_ptr,
    weight_ptr,
    bias_ptr,
    offset_ptr,
    num_rows,
    stride_n,
    stride_r,
    stride_c,
    HAS_OFFSET: tl.constexpr,
    G: tl.constexpr,
    CG: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_CG: tl.constexpr,
):
    """The (sample, group) of this program; the group as a float32 (BLOCK_R, BLOCK_CG) tile (plus the channel offset;
    0 outside the group) and the tile's mask; per channel ((1, BLOCK_CG)): the channel index, whether it is in the
    group, the float32 affine weight and bias."""
    sample = tl.program_id(0)
    group = tl.program_id(1)
    channel = (group * CG + tl.arange(0, BLOCK_CG))[None, :]
    in_group = channel < (group + 1) * CG
    mask = (tl.arange(0, BLOCK_R)[:, None] < num_rows) & in_group
    x = tl.load(x_ptr + _group_offsets(sample, channel, stride_n, stride_r, stride_c, BLOCK_R), mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_OFFSET:
        shift = tl.load(offset_ptr + sample * G * CG + channel, mask=in_group, other=0.0)
        x = tl.where(mask, x + shift.to(tl.float32), 0.0)
    weight = tl.load(weight_ptr + channel, mask=in_group, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + channel, mask=in_group, other=0.0).to(tl.float32)
    return sample, group, x, mask, channel, in_group, weight, bias


@triton.jit
def _whole_group_forward_kernel(
    x_ptr,
    y_ptr,
    weight_ptr,
    bias_ptr,
    offset_ptr,
    mean_ptr,
    rstd_ptr,
    num_rows,
    stride_xn,
    stride_xr,
    stride_xc,
    stride_yn,
    stride_yr,
    stride_yc,
    eps,
    SILU: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    G: tl.constexpr,
    CG: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_CG: tl.constexpr,
):
    sample, group, x, mask, channel, _, weight, bias = _whole_group(
        x_ptr,
        weight_ptr,
        bias_ptr,
        offset_ptr,
        num_rows,
        stride_xn,
        stride_xr,
        stride_xc,
        HAS_OFFSET,
        G,
        CG,
        BLOCK_R,
        BLOCK_CG,
    )
    # the whole group is in registers: the mean, then the centred sum of squares, exactly
    count = num_rows * CG
    mean = tl.sum(tl.sum(x, axis=1), axis=0) / count
    centred = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(centred * centred, axis=1), axis=0) / count + eps)
    y = centred * (rstd * weight) + bias
    if SILU:
        y = y * tl.sigmoid(y)
    y_offsets = _group_offsets(sample, channel, stride_yn, stride_yr, stride_yc, BLOCK_R)
    tl.store(y_ptr + y_offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + sample * G + group, mean)
    tl.store(rstd_ptr + sample * G + group, rstd)


@triton.jit
def _whole_group_backward_kernel(
    dy_ptr,
    x_ptr,
    weight_ptr,
    bias_ptr,
    mean_ptr,
    rstd_ptr,
    offset_ptr,
    partial_ptr,
    dx_ptr,
    num_rows,
    stride_xn,
    stride_xr,
    stride_xc,
    stride_dn,
    stride_dr,
    stride_dc,
    stride_gn,
    stride_gr,
    stride_gc,
    SILU: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    G: tl.constexpr,
    CG: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_CG: tl.constexpr,
):
    # the group's sums, its input gradient, and the per-channel sums for the reduce kernel (as one pixel chunk)
    sample, group, x, mask, channel, in_group, weight, bias = _whole_group(
        x_ptr,
        weight_ptr,
        bias_ptr,
        offset_ptr,
        num_rows,
        stride_xn,
        stride_xr,
        stride_xc,
        HAS_OFFSET,
        G,
        CG,
        BLOCK_R,
        BLOCK_CG,
    )
    dy_offsets = _group_offsets(sample, channel, stride_dn, stride_dr, stride_dc, BLOCK_R)
    dy = tl.load(dy_ptr + dy_offsets, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + sample * G + group)
    rstd = tl.load(rstd_ptr + sample * G + group)
    x_hat, dz = _normalized_and_grad(x, dy, mean, rstd, weight, bias, SILU)
    x_hat = tl.where(mask, x_hat, 0.0)
    dz = tl.where(mask, dz, 0.0)
    sum_dz = tl.sum(dz, axis=0)
    sum_dz_x_hat = tl.sum(dz * x_hat, axis=0)
    count = num_rows * CG
    mean_grad = tl.sum(weight * sum_dz[None, :], axis=1) / count
    mean_grad_x_hat = tl.sum(weight * sum_dz_x_hat[None, :], axis=1) / count
    dx = rstd * (weight * dz - mean_grad[:, None] - x_hat * mean_grad_x_hat[:, None])
    dx_offsets = _group_offsets(sample, channel, stride_gn, stride_gr, stride_gc, BLOCK_R)
    tl.store(dx_ptr + dx_offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    out = partial_ptr + sample * (2 + HAS_OFFSET) * G * CG + channel
    tl.store(out, sum_dz[None, :], mask=in_group)
    tl.store(out + G * CG, sum_dz_x_hat[None, :], mask=in_group)
    if HAS_OFFSET:
        tl.store(out + 2 * G * CG, tl.sum(x_hat, axis=0)[None, :], mask=in_group)


class _Launch:
    """Block sizes and the pixel chunking of one (N, C, H, W) input with ``num_groups`` groups."""

    def __init__(self, x: torch.Tensor, num_groups: int, config: LaunchConfig) -> None:
        batch, channels, height, width = x.shape
        self.num_samples = batch
        self.num_rows = height * width
        self.channels = channels
        self.groups = num_groups
        self.channels_per_group = channels // num_groups
        self.num_warps = config.num_warps
        self.num_stages = config.num_stages
        self.block_c = triton.next_power_of_2(channels)
        self.block_cg = triton.next_power_of_2(self.channels_per_group)
        self.whole_groups = config.whole_groups
        if self.whole_groups:
            if not whole_groups_fit(x.shape, num_groups):
                tile = _whole_group_tile(self.num_rows, self.channels_per_group)
                raise ValueError(
                    f"LaunchConfig(whole_groups=True) holds groups of up to {MAX_WHOLE_GROUP_TILE} elements (pixel "
                    f"rows and channels each padded to a power of two); a group of {self.num_rows} rows x "
                    f"{self.channels_per_group} channels needs {tile}: use pixel chunks (whole_groups=False)."
                )
            self.block_r, self.rows_per_chunk, self.num_chunks = triton.next_power_of_2(self.num_rows), self.num_rows, 1
        else:
            self.block_r = max(1, min(triton.next_power_of_2(self.num_rows), config.tile_elements // self.block_c))
            chunks = triton.cdiv(config.programs, batch)
            chunks = max(1, min(triton.cdiv(self.num_rows, self.block_r), chunks, _MAX_CHUNKS))
            self.rows_per_chunk = triton.cdiv(triton.cdiv(self.num_rows, chunks), self.block_r) * self.block_r
            self.num_chunks = triton.cdiv(self.num_rows, self.rows_per_chunk)
        self.block_s = triton.next_power_of_2(self.num_chunks)
        self.block_n = max(
            1, min(triton.next_power_of_2(batch), config.reduce_tile_elements // (self.block_s * self.block_cg))
        )

    @property
    def grid(self) -> tuple[int, int]:
        return (self.num_samples, self.num_chunks)

    @property
    def tile(self) -> dict[str, int]:
        return {
            "C": self.channels,
            "BLOCK_R": self.block_r,
            "BLOCK_C": self.block_c,
            "NUM_STAGES": self.num_stages,
            "num_warps": self.num_warps,
        }

    @property
    def group_blocks(self) -> dict[str, int]:
        return {"G": self.groups, "CG": self.channels_per_group, "BLOCK_S": self.block_s, "BLOCK_CG": self.block_cg}

    @property
    def whole_group_blocks(self) -> dict[str, int]:
        """The block sizes of the whole-group kernels (one program per (sample, group), no pixel chunks)."""
        return {
            "G": self.groups,
            "CG": self.channels_per_group,
            "BLOCK_R": self.block_r,
            "BLOCK_CG": self.block_cg,
            "num_warps": self.num_warps,
        }


def _row_strides(tensor: torch.Tensor) -> tuple[int, int, int]:
    """(sample, pixel, channel) strides of a (N, C, H, W) tensor whose H and W collapse into one pixel index."""
    return tensor.stride(0), tensor.stride(3), tensor.stride(1)


def as_row_layout(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` if its two spatial dimensions collapse into one pixel index (channels-last or contiguous), else a
    channels-last copy."""
    if tensor.shape[2] == 1 or tensor.stride(2) == tensor.shape[3] * tensor.stride(3):
        return tensor
    return tensor.contiguous(memory_format=torch.channels_last)


def _checked_offset(offset: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """``offset`` as a contiguous (N, C) tensor, after checking its shape and device against the (N, C, H, W)
    input."""
    if offset is None:
        return None
    if tuple(offset.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"offset must have shape (N, C) = {tuple(x.shape[:2])} of the input, got {tuple(offset.shape)}."
        )
    if offset.device != x.device:
        raise ValueError(f"offset is on {offset.device}, the input on {x.device}.")
    return offset.contiguous()


def group_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    num_groups: int,
    eps: float,
    silu: bool,
    config: LaunchConfig | None = None,
    offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    GroupNorm (then SiLU if ``silu``) of a 2D feature map, optionally of the map plus a per-channel offset:
    ``GroupNorm(x + offset[:, :, None, None])`` without that sum ever being stored.

    Args:
        x: (N, C, H, W), C divisible by ``num_groups``; spatial dimensions collapsible (see :py:func:`as_row_layout`).
        weight: (C,) affine scale.
        bias: (C,) affine shift.
        num_groups: number of groups G.
        eps: added to the variance.
        silu: apply SiLU to the normalised output.
        config: tiling of the launches (default :py:meth:`LaunchConfig.for_input`).
        offset: (N, C) added to every pixel of each sample's channel before the norm (e.g. a timestep embedding and
            the bias of the convolution before the norm), any float dtype; ``None``: no offset.

    Returns:
        ``(y, mean, rstd)``: y with the shape, strides and dtype of ``x``; mean and 1/std per (sample, group) of
        ``x + offset``, (N, G) float32.
    """
    x = as_row_layout(x)
    offset = _checked_offset(offset, x)
    offset_or_x = x if offset is None else offset  # the kernels need a pointer even where HAS_OFFSET is off
    launch = _Launch(x, num_groups, config or LaunchConfig.for_input(x.shape, backward=False, num_groups=num_groups))
    mean = torch.empty((launch.num_samples, num_groups), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    y = torch.empty_like(x)
    if launch.whole_groups:
        _whole_group_forward_kernel[(launch.num_samples, num_groups)](
            x,
            y,
            weight,
            bias,
            offset_or_x,
            mean,
            rstd,
            launch.num_rows,
            *_row_strides(x),
            *_row_strides(y),
            eps,
            SILU=silu,
            HAS_OFFSET=offset is not None,
            **launch.whole_group_blocks,
        )
        return y, mean, rstd
    partial = torch.empty(
        (launch.num_samples, launch.num_chunks, 2, launch.channels), device=x.device, dtype=torch.float32
    )
    _stats_kernel[launch.grid](
        x, partial, launch.num_rows, launch.rows_per_chunk, launch.num_chunks, *_row_strides(x), **launch.tile
    )
    _combine_kernel[(launch.num_samples, num_groups)](
        partial,
        offset_or_x,
        mean,
        rstd,
        launch.num_rows,
        launch.rows_per_chunk,
        launch.num_chunks,
        eps,
        HAS_OFFSET=offset is not None,
        **launch.group_blocks,
    )
    _apply_kernel[launch.grid](
        x,
        y,
        weight,
        bias,
        mean,
        rstd,
        offset_or_x,
        launch.num_rows,
        launch.rows_per_chunk,
        *_row_strides(x),
        *_row_strides(y),
        SILU=silu,
        HAS_OFFSET=offset is not None,
        G=num_groups,
        **launch.tile,
    )
    return y, mean, rstd


def group_norm_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    silu: bool,
    config: LaunchConfig | None = None,
    offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """
    Gradients of :py:func:`group_norm_forward`.

    Args:
        grad_y: gradient of the output y, (N, C, H, W), any collapsible layout.
        x, weight, bias, num_groups, silu: the forward's inputs.
        mean, rstd: the forward's (N, G) statistics.
        config: tiling of the launches (default :py:meth:`LaunchConfig.for_input`; need not be the forward's).
        offset: the forward's (N, C) offset, or ``None``.

    Returns:
        ``(grad_x, grad_weight, grad_bias, grad_offset)``: grad_x with the shape, strides and dtype of ``x``;
        grad_weight and grad_bias (C,) with the parameters' dtype; grad_offset (N, C) with the offset's dtype, or
        ``None`` without an offset.
    """
    x = as_row_layout(x)
    grad_y = as_row_layout(grad_y)
    offset = _checked_offset(offset, x)
    has_offset = offset is not None
    offset_or_x = offset if has_offset else x  # the kernels need a pointer even where HAS_OFFSET is off
    launch = _Launch(x, num_groups, config or LaunchConfig.for_input(x.shape, backward=True, num_groups=num_groups))
    partial = torch.empty(
        (launch.num_samples, launch.num_chunks, 2 + has_offset, launch.channels), device=x.device, dtype=torch.float32
    )
    coefficients = torch.empty((launch.num_samples, num_groups, 2), device=x.device, dtype=torch.float32)
    grad_x = torch.empty_like(x)
    grad_weight = torch.empty_like(weight)
    grad_bias = torch.empty_like(bias)
    grad_offset = torch.empty_like(offset) if has_offset else None
    if launch.whole_groups:
        _whole_group_backward_kernel[(launch.num_samples, num_groups)](
            grad_y,
            x,
            weight,
            bias,
            mean,
            rstd,
            offset_or_x,
            partial,
            grad_x,
            launch.num_rows,
            *_row_strides(x),
            *_row_strides(grad_y),
            *_row_strides(grad_x),
            SILU=silu,
            HAS_OFFSET=has_offset,
            **launch.whole_group_blocks,
        )
    else:
        _backward_partial_kernel[launch.grid](
            grad_y,
            x,
            weight,
            bias,
            mean,
            rstd,
            offset_or_x,
            partial,
            launch.num_rows,
            launch.rows_per_chunk,
            launch.num_chunks,
            *_row_strides(x),
            *_row_strides(grad_y),
            SILU=silu,
            HAS_OFFSET=has_offset,
            G=num_groups,
            **launch.tile,
        )
    _backward_reduce_kernel[(num_groups,)](
        partial,
        weight,
        rstd,
        coefficients,
        grad_weight,
        grad_bias,
        grad_offset if has_offset else grad_bias,
        launch.num_samples,
        launch.num_rows,
        launch.num_chunks,
        HAS_OFFSET=has_offset,
        BLOCK_N=launch.block_n,
        **launch.group_blocks,
    )
    if launch.whole_groups:
        return grad_x, grad_weight, grad_bias, grad_offset
    _backward_dx_kernel[launch.grid](
        grad_y,
        x,
        weight,
        bias,
        mean,
        rstd,
        offset_or_x,
        coefficients,
        grad_x,
        launch.num_rows,
        launch.rows_per_chunk,
        *_row_strides(x),
        *_row_strides(grad_y),
        *_row_strides(grad_x),
        SILU=silu,
        HAS_OFFSET=has_offset,
        G=num_groups,
        **launch.tile,
    )
    return grad_x, grad_weight, grad_bias, grad_offset
