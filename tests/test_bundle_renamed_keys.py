"""The bundle keys and ids renamed for clarity keep working under their old names for one release."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"


def _parser(names: list[str], **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / name) for name in names])
    parser.update(overrides)
    return parser


@pytest.fixture
def dataset_dir(synthetic_datalist: Path) -> str:
    return str(synthetic_datalist.parent)


def test_training_defaults_to_the_grade_head_without_warnings(dataset_dir):
    parser = _parser(["train.json"], dataset_dir=dataset_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert parser.get_parsed_content("grade_head_enabled") is True
        assert parser.get_parsed_content("grade_loss") is not None
        assert [stage.name for stage in parser.get_parsed_content("stage_plan")] == [
            "segmentation",
            "classification",
            "joint",
        ]


@pytest.mark.parametrize("key", ["use_cls_head", "use_grade_head"])
def test_a_command_line_false_gives_segmentation_only_training(dataset_dir, key):
    """``--use_cls_head false`` (the old key, with a warning) and ``--use_grade_head false`` switch the head off."""
    parser = _parser(["train.json"], dataset_dir=dataset_dir, **{key: "false"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert parser.get_parsed_content("grade_head_enabled") is False
        assert parser.get_parsed_content("network_def#use_grade_head") is False
        assert parser.get_parsed_content("grade_loss") is None
        assert parser.get_parsed_content("selection_score_names") == ["Dice"]
        plan = parser.get_parsed_content("stage_plan")
    assert [stage.name for stage in plan] == ["segmentation", "joint"] and plan[1].losses == ("seg",)
    renamed = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    if key == "use_cls_head":
        assert renamed and all("'use_cls_head' is renamed 'use_grade_head'" in m for m in renamed)
    else:
        assert not renamed


def test_old_argument_names_under_a_config_object(dataset_dir):
    """An override of an object's old argument (``--network_def#use_cls_head false``, ``monai.bundle.load(...,
    net_override={"use_cls_head": False})``) wins over the config's new one."""
    parser = _parser(["inference.json"], **{"network_def#use_cls_head": False})
    with pytest.warns(DeprecationWarning, match="use_cls_head= of get_network is renamed use_grade_head="):
        assert parser.get_parsed_content("network_def").grade_head is None


def test_old_grade_loss_key(dataset_dir):
    parser = _parser(["train.json"], dataset_dir=dataset_dir, cls_loss="$torch.nn.CrossEntropyLoss()")
    with pytest.warns(DeprecationWarning, match="'cls_loss' is renamed 'grade_loss'"):
        assert type(parser.get_parsed_content("train#trainer#grade_loss")).__name__ == "CrossEntropyLoss"


@pytest.mark.parametrize("names", [["inference.json"], ["train.json", "evaluate.json"]])
def test_inference_and_evaluation_read_the_old_head_switch(dataset_dir, names):
    parser = _parser(names, dataset_dir=dataset_dir, use_cls_head=False)
    with pytest.warns(DeprecationWarning, match="'use_cls_head' is renamed 'use_grade_head'"):
        assert parser.get_parsed_content("network_def#use_grade_head") is False
    if "evaluate.json" in names:
        assert parser.get_parsed_content("grade_head_enabled") is False


@pytest.mark.parametrize("names", [["inference.json"], ["train.json", "evaluate.json"]])
def test_sampler_and_volume_inferer_are_the_objects_inferer_and_evaluator_refer_to_them(names):
    parser = _parser(names)
    assert parser["sampler"]["_target_"] == "medsegdiff_monai.inferers.DiffusionSampler"
    assert parser["volume_inferer"]["_target_"] == "medsegdiff_monai.workflows.BratsVolumeInferer"
    assert parser["volume_inferer"]["sampler"] == "@sampler"
    assert parser["inferer"] == "@sampler" and parser["evaluator"] == "@volume_inferer"  # MONAI's bundle properties
    if "evaluate.json" in names:  # the training config's validation ids mean the evaluation objects too
        assert parser["validate#inferer"] == "@sampler" and parser["validate#evaluator"] == "@volume_inferer"
    assert parser.get_parsed_content("inferer") is parser.get_parsed_content("sampler")
    run = " ".join(parser["run"])
    assert "@volume_inferer" in run and "@evaluator" not in run and "@validate#evaluator" not in run
