"""What ``bench.fleet`` sees: its worker processes' reports (over pipes), the statuses
and manifests on the wire, and the probe devices whose reports a wave waits for."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final

from bench.fleetprocs import (
    HW_CLASS,
    SOAK_S,
)
from broker.session import Message, Session
from edgefleet.sim import Observer, SimConfig, Simulator
from schemas import (
    HealthReport,
    Manifest,
    RolloutStatus,
    decode,
    topics,
)
from schemas.envelope import Envelope

ROLLOUT: Final = "bench-rollout"
STEP_TIMEOUT_S: Final = 900.0
"""A guard against a hang at any one step; a step at 10,000 devices takes seconds."""


class Pipes:
    """The parent's end of some worker processes: commands out, reports in."""

    def __init__(self, conns: list[Connection]) -> None:
        self.conns = conns
        self._got: list[tuple[Any, ...]] = []
        self._changed = asyncio.Event()
        loop = asyncio.get_running_loop()
        for conn in conns:
            loop.add_reader(conn.fileno(), self._read, conn)

    def _read(self, conn: Connection) -> None:
        try:
            self._got.append(conn.recv())
        except EOFError:
            asyncio.get_running_loop().remove_reader(conn.fileno())
        self._changed.set()

    def send(self, *command: Any) -> None:
        for conn in self.conns:
            conn.send(command)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for conn in self.conns:
            loop.remove_reader(conn.fileno())

    async def gather(
        self, kind: str, n: int | None = None, match: Callable[[tuple[Any, ...]], bool] = bool
    ) -> list[tuple[Any, ...]]:
        """The first ``n`` (default: one per worker) reports of ``kind`` that ``match``."""
        wanted = len(self.conns) if n is None else n
        async with asyncio.timeout(STEP_TIMEOUT_S):
            while True:
                found = [m for m in self._got if m[0] == kind and match(m)]
                if len(found) >= wanted:
                    return found[:wanted]
                self._changed.clear()
                await self._changed.wait()


@dataclass
class Seen:
    """A manifest as the watcher received it."""

    at: float
    seq: int
    cutoff_bp: int | None
    size: int


@dataclass
class Watch:
    """The class manifest and the rollout's status, as a dashboard receives them."""

    manifests: list[Seen] = field(default_factory=list)
    status: RolloutStatus | None = None
    status_at: float = 0.0
    coordinator_online: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def follow(self, session: Session) -> None:
        async for message in session.messages():
            self._note(message, time.monotonic())
            self.changed.set()

    def _note(self, message: Message, at: float) -> None:
        if not message.payload:
            return
        if message.topic == topics.coordinator_presence():
            self.coordinator_online = message.payload == b"online"
        elif message.topic == topics.rollout_status(ROLLOUT):
            self.status, self.status_at = decode(message.payload, RolloutStatus), at
        elif message.topic == topics.class_manifest(HW_CLASS):
            doc = decode(decode(message.payload, Envelope).body, Manifest)
            if not self.manifests or doc.seq > self.manifests[-1].seq:
                cutoff = None if doc.rollout is None else doc.rollout.cutoff_bp
                self.manifests.append(Seen(at, doc.seq, cutoff, len(message.payload)))

    async def until(self, ready: Callable[[], Any]) -> Any:
        async with asyncio.timeout(STEP_TIMEOUT_S):
            while not (found := ready()):
                self.changed.clear()
                await self.changed.wait()
            return found

    async def manifest(self, match: Callable[[Seen], bool]) -> Seen:
        seen: Seen = await self.until(lambda: next(filter(match, self.manifests), None))
        return seen

    async def status_when(self, match: Callable[[RolloutStatus], bool]) -> float:
        """When the first status that matches arrived."""
        at: float = await self.until(
            lambda: self.status is not None and match(self.status) and self.status_at
        )
        return at


class Probe(Observer):
    """A device of this process whose health report waits for a word from the bench."""

    def __init__(self, folder: Path) -> None:
        self.verified_at: dict[int, float] = {}
        self.changed = asyncio.Event()
        self.reported = asyncio.get_running_loop().create_future()
        self.sim = Simulator([folder], SimConfig(soak_s=SOAK_S), observer=self)
        self.sim.gate.close()

    def verified(self, device_id: str, seq: int) -> None:  # noqa: ARG002 (an Observer hook)
        self.verified_at[seq] = time.monotonic()
        self.changed.set()

    async def took(self, seq: int) -> float:
        """When it verified the manifest of ``seq``."""
        async with asyncio.timeout(STEP_TIMEOUT_S):
            while seq not in self.verified_at:
                self.changed.clear()
                await self.changed.wait()
        return self.verified_at[seq]

    def reporting(self, device_id: str, report: HealthReport) -> None:  # noqa: ARG002 (an Observer hook)
        if not self.reported.done():
            self.reported.set_result(time.monotonic())

    async def report(self) -> float:
        """Let its report go; when it was about to be published."""
        self.sim.gate.open()
        async with asyncio.timeout(STEP_TIMEOUT_S):
            at: float = await self.reported
        return at
