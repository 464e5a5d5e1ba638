from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from medsegdiff_monai.inferers import DiffusionSampler
from medsegdiff_monai.networks import extract_network_state, get_network, load_network_weights
from medsegdiff_monai.workflows import (
    BratsVolumeInferer,
    export_from_checkpoint,
    export_network,
    load_exported_network,
)

TINY = {
    "channels": (8, 8, 16),
    "condition_channels": (8, 8, 16),
    "attention_levels": (False, False, False),
    "num_head_channels": 8,
    "norm_num_groups": 4,
    "grade_hidden_channels": 8,
}


def _tiny_network(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return get_network("small", **TINY, **kwargs).eval()


def test_checkpoint_formats_load_the_same_weights(tmp_path):
    network = _tiny_network()
    state = network.state_dict()
    nested = {"network": state, "optimizer": {"state": {}}}
    wrapped = {f"_orig_mod.{k}": v for k, v in state.items()}
    for name, content in (("plain.pt", state), ("nested.pt", nested), ("compiled.pt", wrapped)):
        torch.save(content, tmp_path / name)
        loaded = load_network_weights(_tiny_network(use_grade_head=True), tmp_path / name)
        for key, value in loaded.state_dict().items():
            torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    assert extract_network_state({"module.a": 1}) == {"a": 1}


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_network_weights(_tiny_network(), tmp_path / "missing.pt")
    torch.save(_tiny_network(use_grade_head=False).state_dict(), tmp_path / "no_head.pt")
    with pytest.raises(ValueError, match="use_grade_head"):
        load_network_weights(_tiny_network(use_grade_head=True), tmp_path / "no_head.pt")


def test_exported_network_matches_and_samples(tmp_path):
    network = _tiny_network()
    torch.save({"network": network.state_dict()}, tmp_path / "model.pt")
    paths = export_from_checkpoint(tmp_path / "model.pt", tmp_path / "exported", image_size=(16, 16), **TINY)
    assert [p.name for p in paths] == ["model_condition.pt2", "model_denoise.pt2"]
    exported = load_exported_network(tmp_path / "exported")
    assert not exported.training  # in eval mode, as sampling expects: no "training mode" warning
    with pytest.raises(ValueError, match=r"exported for .*; got slices of \[24, 16\]"):
        exported.encode_condition(torch.randn(1, 4, 24, 16))
    image = torch.randn(3, 4, 16, 16)
    x_t, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 500, 999])
    with torch.no_grad():
        for got, expected in zip(exported(x_t, t, image), network(x_t, t, image)):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        condition = network.encode_condition(image)
        for scalar in (7, torch.tensor(7)):  # one timestep for the batch, as the package's network takes it
            expected = network.denoise(x_t, torch.full((3,), 7), condition)
            torch.testing.assert_close(exported.denoise(x_t, scalar, condition), expected, rtol=1e-4, atol=1e-5)
        sampler = DiffusionSampler(num_inference_steps=2, ensemble_size=3)
        torch.testing.assert_close(sampler(exported, image[:1]).probs, sampler(network, image[:1]).probs)
    with pytest.raises(FileNotFoundError, match="other_condition.pt2"):
        load_exported_network(tmp_path / "exported", prefix="other")


def test_channels_last_network_is_exported_from_a_contiguous_copy(tmp_path):
    network = _tiny_network().to(memory_format=torch.channels_last)
    export_network(network, tmp_path, image_size=(16, 16))
    convolution_weights = [p for p in network.parameters() if p.ndim == 4]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convolution_weights)  # left as it was
    exported = load_exported_network(tmp_path)
    program_ops = {str(node.target) for node in exported.condition_program.graph.nodes}
    assert not any("medsegdiff" in op for op in program_ops)
    image, x_t, t = torch.randn(2, 4, 16, 16), torch.randn(2, 3, 16, 16), torch.tensor([3, 800])
    with torch.no_grad():
        for got, expected in zip(exported(x_t, t, image), network(x_t, t, image)):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_existing_programs_are_replaced_only_on_request(tmp_path):
    """A second export into the same folder stops before exporting, naming both files; with ``overwrite`` it
    replaces them, and no temporary file is left behind."""
    first = _tiny_network()
    paths = export_network(first, tmp_path, image_size=(16, 16))
    before = [path.read_bytes() for path in paths]
    second = _tiny_network()
    with torch.no_grad():
        for parameter in second.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    with pytest.raises(FileExistsError, match=r"model_condition.pt2 and .*model_denoise.pt2 already exist"):
        export_network(second, tmp_path, image_size=(16, 16))
    assert [path.read_bytes() for path in paths] == before
    (tmp_path / ".model_denoise.partial-999.pt2").write_bytes(b"what an export killed with -9 left")
    export_network(second, tmp_path, image_size=(16, 16), overwrite=True)
    image = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        got = load_exported_network(tmp_path).encode_condition(image).calib_map
        torch.testing.assert_close(got, second.encode_condition(image).calib_map, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(got, first.encode_condition(image).calib_map, rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_condition.pt2", "model_denoise.pt2"]
    paths[0].unlink()
    with pytest.raises(
        FileExistsError, match=r"model_denoise.pt2 already exists\. Pass --overwrite true to replace it,"
    ):
        export_network(second, tmp_path, image_size=(16, 16))


def test_an_export_stopped_while_writing_keeps_the_earlier_pair(tmp_path, monkeypatch):
    paths = export_network(_tiny_network(), tmp_path, image_size=(16, 16))
    before = [path.read_bytes() for path in paths]
    save = torch.export.save
    saved = []

    def stopped_after_one_program(program, path):
        if saved:
            raise KeyboardInterrupt  # Ctrl-C while the second program is written
        saved.append(path)
        save(program, path)

    monkeypatch.setattr(torch.export, "save", stopped_after_one_program)
    second = _tiny_network()
    with torch.no_grad():
        for parameter in second.parameters():
            parameter.add_(0.01)
    with pytest.raises(KeyboardInterrupt):
        export_network(second, tmp_path, image_size=(16, 16), overwrite=True)
    assert [path.read_bytes() for path in paths] == before  # neither program replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_condition.pt2", "model_denoise.pt2"]


def test_whole_subject_inference_runs_the_exported_network(synthetic_datalist, tmp_path):
    """BratsVolumeInferer takes the loaded programs as it takes the network (it calls ``.to(device).eval()``), and
    writes the same label map."""
    network = _tiny_network()
    export_network(network, tmp_path / "exported", image_size=(64, 64))
    exported = load_exported_network(tmp_path / "exported")
    outputs = {}
    for name, model in (("eager", network), ("exported", exported)):
        inferer = BratsVolumeInferer(model, DiffusionSampler(2, ensemble_size=2, seed=0), (64, 64), progress=False)
        outputs[name] = inferer.run(synthetic_datalist, tmp_path / name, num_cases=1)[0]
    eager, got = (np.asarray(nib.load(outputs[name].files["seg"]).dataobj) for name in ("eager", "exported"))
    assert (eager != got).mean() < 1e-3  # float rounding of the programs may flip a voxel at the threshold
    assert outputs["exported"].p_hgg == pytest.approx(outputs["eager"].p_hgg, abs=1e-4)
