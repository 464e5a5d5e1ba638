"""The docs stay a product page: the performance page short, every raw result named and present, every link live."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGES = [
    ROOT / "README.md",
    ROOT / "benchmarks" / "README.md",
    ROOT / "bundle" / "docs" / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
]
# a result file's name: <benchmark>_<card>.<ext>, possibly with {a,b} alternatives or a * wildcard
RESULT_NAME = re.compile(r"[\w{},*-]+[_}](?:h100|h200|cpu_2core|2core)\.(?:json|txt|csv|\*)")
LINK = re.compile(r"\]\(([\w./-]+\.md)(?:#([\w-]+))?\)")


def expand_braces(name: str) -> list[str]:
    """``a_{x,y}_b`` -> ``["a_x_b", "a_y_b"]``, nested and repeated groups included."""
    match = re.search(r"\{([^{}]*)\}", name)
    if match is None:
        return [name]
    return [
        expanded
        for part in match.group(1).split(",")
        for expanded in expand_braces(name[: match.start()] + part + name[match.end() :])
    ]


def named_results() -> set[str]:
    """Every result-file name (brace groups expanded, wildcards kept) that the pages mention."""
    text = "\n".join(page.read_text() for page in PAGES)
    return {name for match in RESULT_NAME.findall(text) for name in expand_braces(match)}


def heading_anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation but ``-`` and ``_`` dropped, spaces -> ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_expand_braces_and_anchor_by_hand():
    assert expand_braces("a_{x,y}_{1,}.json") == ["a_x_1.json", "a_x_.json", "a_y_1.json", "a_y_.json"]
    assert heading_anchor("4. Whole-volume inference") == "4-whole-volume-inference"
    assert heading_anchor("Small predictions (`min_enhancing_voxels`)") == "small-predictions-min_enhancing_voxels"


def test_the_performance_page_is_at_most_200_lines():
    lines = (ROOT / "docs" / "performance.md").read_text().count("\n")
    assert lines <= 200, f"docs/performance.md has {lines} lines: keep the current figures and their commands only"


def test_every_result_file_the_docs_name_exists():
    present = [path.name for path in RESULTS.iterdir()]
    missing = sorted(name for name in named_results() if not fnmatch.filter(present, name))
    assert not missing, f"named in the docs but not in benchmarks/results: {missing}"


def test_every_result_file_is_named_by_the_docs():
    names = named_results()
    unnamed = sorted(
        path.name for path in RESULTS.iterdir() if not any(fnmatch.fnmatch(path.name, name) for name in names)
    )
    assert not unnamed, f"benchmarks/results files that no page names (say what they hold, or remove them): {unnamed}"


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES])
def test_links_between_pages_reach_a_page_and_heading(page):
    broken = []
    for target, anchor in LINK.findall(page.read_text()):
        path = (page.parent / target).resolve()
        if not path.is_file():
            broken.append(target)
            continue
        headings = re.findall(r"^#+ (.+)$", path.read_text(), flags=re.MULTILINE)
        if anchor and anchor not in {heading_anchor(heading) for heading in headings}:
            broken.append(f"{target}#{anchor}")
    assert not broken, f"{page.relative_to(ROOT)} links to what does not exist: {broken}"
