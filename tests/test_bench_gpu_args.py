"""``benchmarks/bench_gpu.py`` reads whole-volume sampler specs with their ``eta`` and refuses malformed ones; its
whole-volume network follows the ``nofuse`` flag; each sampler runs with each shared-step count below its steps; its
compile flags are torch.compile's modes."""

from __future__ import annotations

import argparse

import pytest
import torch
from benchmark_scripts import load_benchmark

from medsegdiff_monai.networks import FusedGroupNorm


@pytest.fixture(scope="module")
def bench_gpu():
    return load_benchmark("bench_gpu")


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("ddim:10", ("ddim", 10, 0.0)),
        ("dpmpp_2m:20:1", ("dpmpp_2m", 20, 1.0)),
        ("dpmpp_2m:8:0.5", ("dpmpp_2m", 8, 0.5)),
    ],
)
def test_sampler_specs(bench_gpu, spec, expected):
    assert bench_gpu.parse_sampler(spec) == expected


@pytest.mark.parametrize("spec", ["ddim", "dpmpp_2m:8:1:0", "ddim:ten"])
def test_malformed_sampler_specs_stop_the_run(bench_gpu, spec, capsys):
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(["--volume-samplers", "ddim:10", spec])
    assert "--volume-samplers" in capsys.readouterr().err


@pytest.mark.parametrize("variant, fused", [("fp32", True), ("fp32+nofuse", False)])
def test_volume_network_follows_the_nofuse_flag(bench_gpu, variant, fused):
    args = bench_gpu.parse_args(["--device", "cpu", "--preset", "small", "--out", "unused"])
    bench = argparse.Namespace(args=args, device=torch.device("cpu"))
    network, _ = bench_gpu._sampling_network(bench, bench_gpu.parse_variant(variant), 1, 32)
    norms = [m for m in network.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(isinstance(m, FusedGroupNorm) == fused for m in norms)


def test_volume_runs_each_sampler_with_each_shared_step_count(bench_gpu, monkeypatch, tmp_path):
    calls = []

    def seconds(bench, network, image, flags, slice_batch, name, steps, eta=0.0, shared_steps=0):
        calls.append((name, steps, eta, shared_steps))
        return 1.0

    monkeypatch.setattr(bench_gpu, "volume_seconds", seconds)
    args = bench_gpu.parse_args(
        ["--device", "cpu", "--preset", "small", "--volume-variants", "fp32", "--volume-roi", "64"]
        + ["--volume-shape", "64", "64", "24", "--volume-samplers", "ddim:2", "dpmpp_2m:3:1"]
        + ["--volume-shared-steps", "0", "2", "--out", str(tmp_path)]
    )
    bench = bench_gpu.Bench(args)
    bench_gpu.volume(bench)
    # warm-up (with the shared passes' shape), one step, then every sampler below its step count
    assert calls == [
        ("ddim", 1, 0.0, 0),
        ("ddim", 2, 0.0, 1),
        ("ddim", 1, 0.0, 0),
        ("ddim", 2, 0.0, 0),
        ("dpmpp_2m", 3, 1.0, 0),
        ("dpmpp_2m", 3, 1.0, 2),
    ]
    assert [(row["scheduler"], row["shared_steps"]) for row in bench.rows] == [
        ("ddim", 0),
        ("dpmpp_2m", 0),
        ("dpmpp_2m", 2),
    ]


@pytest.mark.parametrize(
    "variant, mode",
    [("bf16+cl+graphs", "reduce-overhead"), ("bf16+cl+graphs+autotune", "max-autotune"), ("bf16+cl", "default")],
)
def test_compile_flags_set_what_torch_compile_modes_set(bench_gpu, variant, mode):
    """``graphs`` is ``mode="reduce-overhead"`` and ``graphs+autotune`` is ``mode="max-autotune"``, by inductor's own
    table of mode options; every option a mode does not set stays off."""
    from torch._inductor import list_mode_options

    switched_on = {name for name, on in bench_gpu.compile_options(bench_gpu.parse_variant(variant)).items() if on}
    assert switched_on == {name for name, on in list_mode_options(mode).items() if on}
