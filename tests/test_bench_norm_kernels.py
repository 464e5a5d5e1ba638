"""``benchmarks/bench_norm_kernels.py`` adds up a step's GroupNorm time per tiling."""

from __future__ import annotations

import pytest
from benchmark_scripts import load_benchmark


def _row(name: str, config: str, forward_us: float, backward_us: float) -> dict:
    # the bandwidths only print
    return {
        "input": name,
        "config": config,
        "forward_us": forward_us,
        "backward_us": backward_us,
        "forward_tb_per_s": 1.0,
        "backward_tb_per_s": 1.0,
    }


def test_step_totals_use_whole_groups_only_where_they_ran():
    norm_kernels = load_benchmark("bench_norm_kernels")
    counts = {"small": 3, "large": 2}
    rows = [
        _row("small", "rule", 10.0, 20.0),
        _row("small", "4096/1024/4/1", 12.0, 22.0),
        _row("small", "whole/4", 4.0, 9.0),
        _row("large", "rule", 100.0, 200.0),
        _row("large", "4096/1024/4/1", 110.0, 190.0),
    ]
    totals = norm_kernels.summarise(rows, counts)
    # by hand, in microseconds: the rule 3 x 30 + 2 x 300; whole groups on the small input, the rule on the large
    assert totals["rule"] == pytest.approx((3 * 30 + 2 * 300) / 1000)
    assert totals["rule, but whole/4 where groups fit"] == pytest.approx((3 * 13 + 2 * 300) / 1000)
    # best per input and pass: small 4 + 9, large 100 + 190
    assert totals["best per input and pass"] == pytest.approx((3 * 13 + 2 * 290) / 1000)
    # a whole-group config, missing on the large input, is no single config for the step
    assert totals["best single config (4096/1024/4/1)"] == pytest.approx((3 * 34 + 2 * 300) / 1000)
