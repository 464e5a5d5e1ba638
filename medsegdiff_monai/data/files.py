"""Writing a small file so that a reader never sees it half-written."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["write_text_atomically"]


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a hidden temporary file beside it, renamed over ``path``: a stopped process
    leaves the old file or the new one, never a part. The temporary name carries the process id, so that processes
    writing the same file (distributed ranks) do not share one.

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.write_text(text)
    os.replace(partial, path)
    return path
