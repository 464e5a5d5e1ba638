"""The bundle against the MONAI Model Zoo's rules: JSON format, ``bundle_root``, workflow properties, metadata,
``large_files.yml``, exported networks, and the configs run from inside the bundle folder."""

from __future__ import annotations

import configparser
import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from monai.apps.utils import HashCheckError
from monai.bundle import ConfigParser, ConfigWorkflow, download_large_files, verify_metadata

import medsegdiff_monai
from medsegdiff_monai.networks import FusedGroupNorm, get_network, load_network_weights
from medsegdiff_monai.workflows import check_large_files, load_exported_network, refresh_large_files

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
CONFIGS = BUNDLE / "configs"
SCHEMA = CONFIGS / "schema" / "metadata_schema.json"
CHECKPOINT = BUNDLE / "models" / "model.pt"


def test_every_json_file_is_in_the_zoo_format():
    """The zoo's ``pretty-format-json --indent=4 --no-sort-keys`` hook leaves every file unchanged."""
    files = sorted(BUNDLE.rglob("*.json"))
    assert {"train.json", "inference.json", "evaluate.json", "metadata.json"} <= {f.name for f in files}
    for path in files:
        text = path.read_text()
        assert text == json.dumps(json.loads(text), indent=4, ensure_ascii=True) + "\n", path


def test_paths_are_relative_to_bundle_root_dot():
    for name in ("train.json", "inference.json"):
        config = json.loads((CONFIGS / name).read_text())
        assert config["bundle_root"] == ".", name
    for name in ("evaluate.json", "train_gpu.json", "multi_gpu_train.json"):  # overlays keep the base's root
        assert "bundle_root" not in json.loads((CONFIGS / name).read_text()), name
    for path in CONFIGS.glob("*.json"):
        assert "bundle/" not in path.read_text(), f"{path.name} names a repository path"
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    checkpoint = parser.get_parsed_content("checkpoint")
    assert not Path(checkpoint).is_absolute() and (BUNDLE / checkpoint).resolve() == CHECKPOINT.resolve()
    # the default data set is the repository's data/synthetic_brats, seen from the bundle folder
    assert (BUNDLE / parser.get_parsed_content("dataset_dir")).resolve() == (REPO / "data" / "synthetic_brats")


@pytest.mark.parametrize(
    "workflow_type, configs",
    [
        ("train", ["train.json"]),
        ("infer", ["inference.json"]),
        ("eval", ["train.json", "evaluate.json"]),
        ("train", ["train.json", "evaluate.json"]),  # as the model zoo's unit tests read the evaluation overlay
    ],
)
def test_workflow_properties_are_complete(tmp_path, synthetic_datalist, workflow_type, configs):
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / name) for name in configs],
        meta_file=str(CONFIGS / "metadata.json"),
        workflow_type=workflow_type,
        bundle_root=str(tmp_path),
        dataset_dir=str(synthetic_datalist.parent),
        checkpoint=str(CHECKPOINT),
        roi_size=[32, 32],
        device="cpu",
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    parser = workflow.parser
    if configs == ["train.json"]:  # MONAI stores "#" as "::"
        assert parser["train#trainer#inferer"].replace("::", "#") == "@train#inferer"
        assert parser["validate#evaluator#sampler"].replace("::", "#") == "@validate#inferer"
        assert parser["validate#evaluator#val_handlers"].replace("::", "#") == "@validate#handlers"


def test_evaluation_overlay_overrides_only_what_evaluation_changes():
    """``evaluate.json`` is read on top of ``train.json``: it replaces the ``validate`` section's objects and adds
    the evaluation keys, and names no training key it would silently shadow with a different meaning."""
    base = ConfigParser()
    base.read_config(str(CONFIGS / "train.json"))
    overlay = json.loads((CONFIGS / "evaluate.json").read_text())
    replaced = {key for key in overlay if key in base}
    assert {"validate#dataset", "validate#inferer", "validate#evaluator", "validate#preprocessing"} <= replaced
    assert replaced - {key for key in overlay if key.startswith("validate#")} == {
        "train#handlers",  # none: the evaluation trains nothing, and the epoch validation needs an Evaluator
        "output_dir",
        "grade_head_enabled",
        "channels_last",
        "network",
        "initialize",
        "run",
        "finalize",
    }


def _read_metadata(path: Path) -> dict:
    """The metadata as MONAI's config reader resolves it (it renames deprecated keys)."""
    parser = ConfigParser()
    parser.read_meta(str(path))
    return parser.get_parsed_content("_meta_")


def test_metadata_is_clean(tmp_path):
    meta_file = CONFIGS / "metadata.json"
    verify_metadata(meta_file=str(meta_file), filepath=str(SCHEMA))
    metadata = json.loads(meta_file.read_text())
    resolved = _read_metadata(meta_file)
    assert resolved["required_packages_version"] == metadata["required_packages_version"]
    # an empty optional_packages_version would replace the required packages when MONAI reads the file
    with_optional = {**metadata, "optional_packages_version": {}}
    (tmp_path / "metadata.json").write_text(json.dumps(with_optional))
    assert _read_metadata(tmp_path / "metadata.json")["required_packages_version"] == {}
    assert "optional_packages_version" not in metadata

    assert metadata["version"] in metadata["changelog"]
    for version, entry in metadata["changelog"].items():
        assert "\n" not in entry and len(entry) <= 120, version
    versions = [tuple(int(p) for p in v.split(".")) for v in metadata["changelog"]]
    assert versions == sorted(versions, reverse=True)

    package_version = medsegdiff_monai.__version__
    assert metadata["required_packages_version"]["medsegdiff_monai"] == package_version
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    assert setup["metadata"]["version"] == "attr: medsegdiff_monai.__version__"

    figures = metadata["eval_metrics"]
    assert figures and all(isinstance(v, float) and math.isfinite(v) for v in figures.values())
    assert any(v > 0 for v in figures.values()) and all(k.startswith("synthetic_") for k in figures)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_large_files_list_every_weight_file_with_its_hash(tmp_path):
    spec = yaml.safe_load((BUNDLE / "large_files.yml").read_text())["large_files"]
    shipped = {str(p.relative_to(BUNDLE)) for p in (BUNDLE / "models").iterdir() if p.is_file()}
    assert {entry["path"] for entry in spec} == shipped
    for entry in spec:
        assert set(entry) == {"path", "url", "hash_val", "hash_type"} and entry["hash_type"] == "md5"
        assert _md5(BUNDLE / entry["path"]) == entry["hash_val"], entry["path"]
    download_large_files(bundle_path=str(BUNDLE))  # MONAI checks the present files and downloads nothing
    copy = tmp_path / "bundle"
    shutil.copytree(BUNDLE / "models", copy / "models")
    shutil.copy(BUNDLE / "large_files.yml", copy)
    with open(copy / "models" / "model.pt", "r+b") as handle:
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(HashCheckError, match="model.pt"):
        download_large_files(bundle_path=str(copy))


def test_export_refreshes_the_hashes_that_a_replaced_model_left_stale(tmp_path):
    """Weights replaced in place (as ``--update_bundle_model true`` does) are warned of at inference as differing
    from ``large_files.yml``; the bundle's export then writes their programs and refreshes every hash."""
    copy = tmp_path / "bundle"
    shutil.copytree(CONFIGS, copy / "configs")
    shutil.copytree(BUNDLE / "models", copy / "models")
    shutil.copy(BUNDLE / "large_files.yml", copy)
    state = torch.load(CHECKPOINT, weights_only=True)
    name = next(key for key, value in state.items() if value.is_floating_point())
    state[name] = state[name] + 0.5
    torch.save(state, copy / "models" / "model.pt")
    (message,) = check_large_files(copy, [copy / "models" / "model.pt", BUNDLE / "models" / "model.pt"])
    assert re.search(r"model\.pt differs from the md5 hash .*export with --overwrite true", message)
    with pytest.raises(HashCheckError, match="model.pt"):
        download_large_files(bundle_path=str(copy))

    command = ["-m", "monai.bundle", "run", "export", "--config_file", "configs/inference.json", "--overwrite", "true"]
    result = subprocess.run([sys.executable, *command], cwd=copy, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    spec = yaml.safe_load((copy / "large_files.yml").read_text())["large_files"]
    assert {entry["path"]: entry["hash_val"] for entry in spec} == {
        path: _md5(copy / path)
        for path in ("models/model.pt", "models/model_condition.pt2", "models/model_denoise.pt2")
    }
    assert all(set(entry) == {"path", "url", "hash_val", "hash_type"} for entry in spec)
    download_large_files(bundle_path=str(copy))  # MONAI's own check passes
    assert check_large_files(copy, [copy / "models" / "model.pt"]) == []
    exported = load_exported_network(copy / "models")
    image = torch.randn(1, 4, 64, 64)
    network = load_network_weights(get_network("small"), copy / "models" / "model.pt").eval()
    with torch.no_grad():
        torch.testing.assert_close(exported.encode_condition(image)[1], network.encode_condition(image)[1])


def test_only_the_files_the_list_names_are_refreshed(tmp_path, caplog):
    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    (bundle / "runs").mkdir()
    (bundle / "large_files.yml").write_text('large_files:\n- path: "./models/model.pt"\n  url: ""\n')
    (bundle / "models" / "model.pt").write_bytes(b"weights")
    (bundle / "runs" / "model.pt").write_bytes(b"a training run's")
    (tmp_path / "outside.pt").write_bytes(b"elsewhere")
    paths = [bundle / "models" / "model.pt", bundle / "runs" / "model.pt", tmp_path / "outside.pt"]
    assert refresh_large_files(bundle, paths) == ["models/model.pt"]
    spec = yaml.safe_load((bundle / "large_files.yml").read_text())["large_files"]
    assert spec == [
        {"path": "./models/model.pt", "url": "", "hash_val": hashlib.md5(b"weights").hexdigest(), "hash_type": "md5"}
    ]
    assert refresh_large_files(bundle, [bundle / "models" / "model.pt"]) == []  # unchanged: not rewritten
    # programs made from weights the list does not name would stand beside the listed model.pt: not certified
    (bundle / "models" / "model.pt").write_bytes(b"weights of another run")
    assert refresh_large_files(bundle, paths, source=bundle / "runs" / "model.pt") == []
    assert yaml.safe_load((bundle / "large_files.yml").read_text())["large_files"] == spec
    # programs written outside the bundle touch nothing the list names: nothing refreshed, nothing to warn of (the
    # listed model.pt alone would be certified beside programs of other weights)
    caplog.clear()
    (tmp_path / "program.pt2").write_bytes(b"program")
    assert refresh_large_files(bundle, [tmp_path / "program.pt2"], source=tmp_path / "outside.pt") == []
    assert refresh_large_files(bundle, paths, source=bundle / "models" / "model.pt") == []
    assert not caplog.records
    assert refresh_large_files(tmp_path, [tmp_path / "outside.pt"]) == []  # no large_files.yml there
    (bundle / "large_files.yml").write_text("large_files: models/model.pt\n")
    with pytest.raises(ValueError, match="is not a MONAI large-files list"):
        check_large_files(bundle, [bundle / "models" / "model.pt"])


def test_group_norm_scripts_to_its_plain_path():
    """TorchScript keeps FusedGroupNorm's ``F.group_norm`` (+ SiLU) path, the kernel path being Python only."""
    torch.manual_seed(0)
    norm = FusedGroupNorm(4, 8, silu=True)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    scripted = torch.jit.script(norm)
    x, offset = torch.randn(2, 8, 5, 6), torch.randn(2, 8)
    expected = F.silu(F.group_norm(x + offset[:, :, None, None], 4, norm.weight, norm.bias, norm.eps))
    torch.testing.assert_close(scripted(x, offset), expected)
    torch.testing.assert_close(scripted(x), F.silu(F.group_norm(x, 4, norm.weight, norm.bias, norm.eps)))


def test_shipped_exported_programs_match_the_shipped_weights():
    """``models/model_*.pt2`` (the export of ``models/model.pt``, loaded with torch alone) give its outputs."""
    config = json.loads((CONFIGS / "inference.json").read_text())
    network = load_network_weights(get_network(config["preset"]), CHECKPOINT).eval()
    exported = load_exported_network(BUNDLE / "models")
    torch.manual_seed(0)
    image = torch.randn(2, 4, *config["roi_size"])
    x_t = torch.randn(2, 3, *config["roi_size"])
    t = torch.tensor([10, 700])
    with torch.no_grad():
        for got, want in zip(exported(x_t, t, image), network(x_t, t, image), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.fixture
def bundle_beside_data(tmp_path, synthetic_brats_dir, synthetic_datalist) -> Path:
    """``<tmp>/bundle`` (configs and shipped weights) beside ``<tmp>/data/synthetic_brats``, as in the repository."""
    shutil.copytree(CONFIGS, tmp_path / "bundle" / "configs")
    (tmp_path / "bundle" / "models").mkdir()
    shutil.copy(CHECKPOINT, tmp_path / "bundle" / "models")
    shutil.copytree(synthetic_brats_dir, tmp_path / "data" / "synthetic_brats")
    return tmp_path


FAST = ["--num_inference_steps", "1", "--ensemble_size", "1", "--device", "cpu"]


def _bundle_run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "monai.bundle", "run", *args, *FAST]  # args: run id, then options
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_inference_config_runs_from_inside_the_bundle_folder(bundle_beside_data, synthetic_datalist):
    command = ["run", "--config_file", "configs/inference.json", "--num_cases", "1", "--write_overlays", "false"]
    result = _bundle_run(bundle_beside_data / "bundle", *command)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    subject = json.loads(synthetic_datalist.read_text())["validation"][0]["subject_id"]
    out = bundle_beside_data / "bundle" / "runs" / "inference"
    assert (out / f"{subject}_seg.nii.gz").is_file() and (out / "grades.csv").is_file()


@pytest.mark.parametrize(
    "workflow_type, looked_for, key",
    [
        ("infer", "../data/synthetic_brats/datalist.json", "dataset_dir"),
        ("train", "../data/synthetic_brats/datalist.json", "dataset_dir"),
    ],
)
def test_a_run_from_the_wrong_folder_names_the_path_and_the_key(
    bundle_beside_data, monkeypatch, workflow_type, looked_for, key
):
    monkeypatch.chdir(bundle_beside_data)  # the bundle's parent folder, without --bundle_root
    config = {"infer": "inference.json", "train": "train.json"}[workflow_type]
    workflow = ConfigWorkflow(config_file=f"bundle/configs/{config}", workflow_type=workflow_type, device="cpu")
    with pytest.raises(RuntimeError) as raised:
        workflow.initialize()
        workflow.run()
    cause = raised.value
    while not isinstance(cause, FileNotFoundError) and cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, FileNotFoundError)
    assert str(cause).startswith(f"{(bundle_beside_data / looked_for).resolve()} does not exist")
    assert "--bundle_root" in str(cause) and f"--{key}" in str(cause)
    assert not (bundle_beside_data / "runs").exists()


def test_evaluation_overlay_runs_from_the_command_line_and_refuses_to_overwrite(bundle_beside_data):
    """``monai.bundle run`` of ``evaluate.json`` over ``train.json`` in a fresh process (only the configs' own imports
    are loaded), then a second run into the same folder: refused without ``--overwrite true``."""
    configs = "['configs/train.json','configs/evaluate.json']"
    command = ["run", "--config_file", configs, "--num_eval_cases", "1"]
    first = _bundle_run(bundle_beside_data / "bundle", *command)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = bundle_beside_data / "bundle" / "runs" / "evaluate"
    summary = out / "summary.json"
    assert summary.is_file() and (out / "metrics_per_subject.csv").is_file()
    provenance = json.loads(summary.read_text())["provenance"]
    # the demo datalist has no testing list: its validation subjects are scored, which is said and recorded
    assert provenance["datalist_key"] == "validation" and provenance["in_sample"] is True
    assert "figures are in-sample" in first.stdout + first.stderr
    assert provenance["checkpoint"].endswith("model.pt") and provenance["grade_calibration"]["scale"] > 0
    written = summary.read_bytes()
    second = _bundle_run(bundle_beside_data / "bundle", *command)
    assert second.returncode == 1 and "already holds outputs" in second.stderr
    assert summary.read_bytes() == written
