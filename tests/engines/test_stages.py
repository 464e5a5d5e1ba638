import pytest

from medsegdiff_monai.engines import TrainingStage, parse_stages, stage_at_epoch, total_epochs

PLAN = [
    {"name": "segmentation", "epochs": 2, "train": "backbone", "losses": ["seg"]},
    {"name": "classification", "epochs": 1, "train": "grade_head", "lr_multiplier": 10.0, "losses": ["grade"]},
    {
        "name": "joint",
        "epochs": 3,
        "train": "all",
        "lr_multiplier": 0.1,
        "losses": ["seg", "grade"],
        "uncertainty_weighting": True,
    },
]


def test_parse_and_walk_the_plan():
    stages = parse_stages(PLAN)
    assert [s.name for s in stages] == ["segmentation", "classification", "joint"]
    assert total_epochs(stages) == 6
    assert [stage_at_epoch(stages, e)[0] for e in range(1, 8)] == [0, 0, 1, 2, 2, 2, 2]
    assert stages[2] == TrainingStage("joint", 3, "all", 0.1, ("seg", "grade"), True)


def test_segmentation_only_plan_drops_head_stages():
    stages = parse_stages(PLAN, use_grade_head=False)
    assert [s.name for s in stages] == ["segmentation", "joint"]
    assert stages[1].losses == ("seg",)


def test_single_stage_selection():
    stages = parse_stages(PLAN, only_stage=2)
    assert [s.name for s in stages] == ["classification"]
    with pytest.raises(ValueError, match=r"run_stage=4 is out of range: the plan has 3 stage\(s\), numbered from 1"):
        parse_stages(PLAN, only_stage=4)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"name": "x", "epochs": 1, "train": "decoder"}, "train='decoder'"),
        ({"name": "x", "epochs": -1, "train": "all"}, "epochs=-1"),
        ({"name": "x", "epochs": 1, "train": "all", "losses": ["dice"]}, "losses=\\['dice'\\]"),
        ({"name": "x", "epochs": 1, "train": "all", "lr": 3}, "unknown field"),
        ({"name": "x", "train": "all"}, "missing field 'epochs'"),
        ({"name": "x", "epochs": 1, "train": "all", "lr_multiplier": 0}, "lr_multiplier=0"),
    ],
)
def test_bad_stage_names_the_field(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_stages([bad])


def test_old_stage_spellings_parse_with_a_warning():
    old = [{**stage, "train": stage["train"].replace("grade_head", "cls_head")} for stage in PLAN]
    old = [{**stage, "losses": ["cls" if n == "grade" else n for n in stage["losses"]]} for stage in old]
    with pytest.warns(
        DeprecationWarning, match="'cls_head' is renamed 'grade_head'|'cls' is renamed 'grade'"
    ) as caught:
        stages = parse_stages(old)
    assert stages == parse_stages(PLAN)
    messages = [str(w.message) for w in caught]
    assert any("train: 'cls_head'" in m for m in messages) and any("losses: 'cls'" in m for m in messages)
    with pytest.warns(DeprecationWarning) as caught:
        assert parse_stages(old, use_cls_head=False) == parse_stages(PLAN, use_grade_head=False)
    assert "use_cls_head= of parse_stages is renamed use_grade_head=" in str(caught[0].message)


def test_uncertainty_weighting_reads_command_line_switches():
    """``--stages#2#uncertainty_weighting false`` reaches the plan as the string 'false', which is not True."""
    plan = [dict(stage) for stage in PLAN]
    plan[2]["uncertainty_weighting"] = "false"
    assert parse_stages(plan)[2].uncertainty_weighting is False
    plan[2]["uncertainty_weighting"] = "maybe"
    with pytest.raises(ValueError, match=r"stages\[2\] \('joint'\) uncertainty_weighting='maybe'"):
        parse_stages(plan)
