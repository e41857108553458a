"""The agent's parts built alone, over real files, for tests that need no whole agent."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

from agent.artifacts import ArtifactKind, ArtifactStore
from agent.events import EngineEvent
from agent.fetch import Fetcher
from agent.journal import Journal
from agent.limits import Limits
from agent.outbox import Outbox
from agent.runtime import InferenceResult, Tally
from broker.transport import Message
from schemas import ArtifactRef
from tests.broker.memory import MemoryTransport

DEVICE = "jetson-000"


def tally(release_id: str, *results: InferenceResult | None) -> Tally:
    """``results`` (None: a failed inference) counted as one tally of ``release_id``."""
    counted = Tally(release_id, "0" * 64)
    for result in results:
        counted.add(result)
    return counted


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


class Fetching:
    """A fetcher over the artifact store of a data folder, fed by a scripted link."""

    def __init__(self, fetcher: Fetcher, link: MemoryTransport) -> None:
        self.fetcher = fetcher
        self.store = fetcher.store
        self._link = link

    async def collect(
        self, ref: ArtifactRef, kind: ArtifactKind, queue: asyncio.Queue[Message]
    ) -> Path:
        """Fetch ``ref``, the link delivering what ``queue`` holds, in order."""
        while not queue.empty():
            self._link.pending.append(queue.get_nowait())
        return await self.fetcher.fetch(ref, kind)


@asynccontextmanager
async def fetching(data_dir: Path, *, timeout_s: float = 5.0) -> AsyncIterator[Fetching]:
    """A fetcher over the artifact store in ``data_dir``, telling damage through a
    journal over its outbox (so that it lands where an agent's would)."""
    told = journal(data_dir)
    link: MemoryTransport | None = None
    fetcher = Fetcher(
        ArtifactStore(data_dir / "artifacts"),
        device_id=DEVICE,
        transport=lambda: link,
        damaged=partial(told.damaged, set_aside_file=False),
        feed=lambda _: None,
        clock=time.time,
        timeout_s=timeout_s,
        resubscribe_s=0.1,
    )
    link = MemoryTransport(deliver=fetcher.offer, client_id=DEVICE)
    try:
        yield Fetching(fetcher, link)
    finally:
        told.outbox.close()
