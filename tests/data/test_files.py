import os

import pytest

from medsegdiff_monai.data.files import write_text_atomically


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    target = tmp_path / "record.json"
    target.write_text("old")
    assert write_text_atomically(target, "new") == target and target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]  # no temporary file left

    def stopped(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", stopped)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomically(target, "newer")
    assert target.read_text() == "new"  # the reader sees the old file, never a part of the new one
