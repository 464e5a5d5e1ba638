"""The inference / evaluation bundle: offline metadata check, CLI runs, and loading in a fresh Python."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import verify_metadata

from medsegdiff_monai.networks import get_network

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
SCHEMA = BUNDLE / "configs" / "schema" / "metadata_schema.json"
TINY_NETWORK = {
    "channels": [8, 8, 16],
    "condition_channels": [8, 8, 16],
    "attention_levels": [False, False, False],
    "num_head_channels": 8,
    "norm_num_groups": 4,
    "grade_hidden_channels": 8,
}


@pytest.fixture(scope="module")
def bundle_copy(tmp_path_factory: pytest.TempPathFactory, synthetic_datalist: Path) -> Path:
    """A working folder holding ``bundle/`` (the repository's configs, a tiny random ``models/model.pt``) and
    ``args.json`` overriding the configs for a fast CPU run on the synthetic test data."""
    root = tmp_path_factory.mktemp("bundle_run")
    shutil.copytree(BUNDLE / "configs", root / "bundle" / "configs")
    (root / "bundle" / "models").mkdir()
    torch.manual_seed(0)
    network = get_network("small", **{k: tuple(v) if isinstance(v, list) else v for k, v in TINY_NETWORK.items()})
    torch.save(network.state_dict(), root / "bundle" / "models" / "model.pt")
    overrides = {f"network_def#{key}": value for key, value in TINY_NETWORK.items()}
    overrides.update(
        dataset_dir=str(synthetic_datalist.parent),
        bundle_root="bundle",
        roi_size=[64, 64],
        num_inference_steps=2,
        ensemble_size=2,
        device="cpu",
    )
    (root / "args.json").write_text(json.dumps(overrides))
    return root


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_metadata_verifies_offline_against_the_schema_copy(tmp_path):
    meta_file = BUNDLE / "configs" / "metadata.json"
    verify_metadata(meta_file=str(meta_file), filepath=str(SCHEMA))
    broken = json.loads(meta_file.read_text())
    del broken["task"]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="'task' is a required property"):
        verify_metadata(meta_file=str(tmp_path / "broken.json"), filepath=str(SCHEMA))


def test_inference_bundle_runs_from_the_command_line(bundle_copy, synthetic_datalist):
    meta = "bundle/configs/metadata.json"
    _run(
        [
            "-m", "monai.bundle", "run",
            "--meta_file", meta,
            "--config_file", "bundle/configs/inference.json",
            "--logging_file", "bundle/configs/logging.conf",
            "--args_file", "args.json",
            "--num_cases", "1",
        ],
        cwd=bundle_copy,
    )  # fmt: skip
    subject = json.loads(synthetic_datalist.read_text())["validation"][0]
    out = bundle_copy / "bundle" / "runs" / "inference"
    seg = nib.load(str(out / f"{subject['subject_id']}_seg.nii.gz"))
    t1 = nib.load(str(synthetic_datalist.parent / subject["image"][0]))
    assert seg.shape == t1.shape and np.allclose(seg.affine, t1.affine)
    assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= {0, 1, 2, 4}
    rows = (out / "grades.csv").read_text().splitlines()
    assert rows[0] == "subject_id,p_hgg,grade" and rows[1].startswith(subject["subject_id"] + ",")


def test_a_bad_sampler_setting_on_the_command_line_ends_with_one_message(bundle_copy):
    """A setting that the sampler refuses ends the run with its message and exit code 1, not a traceback through
    MONAI's config parser; nothing is written."""
    result = subprocess.run(
        [
            sys.executable, "-m", "monai.bundle", "run",
            "--meta_file", "bundle/configs/metadata.json",
            "--config_file", "bundle/configs/inference.json",
            "--logging_file", "bundle/configs/logging.conf",
            "--args_file", "args.json",
            "--scheduler", "euler",
            "--output_dir", "bad_setting_out",
        ],
        cwd=bundle_copy, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "error: scheduler must be one of 'ddim', 'dpmpp_2m', 'dpmpp_3m', 'ddpm', got 'euler'." in result.stderr
    assert not (bundle_copy / "bad_setting_out").exists()


FRESH_PYTHON = """
import json, sys, torch
import monai.bundle
from monai.bundle import ConfigParser, ConfigWorkflow
from medsegdiff_monai.inferers import DiffusionSampler

overrides = json.load(open("args.json"))
net_override = {k.split("#", 1)[1]: v for k, v in overrides.items() if k.startswith("network_def#")}
network = monai.bundle.load(
    name="bundle", bundle_dir=".", workflow_type="inference", model_file="models/model.pt",
    net_override=net_override, device="cpu",
)
parser = ConfigParser()
parser.read_config("bundle/configs/inference.json")
parser.update(overrides)
sampler = parser.get_parsed_content("inferer")
out = sampler(network.eval(), torch.randn(2, 4, 64, 64))
own = DiffusionSampler(num_inference_steps=1, ensemble_size=1)(network, torch.randn(1, 4, 64, 64))
missing = {}
for config, files in (("inference", ["inference.json"]), ("evaluate", ["train.json", "evaluate.json"])):
    paths = [f"bundle/configs/{name}" for name in files]
    workflow = ConfigWorkflow(config_file=paths, workflow_type="inference", **overrides)
    workflow.initialize()
    missing[config] = workflow.check_properties()
monai.bundle.run(
    config_file=["bundle/configs/train.json", "bundle/configs/evaluate.json"], meta_file="bundle/configs/metadata.json",
    logging_file="bundle/configs/logging.conf", args_file="args.json", num_eval_cases=1, include_hd95=True,
)
print("RESULT" + json.dumps({
    "network": type(network).__name__, "probs": list(out.probs.shape), "p_hgg": list(out.p_hgg.shape),
    "steps": sampler.num_inference_steps, "own_probs": list(own.probs.shape), "missing": missing,
}))
"""


def test_bundle_loads_in_a_fresh_python_and_evaluates(bundle_copy):
    result = _run(["-c", FRESH_PYTHON], cwd=bundle_copy)
    report = json.loads(result.stdout.split("RESULT", 1)[1])
    assert report["network"] == "DiffusionUNetWithGradeHead"
    assert report["probs"] == [2, 3, 64, 64] and report["p_hgg"] == [2] and report["steps"] == 2
    assert report["own_probs"] == [1, 3, 64, 64]
    assert report["missing"] == {"inference": [], "evaluate": []}
    summary = json.loads((bundle_copy / "bundle" / "runs" / "evaluate" / "summary.json").read_text())
    assert summary["num_subjects"] == 1
    assert set(summary["dice_WT"]) == {"mean", "std", "ci95"} and "hd95_ET" in summary and "lesion_dice_ET" in summary
    assert {"auc", "f1", "accuracy", "ece", "confusion_matrix"} <= set(summary["grade"])
    assert "dice_WT" in result.stdout  # the printed table


def test_gpu_inference_overlay_overrides_only_existing_keys():
    """inference_gpu.json changes keys that inference.json has and builds the fast compiled sampler."""
    from monai.bundle import ConfigParser

    configs = Path(__file__).resolve().parents[1] / "bundle" / "configs"
    base = ConfigParser()
    base.read_config(str(configs / "inference.json"))
    overlay = ConfigParser.load_config_file(str(configs / "inference_gpu.json"))
    assert all(key in base for key in overlay), (
        f"inference_gpu.json keys not in inference.json: {set(overlay) - set(base.config)}"
    )
    merged = ConfigParser()
    merged.read_config([str(configs / "inference.json"), str(configs / "inference_gpu.json")])
    sampler = merged.get_parsed_content("inferer")
    assert sampler.scheduler_name == "dpmpp_2m" and sampler.compile is True
    assert sampler.num_inference_steps == overlay["num_inference_steps"]


@pytest.mark.parametrize(("free_gib", "slices"), [(79.19, 68), (24, 23)])
def test_gpu_inference_overlay_sizes_slice_batches_by_the_card(monkeypatch, free_gib, slices):
    """inference_gpu.json samples as many slices per call as 60 % of the card's free memory holds (68 on an idle 80 GB
    card), and ``--slice_batch_size`` still wins."""
    from monai.bundle import ConfigParser

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (int(free_gib * 2**30), 80 * 2**30))
    configs = Path(__file__).resolve().parents[1] / "bundle" / "configs"
    merged = ConfigParser()
    merged.read_config([str(configs / "inference.json"), str(configs / "inference_gpu.json")])
    merged["device"] = "$torch.device('cuda:0')"
    assert merged.get_parsed_content("slice_batch_size") == slices
    merged["slice_batch_size"] = 16
    assert merged.get_parsed_content("volume_inferer#slice_batch_size", lazy=False) == 16


def _inference_config_files(config: str) -> list[str]:
    """The config files a run of ``config`` merges: ``evaluate.json`` sits on top of ``train.json``."""
    names = ["train.json", "evaluate.json"] if config == "evaluate.json" else [config]
    return [str(BUNDLE / "configs" / name) for name in names]


def _compile_break_evens(name: str, shared_steps: int) -> list[float]:
    """Per slice batch of a ``bench_gpu.py --sections volume`` results file: the volumes after which compiling pays,
    the compiled warm-up's extra seconds over the eager one divided by the seconds each compiled volume saves."""
    rows = json.loads((BUNDLE.parent / "benchmarks" / "results" / name).read_text())["rows"]
    timed = {(r["variant"], r["slice_batch"]): r for r in rows if r["shared_steps"] == shared_steps}
    break_evens = []
    for variant, slice_batch in timed:
        if variant == "bf16+cl+compile":
            compiled, eager = timed[variant, slice_batch], timed["bf16+cl", slice_batch]
            break_evens.append((compiled["warmup_s"] - eager["warmup_s"]) / (eager["seconds"] - compiled["seconds"]))
    assert break_evens, name
    return break_evens


@pytest.mark.parametrize("config", ["inference.json", "evaluate.json"])
def test_compile_only_runs_that_pay_for_it(config):
    """A run shorter than ``compile_min_volumes`` stays eager, and that threshold lies past every break-even measured
    on an H100 from an empty compilation cache (slice batches 68 and 16): without shared passes, and with them, where
    the compiled sampler holds a second shape and its compilation costs more. An explicit ``compile_min_volumes``
    still wins."""
    from monai.bundle import ConfigParser

    unshared = _compile_break_evens("gpu_volume_compile_eager_h100.json", 0)
    shared = [
        *_compile_break_evens("gpu_volume_compile_eager_shared_h100.json", 4),
        *_compile_break_evens("gpu_volume_compile_eager_shared_sb16_h100.json", 4),
    ]
    assert len(unshared) == len(shared) == 2

    def parsed(**overrides) -> ConfigParser:
        parser = ConfigParser()
        parser.read_config(_inference_config_files(config))
        parser.update(overrides)
        return parser

    assert parsed().get_parsed_content("compile_min_volumes") > max(unshared) > 1, unshared
    assert parsed(shared_steps=4).get_parsed_content("compile_min_volumes") > max(shared) > max(unshared), shared
    assert parsed().config["volume_inferer"]["compile_min_volumes"] == "@compile_min_volumes"
    assert parsed(shared_steps=4, compile_min_volumes=5).get_parsed_content("compile_min_volumes") == 5


@pytest.mark.parametrize("config", ["inference.json", "evaluate.json"])
def test_cpu_settings_of_the_inference_configs(config):
    """On a CPU the network is channels-last like on a GPU, one call samples 4 x 64 x 64 in-plane pixels (one slice at
    roi 192), and bf16 autocast is off unless ``--cpu_amp true``."""
    from monai.bundle import ConfigParser

    files = _inference_config_files(config)
    for cpu_amp, roi_size, slices in ((None, [64, 64], 4), ("true", [192, 192], 1)):
        parser = ConfigParser()
        parser.read_config(files)
        parser.update({"bundle_root": str(BUNDLE), "device": "$torch.device('cpu')", "roi_size": roi_size})
        if cpu_amp is not None:
            parser["cpu_amp"] = cpu_amp
        sampler = parser.get_parsed_content("sampler")
        assert sampler.cpu_amp is (cpu_amp is not None) and sampler.amp_dtype == torch.bfloat16
        assert parser.get_parsed_content("slice_batch_size") == slices
        network = parser.get_parsed_content("network")
        weight = next(p for p in network.parameters() if p.ndim == 4 and p.shape[-1] > 1)
        assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def test_inference_without_a_datalist_names_both_ways_out(tmp_path):
    """A data folder without ``datalist.json``: the error gives the command that writes one and the ``--input`` that
    segments the folder as it is; with ``--input`` the datalist is never looked for."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(_inference_config_files("inference.json"))
    parser.update({"bundle_root": str(BUNDLE), "dataset_dir": str(tmp_path)})
    with pytest.raises(RuntimeError) as raised:
        parser.get_parsed_content("input")
    cause = raised.value.__cause__
    assert isinstance(cause, FileNotFoundError), raised.value
    assert f"medsegdiff-monai datalist --data-dir {tmp_path} --out {tmp_path / 'datalist.json'}" in str(cause)
    assert str(cause).endswith(f"or segment every subject of the folder with --input {tmp_path}.")
    parser["input"] = str(tmp_path)
    assert parser.get_parsed_content("input") == str(tmp_path)


def test_evaluation_takes_its_subjects_from_input(tmp_path, synthetic_brats_dir):
    """``evaluate.json --input <BraTS folder>`` evaluates that folder's subjects (the datalist of ``dataset_dir`` is
    never looked for), as ``inference.json --input`` does."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(_inference_config_files("evaluate.json"))
    parser.update({"bundle_root": str(BUNDLE), "dataset_dir": str(tmp_path), "input": str(synthetic_brats_dir)})
    entries = parser.get_parsed_content("validate#dataset").data
    subjects = sorted(p.name for p in synthetic_brats_dir.iterdir() if p.is_dir())
    assert [entry["subject_id"] for entry in entries] == subjects
    assert all(entry["label"].startswith(str(synthetic_brats_dir)) for entry in entries)


@pytest.mark.parametrize("value, expected", [("null", None), ("None", None), ("BraTS-GLI", "BraTS-GLI")])
def test_lesion_wise_scores_are_left_out_with_null_on_the_command_line(
    monkeypatch, synthetic_datalist, value, expected
):
    """``--lesion_challenge null`` reaches the evaluation as None (a Python ``None`` on the command line is dropped by
    MONAI, so the spelling the refusal names must work)."""
    from monai.bundle import ConfigParser

    import medsegdiff_monai.workflows

    calls = []
    monkeypatch.setattr(medsegdiff_monai.workflows, "run_evaluation", lambda *args, **kwargs: calls.append(kwargs))
    monkeypatch.setattr(medsegdiff_monai.workflows, "evaluation_provenance", lambda *args: {})
    parser = ConfigParser()
    parser.read_config(_inference_config_files("evaluate.json"))
    parser.update({"bundle_root": str(BUNDLE), "dataset_dir": str(synthetic_datalist.parent)})
    parser.update({"lesion_challenge": value, "volume_inferer": None})
    parser["validate#dataset"] = {"_target_": "Dataset", "data": []}
    step = next(i for i, expression in enumerate(parser["run"]) if "run_evaluation(" in expression)
    parser.get_parsed_content(f"run#{step}")
    assert calls[0]["lesion_challenge"] == expected
