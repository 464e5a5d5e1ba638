"""The whole-group GroupNorm kernels compile for the GPUs they target (sm_90: H100, H200) without spilling registers.

The interpreter tests check what the kernels compute; this checks that Triton's CUDA backend accepts them, which the
interpreter does not, and what each thread holds. It compiles ahead of time on the CPU with the ``ptxas`` that ships
with Triton and reads the cubin's resource usage with its ``cuobjdump``; no GPU is needed.
"""

from __future__ import annotations

import inspect
import re
import subprocess
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from medsegdiff_monai.networks.kernels import group_norm_triton  # noqa: E402

_TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
pytestmark = pytest.mark.skipif(not (_TOOLS / "ptxas").exists(), reason="Triton's CUDA tools are not installed")

# bf16 tensors of the step; the affine parameters and the statistics are float32
_BF16 = {"x_ptr", "y_ptr", "dy_ptr", "dx_ptr", "offset_ptr"}


def _resource_usage(kernel, constexprs: dict, num_warps: int, tmp_path: Path) -> dict[str, int]:
    """Registers per thread and bytes of stack and local memory (where registers spill) per thread of ``kernel``
    compiled for sm_90."""
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {
        name: "constexpr"
        if name in constexprs
        else ("*bf16" if name in _BF16 else "*fp32")
        if name.endswith("_ptr")
        else ("fp32" if name == "eps" else "i32")
        for name in names
    }
    source = ASTSource(
        fn=kernel,
        signature=signature,
        constexprs={(names.index(name),): value for name, value in constexprs.items()},
    )
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    cubin = tmp_path / f"{kernel.fn.__name__}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    report = subprocess.run(
        [str(_TOOLS / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True, check=True
    ).stdout
    return {key: int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", report)}


# (pixel rows, channels per group, warps): the step's qualifying inputs at 256 x 256, batch 8 (16 x 16 and 32 x 32
# maps of 128-512 channels in 32 groups), up to the 8,192-element tile
@pytest.mark.parametrize(
    ("rows", "channels_per_group", "num_warps"), [(256, 16, 4), (256, 8, 4), (1024, 8, 8), (1024, 4, 16)]
)
@pytest.mark.parametrize("has_offset", [False, True])
def test_whole_group_kernels_compile_for_sm90_without_spills(rows, channels_per_group, num_warps, has_offset, tmp_path):
    constexprs = {
        "SILU": True,
        "HAS_OFFSET": has_offset,
        "G": 32,
        "CG": channels_per_group,
        "BLOCK_R": triton.next_power_of_2(rows),
        "BLOCK_CG": triton.next_power_of_2(channels_per_group),
    }
    assert group_norm_triton.whole_groups_fit((8, 32 * channels_per_group, rows, 1), 32)
    for kernel in (group_norm_triton._whole_group_forward_kernel, group_norm_triton._whole_group_backward_kernel):
        usage = _resource_usage(kernel, constexprs, num_warps, tmp_path)
        assert usage["STACK"] == usage["LOCAL"] == 0, (kernel.fn.__name__, usage)
        assert 0 < usage["REG"] <= 255, (kernel.fn.__name__, usage)
