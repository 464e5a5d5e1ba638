"""The usage snippet of docs/network.md runs as written."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

from medsegdiff_monai.networks import DiffusionUNetWithGradeHead

DOC = Path(__file__).resolve().parents[2] / "docs" / "network.md"


def test_docs_python_snippet_runs():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert len(blocks) == 1, f"expected one python block in {DOC}, found {len(blocks)}"
    namespace: dict = {}
    exec(compile(blocks[0], str(DOC), "exec"), namespace)
    assert namespace["probabilities"].shape == (2, 3, 32, 32)
    assert namespace["loss"].ndim == 0


def test_docs_api_listing_has_the_constructor_signature():
    """The ``DiffusionUNetWithGradeHead(...)`` line of the Public API listing names every argument with its default."""
    listing = re.search(r"DiffusionUNetWithGradeHead\((.*?)\)\n\s+\.forward", DOC.read_text(), flags=re.DOTALL)
    assert listing, f"no DiffusionUNetWithGradeHead(...) listing in {DOC}"
    call = ast.parse(f"f({' '.join(listing.group(1).split())})", mode="eval").body
    documented = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
    parameters = inspect.signature(DiffusionUNetWithGradeHead).parameters.values()
    actual = {p.name: p.default for p in parameters}
    assert documented == actual
