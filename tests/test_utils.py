import json
import os
import subprocess
import sys
from pathlib import Path

import monai.bundle
import pytest
import torch

from medsegdiff_monai.inferers import DiffusionSampler
from medsegdiff_monai.utils import (
    as_bool,
    check_device,
    check_setting_names,
    parse_amp_dtype,
    require_file,
    use_cudnn_benchmark,
)


@pytest.mark.parametrize(
    "value, expected", [("false", False), ("True", True), (" no ", False), ("1", True), (0, False)]
)
def test_as_bool_reads_command_line_switches(value, expected):
    assert as_bool(value) is expected


def test_as_bool_rejects_garbage_naming_the_key():
    with pytest.raises(ValueError, match="use_grade_head='maybe'"):
        as_bool("maybe", "use_grade_head")


def test_require_file_names_the_file_the_key_and_what_to_do(tmp_path):
    """An existing file comes back as given; a missing one is named absolutely, with the key to set, how its default
    depends on bundle_root, and the config's hint last."""
    present = tmp_path / "datalist.json"
    present.write_text("{}")
    assert require_file(present, "dataset_dir") == os.fspath(present)
    relative = os.path.relpath(tmp_path / "absent.json")
    with pytest.raises(FileNotFoundError) as raised:
        require_file(relative, "dataset_dir", "Write it with `make-it`.")
    message = str(raised.value)
    assert message.startswith(f"{tmp_path / 'absent.json'} does not exist ('dataset_dir' resolves to {relative!r}).")
    assert "Set --dataset_dir;" in message and "--bundle_root bundle" in message
    assert message.endswith("Write it with `make-it`.")


@pytest.fixture
def cudnn_flags():
    """Restores cuDNN's global flags after the test."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


@pytest.mark.parametrize("value, benchmark", [("true", True), (True, True), ("false", False), (0, False)])
def test_use_cudnn_benchmark_after_monai_set_determinism(cudnn_flags, value, benchmark):
    """MONAI's set_determinism selects deterministic cuDNN without benchmarking; switching benchmarking on lifts
    both, switching it off keeps set_determinism's flags."""
    from monai.utils import set_determinism

    set_determinism(seed=0)
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert use_cudnn_benchmark(value) is benchmark
    assert torch.backends.cudnn.benchmark is benchmark
    assert torch.backends.cudnn.deterministic is not benchmark


def test_use_cudnn_benchmark_rejects_garbage_naming_the_key(cudnn_flags):
    with pytest.raises(ValueError, match="cudnn_benchmark='fast'"):
        use_cudnn_benchmark("fast")


@pytest.mark.parametrize(
    "value, expected",
    [("bf16", torch.bfloat16), ("BFloat16", torch.bfloat16), ("fp16", torch.float16), ("none", None), (None, None),
     ("float32", None), (torch.bfloat16, torch.bfloat16)],
)  # fmt: skip
def test_parse_amp_dtype(value, expected):
    assert parse_amp_dtype(value) == expected


def test_bad_amp_dtype_is_rejected_by_the_sampler():
    with pytest.raises(ValueError, match="amp_dtype='int8'"):
        DiffusionSampler(num_inference_steps=2, ensemble_size=1, amp_dtype="int8")


def test_cpu_amp_needs_bfloat16():
    with pytest.raises(ValueError, match="cpu_amp=True needs amp_dtype='bfloat16', got amp_dtype=None"):
        DiffusionSampler(num_inference_steps=2, ensemble_size=1, cpu_amp=True)
    with pytest.raises(ValueError, match="amp_dtype='fp16'"):
        DiffusionSampler(num_inference_steps=2, ensemble_size=1, amp_dtype="fp16", cpu_amp=True)


def test_cpu_amp_sampler_equals_the_float32_sampler_under_torch_autocast():
    """cpu_amp runs the network passes under torch's own CPU autocast, and only them: the same result as the float32
    sampler called inside ``torch.autocast("cpu", torch.bfloat16)``, and not the float32 result."""
    from medsegdiff_monai.networks import get_network

    torch.manual_seed(0)
    network = get_network("small").eval()
    image = torch.randn(2, 4, 32, 32)
    kwargs = {"num_inference_steps": 2, "ensemble_size": 2, "seed": 3}
    mixed = DiffusionSampler(**kwargs, amp_dtype="bf16", cpu_amp=True)(network, image)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = DiffusionSampler(**kwargs)(network, image)
    full = DiffusionSampler(**kwargs)(network, image)
    assert mixed.probs.dtype == torch.float32
    assert torch.equal(mixed.probs, reference.probs) and torch.equal(mixed.p_hgg, reference.p_hgg)
    assert not torch.equal(mixed.probs, full.probs)
    assert torch.allclose(mixed.probs, full.probs, atol=0.05)


def test_bf16_sampler_on_cpu_equals_fp32():
    from medsegdiff_monai.networks import get_network

    torch.manual_seed(0)
    network = get_network("small").eval()
    image = torch.randn(2, 4, 32, 32)
    full = DiffusionSampler(num_inference_steps=2, ensemble_size=2, seed=3)(network, image)
    mixed = DiffusionSampler(num_inference_steps=2, ensemble_size=2, seed=3, amp_dtype="bf16")(network, image)
    assert torch.equal(full.probs, mixed.probs)


def test_check_device_names_a_device_this_machine_lacks():
    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device 'gpu' is not a device name: pass e.g. --device cpu"):
        check_device("gpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=f"device cuda:{count} is not available"):
        check_device(f"cuda:{count}")
    if count == 0:
        with pytest.raises(ValueError, match=r"sees no CUDA GPU \(torch.cuda.is_available\(\) is False\). Pass --dev"):
            check_device("cuda")
    else:
        assert check_device("cuda") == torch.device("cuda")


def test_the_bundle_checks_the_device_before_building_anything():
    from monai.bundle import ConfigParser

    configs = os.path.join(os.path.dirname(__file__), os.pardir, "bundle", "configs")
    for files in (["train.json"], ["inference.json"], ["train.json", "evaluate.json"]):
        parser = ConfigParser()
        parser.read_config([os.path.join(configs, name) for name in files])
        parser["device"] = "gpu"
        # after the error report and the check of the setting names, which build nothing
        assert parser["initialize"][2] == "$medsegdiff_monai.utils.check_device(@device)"
        with pytest.raises(RuntimeError) as raised:  # MONAI wraps the config's error
            parser.get_parsed_content("initialize#2", lazy=False)
        cause = raised.value.__cause__
        assert isinstance(cause, ValueError) and "device 'gpu' is not a device name" in str(cause)


CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"
BUNDLE_MAIN = str(Path(monai.bundle.__file__).with_name("__main__.py"))


def _bundle_argv(*options: str) -> list[str]:
    return [BUNDLE_MAIN, "run", "training", "--meta_file", str(CONFIGS / "metadata.json"), *options]


def test_check_setting_names_refuses_a_key_no_config_file_has(tmp_path):
    train, evaluate = str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")
    keys = check_setting_names(_bundle_argv("--config_file", train, "--lr", "-0.001", "--train#trainer#max_epochs=2"))
    assert keys == ["lr", "train#trainer#max_epochs"]  # not meta_file, an argument of monai.bundle run itself
    # a key of evaluate.json is a setting once that file is read too, written as fire reads a list
    both = f"[{train!r},{evaluate!r}]"
    assert "num_eval_cases" in check_setting_names(_bundle_argv("--config_file", both, "--num_eval_cases", "1"))
    with pytest.raises(ValueError, match=r"--num_eval_cases: not a setting of .*train\.json"):
        check_setting_names(_bundle_argv("--config_file", train, "--num_eval_cases", "1"))
    with pytest.raises(ValueError, match=r"^--learning_rate, --preset_name \(did you mean --preset\?\): not a"):
        check_setting_names(_bundle_argv("--config_file", train, "--learning_rate", "1", "--preset-name", "small"))
    # the pairs of an args file are overrides too
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"config_file": train, "epochs": 3, "val_intervall": 2}))
    with pytest.raises(ValueError, match=r"--val_intervall \(did you mean --val_interval\?\)"):
        check_setting_names(_bundle_argv("--args_file", str(args_file)))
    # MONAI's experiment tracking brings settings of its own
    tracked = check_setting_names(
        _bundle_argv("--config_file", train, "--tracking", "mlflow", "--experiment_name", "a")
    )
    assert tracked == ["experiment_name"]
    with pytest.raises(ValueError, match="--experiment_name"):
        check_setting_names(_bundle_argv("--config_file", train, "--experiment_name", "a"))
    # settings given inline, as MONAI takes them, in Python or JSON spelling
    for settings in ("{'handlers_id': {}, 'configs': {'run_name': 'x'}}", '{"configs": {"run_name": "x", "a": false}}'):
        tracked = check_setting_names(_bundle_argv("--config_file", train, "--tracking", settings, "--run_name", "y"))
        assert tracked == ["run_name"]
    # outside a monai.bundle command line (the library, a test, a notebook) nothing is checked
    assert check_setting_names(["pytest", "--config_file", train, "--anything", "1"]) == []


def test_a_misspelled_setting_ends_a_bundle_run_before_any_work():
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIGS / "inference.json")]
    command += ["--meta_file", str(CONFIGS / "metadata.json"), "--num_inference_step", "25", "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "error: --num_inference_step (did you mean --num_inference_steps?): not a setting of" in result.stderr
    assert "Traceback" not in result.stderr
