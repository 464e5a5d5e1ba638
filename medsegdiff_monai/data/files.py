"""Files and folders shared by processes: a small file written whole, a folder held by one run at a time."""

from __future__ import annotations

import logging
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["lock_folder", "write_text_atomically"]


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


def lock_folder(folder: str | os.PathLike, in_use: str) -> int | None:
    """Take an exclusive lock on ``folder`` (``fcntl.flock``, not waiting) for one run's writing.

    The lock lasts until the returned descriptor is closed, or the process ends, however it ends. Where ``fcntl`` is
    missing (Windows) nothing is locked; where the file system does not lock folders (NFS), nothing is locked either,
    with a warning.

    Args:
        folder: an existing folder.
        in_use: the message of the error when another process holds the lock (what to do about it).

    Returns:
        the descriptor holding the lock, or None when nothing was locked.

    Raises:
        FileExistsError: ``in_use``, when another process holds the lock.
    """
    if fcntl is None:
        return None
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise FileExistsError(in_use) from None
    except OSError as error:  # a file system without such locks on folders (NFS)
        os.close(descriptor)
        logging.getLogger(__name__).warning(
            f"{folder} cannot be locked here ({error.strerror}): make sure no other run writes into it"
        )
        return None
    return descriptor
