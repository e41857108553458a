"""Real storage faults for tests: a small tmpfs to fill up, remounted read-only at will.

Test-only. Mounting needs root (CI runs as root, as does the README's set-up); where it is
refused the test fails with the reason rather than pass unseen.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["fill", "remount", "tmpfs"]


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. ``"8m"``) mounted on ``where`` for the block."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        # A failure, not a skip: a storage check that did not run must not pass unseen.
        pytest.fail(f"cannot mount a tmpfs (the tests run as root): {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def remount(where: Path, options: str) -> None:
    """Remount ``where`` with ``options`` (``"ro"``, ``"rw"``)."""
    subprocess.run(["mount", "-o", f"remount,{options}", str(where)], check=True)


def fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` to the last byte; returns the ballast file."""
    ballast = folder / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for block in (64 * 1024, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, bytes(block))
    finally:
        os.close(fd)
    return ballast
