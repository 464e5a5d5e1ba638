"""Checkpoints written when the grade head was called ``cls_head`` load into the renamed network by every route, and
the network's other old names still work, each with a ``DeprecationWarning``."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine
from monai.handlers import CheckpointLoader

from medsegdiff_monai.networks import ConditionFeatures, get_network, load_network_weights
from tests.networks.tiny_network import TINY, tiny_network

BUNDLE = Path(__file__).resolve().parents[2] / "bundle"


def _old_keys(state: dict) -> dict:
    """``state`` as it was once saved: every ``grade_head.`` key (after any wrapper prefix) spelled ``cls_head.``,
    and without the head's input statistics (``feature_norm``), which did not exist then."""
    return {
        re.sub(r"(^|\.)grade_head\.", r"\1cls_head.", key): value
        for key, value in state.items()
        if ".feature_norm." not in f".{key}"
    }


def _assert_same_weights(network: torch.nn.Module, expected: dict) -> None:
    loaded = network.state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


@pytest.fixture
def trained():
    """The tiny network (seed 0) and its state dict with the old ``cls_head.*`` keys."""
    network = tiny_network()
    old = _old_keys(network.state_dict())
    assert any(key.startswith("cls_head.") for key in old) and not any("grade_head" in key for key in old)
    return network.state_dict(), old


def _fresh() -> torch.nn.Module:
    torch.manual_seed(1)  # other weights than the checkpoint's
    return get_network("small", **TINY).eval()


def test_load_state_dict_renames_the_old_keys(trained):
    expected, old = trained
    network = _fresh()
    with pytest.warns(
        DeprecationWarning, match=r"key prefix cls_head \(6 keys, renamed on load\) is renamed grade_head"
    ):
        network.load_state_dict(old, strict=True)
    _assert_same_weights(network, expected)


@pytest.mark.parametrize("wrapper", ["plain", "nested", "compiled", "ddp"])
def test_the_project_loader_reads_old_checkpoint_files(tmp_path, trained, wrapper):
    expected, old = trained
    content = {
        "plain": old,
        "nested": {"network": old, "optimizer": {"state": {}, "param_groups": []}},
        "compiled": {f"_orig_mod.{k}": v for k, v in old.items()},
        "ddp": {"network": {f"module.{k}": v for k, v in old.items()}},
    }[wrapper]
    torch.save(content, tmp_path / "old.pt")
    with pytest.warns(DeprecationWarning, match="cls_head"):
        network = load_network_weights(_fresh(), tmp_path / "old.pt", strict=True)
    _assert_same_weights(network, expected)


def test_wrapped_networks_load_old_keys(trained):
    expected, old = trained
    compiled = torch.compile(_fresh())  # lazy: nothing compiles until it is called
    with pytest.warns(DeprecationWarning, match="cls_head"):
        compiled.load_state_dict({f"_orig_mod.{k}": v for k, v in old.items()})
    _assert_same_weights(compiled._orig_mod, expected)
    parallel = torch.nn.DataParallel(_fresh())  # the ``module.`` prefix of DDP, without a process group
    with pytest.warns(DeprecationWarning, match="cls_head"):
        parallel.load_state_dict({f"module.{k}": v for k, v in old.items()})
    _assert_same_weights(parallel.module, expected)


def test_monai_checkpoint_loader_reads_old_keys(tmp_path, trained):
    expected, old = trained
    torch.save({"network": old}, tmp_path / "checkpoint.pt")
    network = _fresh()
    engine = Engine(lambda engine, batch: None)
    CheckpointLoader(load_path=str(tmp_path / "checkpoint.pt"), load_dict={"network": network}).attach(engine)
    with pytest.warns(DeprecationWarning, match="cls_head"):
        engine.run([0], max_epochs=1)
    _assert_same_weights(network, expected)


def test_new_keys_load_without_a_warning(recwarn, trained):
    expected, _ = trained
    network = _fresh()
    network.load_state_dict(expected)
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning) and "cls_head" in str(w.message)]
    _assert_same_weights(network, expected)


def test_the_shipped_checkpoint_loads_strictly_without_warnings():
    """``models/model.pt`` is saved in the current format: grade-head keys with input statistics and a fitted grade
    calibration, so it loads strictly with no deprecation or missing-calibration warning."""
    checkpoint = BUNDLE / "models" / "model.pt"
    saved = torch.load(checkpoint, weights_only=True)
    assert not any(key.startswith("cls_head.") for key in saved)
    assert int(saved["grade_head.feature_norm.num_batches_tracked"]) > 0
    assert (float(saved["grade_calibration.scale"]), float(saved["grade_calibration.bias"])) != (1.0, 0.0)
    preset = json.loads((BUNDLE / "configs" / "inference.json").read_text())["preset"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        network = load_network_weights(get_network(preset), checkpoint, strict=True)
    state = network.state_dict()
    for key, value in saved.items():
        assert torch.equal(state[key], value), key


def test_old_argument_and_attribute_names():
    with pytest.warns(DeprecationWarning, match="use_cls_head= of get_network is renamed use_grade_head="):
        headless = get_network("small", **TINY, use_cls_head=False)
    assert headless.grade_head is None and headless.grade_calibration is None
    old_kwargs = {("cls_hidden_channels" if k == "grade_hidden_channels" else k): v for k, v in TINY.items()}
    with pytest.warns(DeprecationWarning, match=r"cls_(hidden_channels|dropout)="):
        network = get_network("small", **old_kwargs, cls_dropout=0.0).eval()
    assert network.grade_head.mlp[1].out_features == TINY["grade_hidden_channels"]
    assert network.grade_head.mlp[3].p == 0.0
    with pytest.warns(DeprecationWarning, match="the value of use_cls_head= is used"):
        assert get_network("small", **TINY, use_cls_head=False, use_grade_head=True).grade_head is None
    with pytest.warns(DeprecationWarning, match="cls_head is renamed grade_head"):
        assert network.cls_head is network.grade_head
    condition = network.encode_condition(torch.randn(1, 4, 16, 16))
    assert isinstance(condition, ConditionFeatures)
    with pytest.warns(DeprecationWarning, match="cls_logits is renamed grade_logits"):
        assert condition.cls_logits is condition.grade_logits


def test_a_checkpoint_of_another_network_is_summarised_not_dumped(tmp_path):
    """Loading a file into a network of other settings names the file, counts what differs with one example of each
    kind (the keys torch's own error would list one by one), and names the settings to match."""
    torch.save(get_network("small", **TINY).state_dict(), tmp_path / "model.pt")
    other = get_network("small", **{**TINY, "use_grade_head": False, "channels": (8, 8, 8)})
    expected, stored = other.state_dict(), torch.load(tmp_path / "model.pt", weights_only=True)
    unexpected = [k for k in stored if k not in expected]
    reshaped = [k for k in expected if k in stored and stored[k].shape != expected[k].shape]
    with pytest.raises(ValueError) as raised:
        load_network_weights(other, tmp_path / "model.pt")
    message = str(raised.value)
    assert message.startswith(f"checkpoint {tmp_path / 'model.pt'} does not match the network: ")
    assert f"{len(unexpected)} in the file are not in the network (e.g. {unexpected[0]})" in message
    key = reshaped[0]
    assert f"{len(reshaped)} have another shape (e.g. {key}: {tuple(stored[key].shape)} in the file" in message
    assert "preset, use_grade_head, mask_channels" in message
    assert len(message) < 1000


@pytest.mark.parametrize("file_has_head", [False, True])
def test_a_grade_head_in_only_the_file_or_the_network_names_use_grade_head(tmp_path, file_has_head):
    """A segmentation-only file (training writes one on data without grades) loaded into a network with the grade
    head, and the converse, name the ``use_grade_head`` that fits the file, with no calibration warning before."""
    torch.save(get_network("small", **TINY, use_grade_head=file_has_head).state_dict(), tmp_path / "model.pt")
    network = get_network("small", **TINY, use_grade_head=not file_has_head)
    with warnings.catch_warnings(), pytest.raises(ValueError) as raised:
        warnings.simplefilter("error")
        load_network_weights(network, tmp_path / "model.pt")
    message = str(raised.value)
    assert message.startswith(f"checkpoint {tmp_path / 'model.pt'} does not match the network: ")
    if file_has_head:
        assert "the file has a grade head, while the network is built without one (11 in the file" in message
        assert message.endswith("Pass --use_grade_head true or leave it at its default (true).")
    else:
        assert "the file has no grade head: it was trained segmentation-only" in message
        assert "(11 tensor(s) of the network are not in the file, e.g. grade_head.feature_norm.running_mean)" in message
        assert "Pass --use_grade_head false" in message


@pytest.mark.parametrize("content", [b"subject_id,p_hgg\n", b'{"not": "a checkpoint"}', None])
def test_a_file_that_is_no_checkpoint_is_named(tmp_path, content):
    """A text file, a JSON file and a truncated checkpoint each give one ValueError naming the file, never torch's
    advice to load with weights_only=False."""
    path = tmp_path / "model.pt"
    if content is None:
        torch.save(get_network("small", **TINY).state_dict(), path)
        content = path.read_bytes()[:2000]
    path.write_bytes(content)
    with pytest.raises(ValueError) as raised:
        load_network_weights(get_network("small", **TINY), path)
    message = str(raised.value)
    assert message.startswith(f"checkpoint {path} cannot be read (")
    assert "truncated or not a checkpoint of this library. Give a network file written by training" in message
    assert "weights_only" not in message
