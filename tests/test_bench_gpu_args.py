"""``benchmarks/bench_gpu.py`` reads whole-volume sampler specs with their ``eta`` and refuses malformed ones."""

from __future__ import annotations

import pytest
from benchmark_scripts import load_benchmark


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
