"""The demo models every test package uses, built once into pytest's cache and shared by
every test process (a file lock keeps parallel workers from building them side by side)."""

from __future__ import annotations

import fcntl
import tempfile
from pathlib import Path

import pytest

from models import DemoModel, build_demo_models


def shared_demo_models(config: pytest.Config) -> dict[str, DemoModel]:
    """digits-v1, digits-v2 and the rest, reused from pytest's cache when intact."""
    cache = getattr(config, "cache", None)
    if cache is None:  # -p no:cacheprovider
        return build_demo_models(Path(tempfile.mkdtemp(prefix="edgefleet-models-")))
    folder = Path(cache.mkdir("edgefleet-demo-models"))
    with (folder.parent / "edgefleet-demo-models.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return build_demo_models(folder)
