"""DiffusionUNetWithGradeHead: shapes, composition, conditioning gradients, presets, bundle config, export."""

from __future__ import annotations

import pytest
import torch
from monai.bundle import ConfigParser

from medsegdiff_monai.networks import (
    NETWORK_PRESETS,
    ConditionFeatures,
    DiffusionUNetWithGradeHead,
    get_network,
)


def _inputs(batch: int, mask_channels: int, size: int = 32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, mask_channels, size, size, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    image = torch.randn(batch, 4, size, size, generator=generator)
    return x_t, t, image


def _count(network: torch.nn.Module, prefix: str = "") -> int:
    return sum(p.numel() for name, p in network.named_parameters() if name.startswith(prefix))


@pytest.mark.parametrize("mask_channels", [1, 3])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("use_grade_head", [True, False])
def test_output_shapes(mask_channels, batch, use_grade_head):
    network = get_network("small", mask_channels=mask_channels, use_grade_head=use_grade_head)
    seg_logits, grade_logits, calib_map = network(*_inputs(batch, mask_channels))
    assert seg_logits.shape == (batch, mask_channels, 32, 32)
    assert calib_map.shape == (batch, mask_channels, 32, 32)
    if use_grade_head:
        assert grade_logits.shape == (batch, 2)
        assert network.grade_head is not None
    else:
        assert grade_logits is None and network.grade_head is None
        assert not any(name.startswith("grade_head.") for name, _ in network.named_parameters())


def _fill_zero_initialised_weights(network: torch.nn.Module) -> None:
    """MONAI zero-initialises the last conv of each residual block (so t has no effect at init): make them random."""
    with torch.no_grad():
        for parameter in network.parameters():
            if parameter.ndim > 1 and not parameter.any():
                parameter.normal_(0.0, 0.05)


def test_encode_condition_then_denoise_equals_forward_and_ignores_t():
    torch.manual_seed(0)
    network = get_network("small").eval()
    _fill_zero_initialised_weights(network)
    x_t, t, image = _inputs(3, 3)
    condition = network.encode_condition(image)
    assert isinstance(condition, ConditionFeatures)
    assert len(condition.features) == len(network.channels) + 1
    assert all(f.shape[0] == 3 for f in (*condition.features, condition.calib_map, condition.grade_logits))
    seg_logits, grade_logits, calib_map = network(x_t, t, image)
    torch.testing.assert_close(network.denoise(x_t, t, condition), seg_logits)
    torch.testing.assert_close(condition.grade_logits, grade_logits)
    torch.testing.assert_close(condition.calib_map, calib_map)
    # float timesteps are accepted; a different t changes seg_logits but not the image-only outputs
    torch.testing.assert_close(network(x_t, t.float(), image)[0], seg_logits)
    other = network(x_t, (t + 500) % 1000, image)
    assert not torch.allclose(other[0], seg_logits)
    torch.testing.assert_close(other[1], grade_logits)
    # an ensemble reuses the condition repeated along the batch: member k of slice i equals slice i alone
    members = 2
    repeated = ConditionFeatures(
        features=tuple(f.repeat_interleave(members, 0) for f in condition.features),
        calib_map=condition.calib_map.repeat_interleave(members, 0),
        grade_logits=condition.grade_logits.repeat_interleave(members, 0),
    )
    ensemble = network.denoise(x_t.repeat_interleave(members, 0), t.repeat_interleave(members, 0), repeated)
    torch.testing.assert_close(ensemble[::members], seg_logits, atol=1e-5, rtol=1e-4)


def test_invalid_inputs_raise_value_errors():
    network = get_network("small")
    with pytest.raises(ValueError, match="divisible by 2\\*\\*\\(len\\(channels\\)-1\\) = 8"):
        network(torch.randn(1, 3, 36, 36), torch.tensor([1]), torch.randn(1, 4, 36, 36))
    with pytest.raises(ValueError, match="one channel per modality"):
        network(torch.randn(1, 3, 32, 32), torch.tensor([1]), torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="x_t must have shape"):
        network(torch.randn(1, 2, 32, 32), torch.tensor([1]), torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match="t must have shape"):
        network(torch.randn(2, 3, 32, 32), torch.tensor([1, 2, 3]), torch.randn(2, 4, 32, 32))
    with pytest.raises(ValueError, match="2D only"):
        DiffusionUNetWithGradeHead(spatial_dims=3)
    with pytest.raises(ValueError, match="unknown network preset"):
        get_network("huge")


def test_3d_without_ss_former_runs():
    network = DiffusionUNetWithGradeHead(
        spatial_dims=3,
        mask_channels=1,
        channels=(8, 16),
        attention_levels=(False, False),
        num_head_channels=8,
        condition_channels=(8, 8),
        num_ss_former_blocks=0,
        grade_hidden_channels=8,
    )
    seg_logits, grade_logits, calib_map = network(
        torch.randn(2, 1, 8, 8, 8), torch.tensor([0, 999]), torch.randn(2, 4, 8, 8, 8)
    )
    assert seg_logits.shape == calib_map.shape == (2, 1, 8, 8, 8)
    assert grade_logits.shape == (2, 2)


def _condition_grad_norms(network: DiffusionUNetWithGradeHead) -> dict[str, float]:
    """Seg-only loss (no calib, no grade): gradient norms reaching parts of the condition UNet."""
    network.zero_grad(set_to_none=True)
    x_t, t, image = _inputs(2, 3, seed=1)
    network(x_t, t, image)[0].square().mean().backward()

    def norm(prefix: str) -> float:
        grads = [p.grad for name, p in network.named_parameters() if name.startswith(prefix) and p.grad is not None]
        return float(sum(g.square().sum() for g in grads)) ** 0.5 if grads else 0.0

    return {
        "conv_in": norm("condition_unet.conv_in."),
        "bottleneck": norm("condition_unet.bottleneck."),
        "calib_out": norm("condition_unet.calib_out."),
        "grade_head": norm("grade_head."),
    }


def _zero_(*modules: torch.nn.Module) -> None:
    with torch.no_grad():
        for module in modules:
            for parameter in module.parameters():
                parameter.zero_()


def test_gradients_reach_condition_unet_through_anchor_path_only():
    torch.manual_seed(0)
    network = get_network("small")
    baseline = _condition_grad_norms(network)
    assert all(baseline[key] > 0 for key in ("conv_in", "bottleneck", "calib_out"))
    assert baseline["grade_head"] == 0.0
    # cut the feature injections and the SS-Former's keys/values: only the anchor gate is left
    _zero_(network.feature_injections, *(b.attention.to_k for b in network.ss_former))
    _zero_(*(b.attention.to_v for b in network.ss_former))
    anchor_only = _condition_grad_norms(network)
    assert anchor_only["conv_in"] > 0 and anchor_only["bottleneck"] > 0 and anchor_only["calib_out"] > 0
    # and cutting the anchor gate too leaves no path at all (so the test above can fail)
    _zero_(*(gate.gate_conv for gate in network.anchor_gates))
    assert all(value == 0.0 for value in _condition_grad_norms(network).values())


def test_gradients_reach_condition_unet_through_ss_former_only():
    torch.manual_seed(0)
    network = get_network("small")
    _zero_(network.feature_injections, *(gate.gate_conv for gate in network.anchor_gates))
    ss_former_only = _condition_grad_norms(network)
    assert ss_former_only["bottleneck"] > 0 and ss_former_only["conv_in"] > 0
    assert ss_former_only["calib_out"] == 0.0  # the calibration map only feeds the (cut) anchor gate
    _zero_(*(b.attention.to_k for b in network.ss_former), *(b.attention.to_v for b in network.ss_former))
    assert _condition_grad_norms(network)["bottleneck"] == 0.0


def test_parameter_counts():
    small = get_network("small")
    assert _count(small) < 2_000_000
    assert _count(small, "condition_unet.") > 0 and _count(small, "grade_head.") > 0
    assert _count(get_network("small", use_grade_head=False)) == _count(small) - _count(small, "grade_head.")
    assert NETWORK_PRESETS["base"]["channels"][0] == 128 and NETWORK_PRESETS["base"]["num_res_blocks"] == 2


def test_bundle_config_builds_the_network():
    config = {
        "preset_net": {"_target_": "medsegdiff_monai.networks.get_network", "preset": "small", "use_grade_head": True},
        "class_net": {
            "_target_": "medsegdiff_monai.networks.DiffusionUNetWithGradeHead",
            "mask_channels": 1,
            "channels": [16, 32, 32],
            "attention_levels": [False, False, True],
            "num_head_channels": 16,
            "condition_channels": [8, 16, 16],
            "use_grade_head": False,
        },
    }
    parser = ConfigParser(config)
    preset_net = parser.get_parsed_content("preset_net")
    class_net = parser.get_parsed_content("class_net")
    assert isinstance(preset_net, DiffusionUNetWithGradeHead) and preset_net.grade_head is not None
    assert _count(preset_net) == _count(get_network("small"))
    assert isinstance(class_net, DiffusionUNetWithGradeHead) and class_net.grade_head is None
    seg_logits, grade_logits, _ = class_net(*_inputs(2, 1, size=16))
    assert seg_logits.shape == (2, 1, 16, 16) and grade_logits is None


def test_torch_export_of_forward_equals_eager_with_dynamic_batch():
    torch.manual_seed(0)
    network = get_network("small").eval()
    batch_dim = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(
        network, _inputs(2, 3), dynamic_shapes=({0: batch_dim}, {0: batch_dim}, {0: batch_dim})
    )
    for batch in (2, 5):
        x_t, t, image = _inputs(batch, 3, seed=batch)
        exported = program.module()(x_t, t, image)
        with torch.no_grad():
            eager = network(x_t, t, image)
        for got, expected in zip(exported, eager):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_denoise_takes_a_python_int_timestep_for_the_whole_batch():
    """The docstring's "a scalar for the whole batch": a Python int gives what a 0-d tensor and a (B,) tensor give."""
    torch.manual_seed(0)
    network = get_network("small").eval()
    x_t, _, image = _inputs(batch=2, mask_channels=3)
    with torch.no_grad():
        condition = network.encode_condition(image)
        by_int = network.denoise(x_t, 5, condition)
        torch.testing.assert_close(by_int, network.denoise(x_t, torch.tensor(5), condition))
        torch.testing.assert_close(by_int, network.denoise(x_t, torch.tensor([5, 5]), condition))
