"""The usage snippet of docs/network.md runs as written."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "network.md"


def test_docs_python_snippet_runs():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert len(blocks) == 1, f"expected one python block in {DOC}, found {len(blocks)}"
    namespace: dict = {}
    exec(compile(blocks[0], str(DOC), "exec"), namespace)
    assert namespace["probabilities"].shape == (2, 3, 32, 32)
    assert namespace["loss"].ndim == 0
