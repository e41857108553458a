"""The agent's parts built alone, over real files, for tests that need no whole agent."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

from agent.artifacts import ArtifactStore
from agent.events import EngineEvent
from agent.fetch import Fetcher
from agent.journal import Journal
from agent.limits import Limits
from agent.outbox import Outbox

DEVICE = "jetson-000"


def journal(data_dir: Path, fed: list[EngineEvent] | None = None) -> Journal:
    """A journal over the outbox in ``data_dir``; what it tells the engine goes to ``fed``."""
    told = [] if fed is None else fed
    return Journal(
        Outbox(data_dir / "outbox.sqlite"),
        device_id=DEVICE,
        feed=told.append,
        clock=time.time,
        limits=Limits(),
    )


@asynccontextmanager
async def fetching(data_dir: Path, *, timeout_s: float = 5.0) -> AsyncIterator[Fetcher]:
    """A fetcher over the artifact store in ``data_dir``, telling damage through a
    journal over its outbox (so that it lands where an agent's would), with no link."""
    told = journal(data_dir)
    try:
        yield Fetcher(
            ArtifactStore(data_dir / "artifacts"),
            device_id=DEVICE,
            transport=lambda: None,
            damaged=partial(told.damaged, set_aside_file=False),
            feed=lambda _: None,
            clock=time.time,
            timeout_s=timeout_s,
            resubscribe_s=0.1,
        )
    finally:
        told.outbox.close()
