"""Building blocks of the network: anchor blur and gate, spectral cross-attention, grade head."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.layers import gaussian_1d, separable_filtering
from sklearn.metrics import roc_auc_score

from medsegdiff_monai.networks import (
    AnchorGate,
    GradeHead,
    RunningStandardization,
    SeparableGaussianBlur,
    SpectralCrossAttention,
    SSFormerBlock,
)


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_gaussian_blur_matches_monai_gaussian_filter(spatial_dims):
    torch.manual_seed(0)
    x = torch.rand(2, 3, *([9] * spatial_dims))
    blur = SeparableGaussianBlur(spatial_dims, kernel_size=7, sigma=1.0)
    # MONAI's normalised sampled Gaussian, sigma 1 truncated at 3 sigma: the same 7 taps, zero padding
    kernel = gaussian_1d(1.0, truncated=3.0, approx="sampled", normalize=True)
    assert kernel.numel() == 7
    reference = separable_filtering(x, [kernel] * spatial_dims)
    torch.testing.assert_close(blur(x), reference, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_gaussian_blur_gradients_match_monai_separable_filtering(spatial_dims):
    torch.manual_seed(0)
    blur = SeparableGaussianBlur(spatial_dims, kernel_size=5, sigma=1.3).double()
    x = torch.rand(2, 3, *range(7, 7 + spatial_dims), dtype=torch.float64, requires_grad=True)
    grad_output = torch.randn(2, 3, *range(7, 7 + spatial_dims), dtype=torch.float64)
    x_grad, sigma_grad = torch.autograd.grad(blur(x), (x, blur.log_sigma), grad_output)
    # the same kernel through MONAI's convolution-based filtering, differentiated by autograd
    reference = separable_filtering(x, [blur.kernel_1d()] * spatial_dims)
    reference_x_grad, reference_sigma_grad = torch.autograd.grad(reference, (x, blur.log_sigma), grad_output)
    torch.testing.assert_close(x_grad, reference_x_grad)
    torch.testing.assert_close(sigma_grad, reference_sigma_grad)
    assert sigma_grad.abs() > 0


def test_gaussian_blur_keeps_bfloat16_and_rounds_once():
    torch.manual_seed(0)
    blur = SeparableGaussianBlur(2, kernel_size=7, sigma=2.0)
    x = torch.rand(2, 3, 16, 16).to(torch.bfloat16)
    y = blur(x)
    assert y.dtype == torch.bfloat16
    # accumulated in float32 and rounded once: within half a bf16 step (7 fraction bits: 2^-8 relative) of the
    # float32 result
    exact = blur(x.float())
    assert ((y.float() - exact).abs() <= exact.abs() * 2.0**-8).all()


def test_gaussian_blur_sigma_is_learnable_and_clamped():
    blur = SeparableGaussianBlur(2, kernel_size=5, sigma=1.0, learnable_sigma=True, sigma_bounds=(0.5, 2.0))
    blur(torch.rand(1, 1, 8, 8)).sum().backward()
    assert blur.log_sigma.grad is not None and blur.log_sigma.grad.abs() > 0
    with torch.no_grad():
        blur.log_sigma.fill_(10.0)
    assert blur.sigma().item() == pytest.approx(2.0)
    fixed = SeparableGaussianBlur(2, sigma=1.0, learnable_sigma=False)
    assert len(list(fixed.parameters())) == 0
    with pytest.raises(ValueError, match="odd"):
        SeparableGaussianBlur(2, kernel_size=4)


def test_anchor_gate_formula():
    torch.manual_seed(0)
    gate = AnchorGate(2, anchor_channels=3, feature_channels=5, downsample_factor=2)
    features = torch.randn(2, 5, 8, 8)
    anchor_logits = torch.randn(2, 3, 16, 16)
    soft = torch.sigmoid(torch.nn.functional.avg_pool2d(anchor_logits, 2))
    expected_anchor = torch.maximum(gate.blur(soft), soft)
    torch.testing.assert_close(gate.anchor(anchor_logits), expected_anchor)
    weight, bias = gate.gate_conv.conv.weight[:, :, 0, 0], gate.gate_conv.conv.bias
    gate_map = torch.sigmoid(torch.einsum("oc,bchw->bohw", weight, expected_anchor) + bias[None, :, None, None])
    torch.testing.assert_close(gate(features, anchor_logits), features + gate_map * features)
    assert (gate.anchor(anchor_logits) >= soft).all()


def _spatial_reference(attention: SpectralCrossAttention, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Brute-force spatial-domain version of the spectral attention with an all-pass filter (torch.roll loops)."""
    batch, channels, height, width = x.shape
    heads = (batch, attention.num_heads, attention.head_channels, height, width)
    q = attention.to_q(attention.norm_query(x)).reshape(heads)
    normed = attention.norm_context(context)
    k = attention.to_k(normed).reshape(heads)
    v = attention.to_v(normed).reshape(heads)
    affinity = torch.zeros(batch, attention.num_heads, height, width)
    for dy in range(height):
        for dx in range(width):
            # A(delta) = sum_x <q(x + delta), k(x)>
            shifted_q = torch.roll(q, shifts=(-dy, -dx), dims=(-2, -1))
            affinity[:, :, dy, dx] = (shifted_q * k).sum(dim=(2, 3, 4))
    scale = 1.0 / (height * width * attention.head_channels**0.5)
    weights = torch.softmax(affinity.flatten(2) * scale, dim=-1).reshape(affinity.shape)
    out = torch.zeros_like(v)
    for dy in range(height):
        for dx in range(width):
            # out(x) = sum_delta w(delta) v(x - delta)
            out += weights[:, :, None, dy, dx, None, None] * torch.roll(v, shifts=(dy, dx), dims=(-2, -1))
    return attention.proj_out(out.reshape(batch, channels, height, width))


def test_spectral_attention_equals_spatial_computation():
    torch.manual_seed(0)
    attention = SpectralCrossAttention(query_channels=16, context_channels=8, num_head_channels=8, norm_num_groups=4)
    x, context = torch.randn(2, 16, 4, 6) * 3, torch.randn(2, 8, 4, 6) * 3
    torch.testing.assert_close(attention(x, context), _spatial_reference(attention, x, context), atol=1e-5, rtol=1e-4)


def test_spectral_attention_zero_filter_gives_spatial_mean_of_values():
    torch.manual_seed(0)
    attention = SpectralCrossAttention(query_channels=8, context_channels=8, num_head_channels=4, norm_num_groups=4)
    with torch.no_grad():
        attention.frequency_filter.zero_()
        attention.proj_out.weight.copy_(torch.eye(8)[:, :, None, None])
        attention.proj_out.bias.zero_()
    x, context = torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4)
    # a zero filter makes every displacement equally likely: the output is the spatial mean of v everywhere
    v = attention.to_v(attention.norm_context(context))
    expected = v.mean(dim=(2, 3), keepdim=True).expand_as(v)
    torch.testing.assert_close(attention(x, context), expected, atol=1e-5, rtol=1e-4)


def test_filter_response_interpolates_the_radial_profile():
    attention = SpectralCrossAttention(query_channels=4, context_channels=4, num_head_channels=4, norm_num_groups=2)
    with torch.no_grad():
        attention.frequency_filter.copy_(torch.linspace(0.0, 7.0, 8)[None])
    response = attention.filter_response(8, 8, torch.device("cpu"))
    assert response.shape == (1, 8, 5)
    # bin (0, 0) is DC -> profile(0) = 0; bin (4, 4) is the (0.5, 0.5) corner -> radius 1 -> profile(1) = 7
    assert response[0, 0, 0].item() == pytest.approx(0.0)
    assert response[0, 4, 4].item() == pytest.approx(7.0)
    # bin (0, 4): radius 0.5 / sqrt(0.5) = 0.7071 -> 7 * 0.7071
    assert response[0, 0, 4].item() == pytest.approx(7 * 0.5 / 0.5**0.5, rel=1e-5)


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_ss_former_is_real_finite_and_keeps_dtype_under_bf16_autocast(input_dtype):
    torch.manual_seed(0)
    block = SSFormerBlock(query_channels=16, context_channels=8, num_head_channels=8, norm_num_groups=4)
    x = (torch.randn(2, 16, 8, 8) * 50).to(input_dtype)
    context = (torch.randn(2, 8, 8, 8) * 50).to(input_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x, context)
        attended = block.attention(x, context)
    assert not out.is_complex() and not attended.is_complex()
    assert out.dtype == input_dtype and attended.dtype == input_dtype
    assert torch.isfinite(out.float()).all()
    reference = block.float()(x.float(), context.float())
    assert (out.float() - reference).abs().max() < 0.05 * reference.abs().max()


def test_grade_head_pools_average_and_max():
    torch.manual_seed(0)
    head = GradeHead(in_channels=3, hidden_channels=5, num_classes=2, dropout=0.0).eval()
    features = torch.randn(4, 3, 2, 2)
    pooled = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)
    torch.testing.assert_close(head(features), head.mlp(pooled))
    assert head(features).shape == (4, 2)


def test_running_standardization_matches_a_hand_computation():
    """Cumulative mean / biased variance for the first 1/momentum batches, then the exponential update."""
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(5, 3, generator=generator) * 2 + 7 for _ in range(3)]
    norm = RunningStandardization(3, momentum=0.4).train()
    outputs = [norm(batch) for batch in batches]
    b = [batch.double().numpy() for batch in batches]
    mean = (b[0].mean(0) + b[1].mean(0)) / 2  # weights 1, then 1/2
    var = (b[0].var(0) + b[1].var(0)) / 2
    mean, var = 0.6 * mean + 0.4 * b[2].mean(0), 0.6 * var + 0.4 * b[2].var(0)  # then max(1/3, 0.4) = 0.4
    np.testing.assert_allclose(norm.running_mean.numpy(), mean, rtol=1e-5)
    np.testing.assert_allclose(norm.running_var.numpy(), var, rtol=1e-5)
    np.testing.assert_allclose(outputs[2].numpy(), (b[2] - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-5)
    norm.eval()
    single = norm(batches[0][:1])  # evaluation: the running statistics, whatever the batch
    np.testing.assert_allclose(single.numpy(), (b[0][:1] - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-5)
    assert int(norm.num_batches_tracked) == 3


def test_grade_head_checkpoint_without_feature_statistics_loads_as_before():
    """A head saved before the standardisation existed loads strictly and computes mlp(pooled), as it did."""
    torch.manual_seed(0)
    old = GradeHead(in_channels=3, hidden_channels=5, dropout=0.0)
    state = {k: v for k, v in old.state_dict().items() if not k.startswith("feature_norm.")}
    head = GradeHead(in_channels=3, hidden_channels=5, dropout=0.0)
    head.feature_norm.running_mean.fill_(3.0)
    head.load_state_dict(state, strict=True)
    features = torch.randn(4, 3, 2, 2)
    pooled = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)
    torch.testing.assert_close(head.eval()(features), old.mlp.eval()(pooled))


def test_grade_head_learns_a_grade_carried_by_small_differences_on_a_large_common_profile():
    """Pooled features = a large shared profile + a grade signal of under one per cent of it (the condition UNet's
    bottleneck looks like this): after 45 Adam steps the held-out subjects are ranked (scikit-learn's AUC) and their
    logit gap between the grades is wide. Without the standardisation the gap stays below 1."""
    generator = torch.Generator().manual_seed(0)
    profile = 8.0 + 4.0 * torch.randn(1, 32, 1, 1, generator=generator)
    direction = torch.randn(1, 32, 1, 1, generator=generator)

    def subjects(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        grade = torch.arange(count) % 2
        subject = 0.14 * torch.randn(count, 32, 1, 1, generator=generator)
        features = profile + subject + 0.05 * direction * (2.0 * grade.view(-1, 1, 1, 1) - 1.0)
        return features + 0.05 * torch.randn(count, 32, 3, 3, generator=generator), grade

    torch.manual_seed(0)
    head = GradeHead(in_channels=32, hidden_channels=32, dropout=0.0)
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3)
    for _ in range(45):
        features, grade = subjects(16)
        loss = torch.nn.functional.cross_entropy(head.train()(features), grade)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    features, grade = subjects(40)
    with torch.no_grad():
        logits = head.eval()(features)
    log_odds = logits[:, 1] - logits[:, 0]
    assert roc_auc_score(grade.numpy(), log_odds.numpy()) > 0.95
    assert log_odds[grade == 1].mean() - log_odds[grade == 0].mean() > 4.0
