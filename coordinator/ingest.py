"""Incoming messages, dispatched: device topics to the fleet view, telemetry to the
ledger, specs to the intake, artifact topics to the keeper (and a fetch), and whatever of
the coordinator's own retained topics differs from the store put back at once.

Bursts. The ingest takes every message already waiting as one batch (up to
``limits.ingest_batch``). Reading a message (its topic parsed, a device's state, health
or telemetry decoded: 5 to 30 us each) is done for a whole batch in one thread hop once
the batch is ``limits.ingest_thread_min`` long, on the loop below that; then the batch is
applied on the loop in the order it arrived (fleet view and ledger updates are cheap),
so a fence that follows device messages counts only once they are applied
(``coordinator.clock``). Over Mosquitto a batch is some 60 to 140 messages (the driver
reads up to 64 packets per wake-up, the broker keeps 100 in flight); ``bench/ingest.py``
measures the loop's stalls with and without the hop.

Every handler runs under a guard: a failure is logged with a bounded description and
the message dropped (and counted), never the service. Messages the session had to drop
(:class:`IncomingOverflow`) are counted, logged and written to the audit log (under
``-``, no rollout's name), at most once per ``OVERFLOW_EVENT_S`` with the count since.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from broker.transport import IncomingOverflow, Message, Transport
from coordinator import specs
from coordinator.core import Core, describe
from coordinator.intake import Intake
from coordinator.keeper import Keeper
from coordinator.ledger import TelemetryLedger
from coordinator.metrics import FAILED, WRONG_DEVICE, Counters
from coordinator.reporter import Reporter
from coordinator.telemetry import Verdict as Judged
from schemas import (
    ONLINE,
    DeviceState,
    HealthReport,
    RejectedError,
    TelemetrySummary,
    decode,
    topics,
)
from schemas.errors import bound_text
from schemas.topics import DeviceChannel, ParsedTopic, TopicKind

__all__ = ["OVERFLOW_EVENT_S", "Ingest"]

log = logging.getLogger(__name__)

OVERFLOW_EVENT_S: Final = 60.0
"""At most one overflow warning and audit entry this often (each says how many since)."""
NO_ROLLOUT: Final = "-"
"""Where audit entries about the coordinator itself are filed (no rollout has this name)."""

_ARTIFACT_KINDS = frozenset(
    {
        TopicKind.ARTIFACT_META,
        TopicKind.ARTIFACT_CHUNK,
        TopicKind.STAGING_META,
        TopicKind.STAGING_CHUNK,
    }
)


_Payload = DeviceState | HealthReport | TelemetrySummary
_MODELS: Final[dict[DeviceChannel, type[_Payload]]] = {
    DeviceChannel.STATE: DeviceState,
    DeviceChannel.HEALTH: HealthReport,
    DeviceChannel.TELEMETRY: TelemetrySummary,
}
_CLEARABLE: Final = frozenset({DeviceChannel.STATE, DeviceChannel.HEALTH})
"""Retained channels: an empty payload clears them (nothing to decode)."""


@dataclass(frozen=True, slots=True)
class _Read:
    """One incoming message, read: its topic taken apart and, for a device's state,
    health or telemetry, its payload decoded (None: presence, or a cleared channel)."""

    message: Message
    parsed: ParsedTopic
    payload: _Payload | None = None


@dataclass(frozen=True, slots=True)
class _Unreadable:
    """One incoming message that could not be read, and why."""

    message: Message
    error: Exception


def _read(message: Message) -> _Read | _Unreadable:
    """Parse the topic and decode a device's state, health or telemetry. Pure and
    thread-safe: a long batch is read in a thread."""
    try:
        parsed = topics.parse(message.topic)
        model = None if parsed.channel is None else _MODELS.get(parsed.channel)
        if model is None or (parsed.channel in _CLEARABLE and not message.payload):
            return _Read(message, parsed)
        return _Read(message, parsed, decode(message.payload, model))
    except Exception as exc:  # noqa: BLE001 (reported in order, with the message, on the loop)
        return _Unreadable(message, exc)


def _read_all(batch: Sequence[Message]) -> list[_Read | _Unreadable]:
    return [_read(message) for message in batch]


class Ingest:
    def __init__(
        self,
        core: Core,
        intake: Intake,
        keeper: Keeper,
        *,
        ledger: TelemetryLedger,
        counters: Counters,
        reporter: Reporter | None = None,
    ) -> None:
        """``reporter`` gets every summary the ledger counted, and the retained class
        telemetry (restored from at start, re-asserted where it differs)."""
        self._core = core
        self._intake = intake
        self._keeper = keeper
        self._ledger = ledger
        self._counters = counters
        self._reporter = reporter
        self._overflow_told_at = -math.inf
        self._overflow_untold = 0
        self._echoes: list[asyncio.Future[None]] = []
        """Waiters for the echo of the coordinator's own presence, oldest first."""

    async def echo(self, timeout: float) -> None:
        """Say ``online`` and wait for the echo: the broker sends the retained messages
        of a subscription before anything published after its SUBACK, so by then every
        retained message was handled.

        Raises:
            TimeoutError: no echo within ``timeout``.
        """
        echo = asyncio.get_running_loop().create_future()
        self._echoes.append(echo)
        try:
            await self._core.publish(topics.coordinator_presence(), ONLINE)
            async with asyncio.timeout(timeout):
                await echo
        finally:
            with contextlib.suppress(ValueError):
                self._echoes.remove(echo)

    async def dispatch(self, transport: Transport) -> None:
        """Handle ``transport``'s messages, a batch of those waiting at a time, until its
        iterator ends."""
        messages = transport.messages()
        more = self._core.limits.ingest_batch - 1
        while True:
            try:
                first = await anext(messages)
            except StopAsyncIteration:
                return
            except IncomingOverflow as exc:
                self._overflowed(exc.dropped)
                continue
            await self._handle_batch([first, *transport.take_waiting(more)])

    async def _handle_batch(self, batch: list[Message]) -> None:
        """Read the batch (in one thread hop if it is long), then apply it in order."""
        counters = self._counters
        counters.ingest_batches += 1
        counters.messages_ingested += len(batch)
        if len(batch) >= self._core.limits.ingest_thread_min:
            counters.ingest_batches_threaded += 1
            counters.ingest_messages_threaded += len(batch)
            reads = await asyncio.to_thread(_read_all, batch)
        else:
            reads = _read_all(batch)
        for read in reads:
            if isinstance(read, _Unreadable):
                self._dropped(read.message, read.error)
                continue
            try:
                await self._apply(read)
            except Exception as exc:  # noqa: BLE001 (no message may end the service)
                self._dropped(read.message, exc)

    def _dropped(self, message: Message, exc: Exception) -> None:
        """Count and log a message refused or whose handling failed; bounded lines."""
        topic = bound_text(message.topic)
        if isinstance(exc, RejectedError):  # its text is bounded where it is built
            self._counters.refuse(exc.reason.value)
            log.warning("coordinator: dropped %s: %s", topic, exc)
            return
        self._counters.refuse(FAILED)
        log.error("coordinator: dropped %s after a failure: %s", topic, describe(exc))
        log.debug("coordinator: handling %s failed", topic, exc_info=exc)

    def _overflowed(self, dropped: int) -> None:
        """The session dropped messages: a metric always, a warning and an audit entry
        at most once per ``OVERFLOW_EVENT_S`` (with the count since the last one)."""
        self._counters.incoming_overflow += dropped
        self._overflow_untold += dropped
        now = self._core.monotonic()
        if now - self._overflow_told_at < OVERFLOW_EVENT_S:
            return
        told, self._overflow_untold, self._overflow_told_at = self._overflow_untold, 0, now
        detail = (
            f"{told} incoming messages dropped: the coordinator's queue was full "
            f"({self._counters.incoming_overflow} since it started)"
        )
        log.warning("coordinator: %s", detail)
        self._core.spawn(
            "overflow audit", self._core.audit("incoming_overflow", NO_ROLLOUT, detail)
        )

    async def _apply(self, read: _Read) -> None:
        parsed, message = read.parsed, read.message
        name = parsed.name
        if parsed.kind in _ARTIFACT_KINDS and name is not None:
            await self._keeper.note(message, parsed.kind, name, parsed.index)
        elif parsed.kind is TopicKind.DEVICE and name is not None:
            self._on_device(name, parsed.channel, message.payload, read.payload)
        elif parsed.kind is TopicKind.COORDINATOR_PRESENCE:
            self._on_presence(message)
        elif parsed.kind is TopicKind.COORDINATOR_FENCE:
            if self._core.settling.came_back(message.payload):
                self._core.changed.set()
        else:
            self._on_cache(parsed, message.payload)

    def _on_cache(self, parsed: ParsedTopic, payload: bytes) -> None:
        """One of the coordinator's own retained topics: noted, and put back if it
        differs from the store once this connection's cache was read."""
        core, name = self._core, parsed.name
        ready = core.ready.is_set()
        if parsed.kind is TopicKind.ROLLOUT_SPEC and name is not None:
            self._on_spec(name, payload, ready=ready)
        elif parsed.kind is TopicKind.ROLLOUT_STATUS and name is not None:
            core.retained_statuses[name] = payload
            expected = core.status_payload(name)
            if ready and expected is not None and payload != expected:
                core.spawn("status re-assert", core.publish_status(name))
        elif parsed.kind is TopicKind.CLASS_MANIFEST and name is not None:
            core.retained_manifests[name] = payload
            current = core.classes.get(name)
            if ready and current is not None and current.manifest not in (None, payload):
                core.spawn("manifest re-assert", core.publish_manifest(name))
        elif parsed.kind is TopicKind.CLASS_TELEMETRY and name is not None:
            if self._reporter is not None:
                self._reporter.retained(name, payload)
        elif parsed.kind is TopicKind.TRUST:
            core.retained_trust = payload
            if ready and payload != core.trust_bytes and not core.adopt_trust(payload):
                core.spawn("trust re-assert", core.publish(topics.trust(), core.trust_bytes))

    def _on_spec(self, rollout_id: str, payload: bytes, *, ready: bool) -> None:
        core = self._core
        if payload:
            core.retained_specs[rollout_id] = specs.digest(payload)
        else:
            core.retained_specs.pop(rollout_id, None)
        record = core.rollouts.get(rollout_id)
        if record is not None and payload == record.spec:
            return  # our own (re-asserted) bytes
        if payload or (ready and record is not None):
            self._intake.take(rollout_id, payload)

    def _on_presence(self, message: Message) -> None:
        core = self._core
        if not message.retain and message.payload == ONLINE and self._echoes:
            echo = self._echoes.pop(0)
            if not echo.done():
                echo.set_result(None)
        elif core.ready.is_set() and message.payload != ONLINE:
            # Someone else's word on our presence (we say offline only after this
            # dispatch has stopped): dashboards must not read us as gone.
            core.spawn("presence re-assert", core.publish(topics.coordinator_presence(), ONLINE))

    def _on_device(
        self,
        device_id: str,
        channel: DeviceChannel | None,
        raw: bytes,
        payload: _Payload | None,
    ) -> None:
        """A device's message, its payload decoded (None: presence, or a cleared state
        or health)."""
        fleet = self._core.fleet
        match payload:
            case DeviceState() if payload.device_id == device_id:
                fleet.on_state(payload)
            case HealthReport() if payload.device_id == device_id:
                if fleet.on_health(payload):
                    self._core.changed.set()
            case TelemetrySummary():
                if payload.device_id == device_id:
                    counted = self._ledger.offer(payload) is Judged.COUNTED
                    if counted and self._reporter is not None:
                        self._reporter.counted(payload)
                else:
                    self._counters.refuse(WRONG_DEVICE)
            case DeviceState() | HealthReport():  # of another device than its topic's
                self._counters.refuse(WRONG_DEVICE)
            case None if channel is DeviceChannel.PRESENCE:
                fleet.on_presence(device_id, raw == ONLINE)
            case None if channel is DeviceChannel.STATE:
                fleet.forget(device_id)
