"""Crash-safe file writes: temp file in the same folder, fsync, rename, fsync folder.

A reader (or a process restarted after a crash) sees either the old file or the new
one, never a torn one. These calls block: from async code run them in a thread.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

__all__ = ["atomic_write", "fsync_dir"]


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: Path, data: bytes | Iterable[bytes], *, mode: int = 0o644, sync_folder: bool = True
) -> None:
    """Replace ``path`` with ``data`` (bytes, or blocks written one after the other, so a
    big file need not be held whole) atomically and durably, with permissions ``mode``.

    The temporary file is created with ``mode`` from the start, so a private key is
    never readable by others, not even for an instant.

    ``sync_folder=False`` spends one fsync (the file's) instead of two when ``path``
    exists already: the rename is atomic, so a crash leaves the old or the new file,
    never a torn one, and it reaches the disk with the file system's next commit (any
    later fsync on it, or ext4's commit interval of a few seconds). A new file always
    has its folder synced, so that its name is durable.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    new_entry = sync_folder or not path.exists()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            for block in (data,) if isinstance(data, bytes) else data:
                handle.write(block)
            handle.flush()
            os.fsync(handle.fileno())
        Path(tmp).replace(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            Path(tmp).unlink()
        raise
    if new_entry:
        fsync_dir(path.parent)
