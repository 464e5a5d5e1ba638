"""The usage snippet of docs/inference.md runs as written."""

from __future__ import annotations

import math
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "inference.md"


def test_docs_python_snippet_runs():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert len(blocks) == 1, f"expected one python block in {DOC}, found {len(blocks)}"
    namespace: dict = {}
    exec(compile(blocks[0], str(DOC), "exec"), namespace)
    assert namespace["out"].probs.shape == (2, 3, 32, 32)
    result = namespace["result"]
    assert result.probs.shape == (3, 32, 32, 6) and float(result.probs[..., 0].abs().max()) == 0.0
    assert 0.0 <= result.p_hgg <= 1.0
    assert namespace["scores"]["dice_mean"] == 1.0 and namespace["scores"]["hd95_mean"] == 0.0
    assert math.isclose(namespace["grades"]["auc"], 1.0)  # 0.9 above both negatives 0.2 and 0.7
