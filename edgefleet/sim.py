"""Protocol-level devices: thousands of simulated agents in one event loop, each with its
own connection and identity, speaking the real protocol to the real broker.

Theory of operation. A :class:`SimDevice` is what the coordinator and the broker see of
an agent, without the model: it connects with its own enrollment bundle (mutual TLS, its
certificate's CN is its id) and a Last Will saying ``offline``; on every connect it
re-asserts its retained presence, state and last health report; it judges the trust
document and its class manifest with the agent's own pure :class:`agent.intake.Intake`
(real Ed25519 signatures, seq and expiry checks, the same refusals, told in ``events``).
When a manifest assigns it another release it "runs" that release at once: it fetches no
artifact and loads nothing (no onnxruntime is needed at this level), names the release
active in its state, soaks for the release's own ``soak_seconds`` (or
:attr:`SimConfig.soak_s`) and reports its health, after a telemetry summary of the soak.

For scenarios, a share of the devices are unhealthy (they report so on every new release
and go back to the one before, as an agent does) or silent (they take a manifest and never
report again). Which devices they are follows from a stable hash of their ids. The
:class:`Gate` holds health reports back while closed, so that a burst of reports can be
released at one moment (``bench/fleet.py``).

A :class:`Simulator` runs many devices in one task group: a session (no thread) and a
few tasks each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from agent.bundle import Bundle
from agent.intake import Intake, ManifestTaken, Outcome, Refused
from agent.link import settle_delay
from broker.backoff import RECONNECT, Retry
from broker.session import Endpoint, Message, Session, TransportError, Will
from edgefleet.simconfig import Behaviour, SimConfig
from schemas import (
    OFFLINE,
    ONLINE,
    DeviceState,
    Event,
    HealthReport,
    LogHistogram,
    Mode,
    Rejection,
    Release,
    TelemetrySummary,
    Verdict,
    bucket,
    encode,
    topics,
)
from schemas.errors import bound_text
from schemas.manifest import BUCKETS
from schemas.telemetry import CONFIDENCE_BINS, latency_bucket
from schemas.topics import DeviceChannel

__all__ = ["Behaviour", "Gate", "Observer", "SimConfig", "SimDevice", "SimStats", "Simulator"]

log = logging.getLogger(__name__)

_PHASE_SALT: Final = "edgefleet-sim/telemetry-phase"
_DETAIL_CHARS: Final = 500


class Observer:
    """Told what the devices do, as it happens (for measurements); this one ignores it."""

    def verified(self, device_id: str, seq: int) -> None:
        """A device took (verified and applied) the manifest of ``seq``."""

    def reporting(self, device_id: str, report: HealthReport) -> None:
        """A device is about to publish ``report``."""


@dataclass
class SimStats:
    """What the devices of one simulator did so far."""

    connected: int = 0
    """Devices whose session is open."""
    manifests: Counter[int] = field(default_factory=Counter)
    """Manifest seq -> devices that took it."""
    refused: int = 0
    """Trust documents and manifests refused."""
    reports: Counter[Verdict] = field(default_factory=Counter)
    telemetry: int = 0
    unpublished: int = 0
    """Devices whose changed state waits to be published (settling)."""
    changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    """Set whenever ``connected`` or ``unpublished`` changes."""

    def connection(self, delta: int) -> None:
        self.connected += delta
        self.changed.set()

    def settling(self, delta: int) -> None:
        self.unpublished += delta
        self.changed.set()


class Gate:
    """Health reports wait here while it is closed (it starts open)."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._changed = asyncio.Event()
        self.held = 0  # reports waiting now

    def close(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    async def passage(self) -> None:
        """Return once the gate is open."""
        if self._open.is_set():
            return
        self.held += 1
        self._changed.set()
        try:
            await self._open.wait()
        finally:
            self.held -= 1

    async def until_held(self, n: int) -> None:
        """Return once at least ``n`` reports wait."""
        while self.held < n:
            self._changed.clear()
            await self._changed.wait()


class SimDevice:
    """One simulated device on its own session; :meth:`run` until cancelled."""

    def __init__(
        self,
        bundle: Bundle,
        folder: Path,
        config: SimConfig,
        *,
        gate: Gate,
        stats: SimStats,
        observer: Observer,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.device_id = bundle.device_id
        self.hw_class = bundle.hw_class
        self.behaviour = config.behaviour(bundle.device_id)
        self._endpoint = Endpoint(
            host=bundle.broker_host,
            port=bundle.broker_port,
            ca_file=folder / bundle.ca_file,
            cert_file=folder / bundle.cert_file,
            key_file=folder / bundle.key_file,
        )
        self._intake = Intake(
            bundle.root_public_keys(), hw_class=bundle.hw_class, device_id=bundle.device_id
        )
        self._config = config
        self._gate = gate
        self._stats = stats
        self._observer = observer
        self._clock = clock
        self._started = clock()
        self._release: Release | None = None
        self._previous: Release | None = None
        self._rollout_id: str | None = None
        self._target: Release | None = None
        self._mode = Mode.IDLE
        self._rejection: Rejection | None = None
        self._health: bytes | None = None
        self._soak: asyncio.Task[None] | None = None
        self._session: Session | None = None
        self._sent = 0
        self._state_changed = asyncio.Event()

    def _topic(self, channel: DeviceChannel) -> str:
        return topics.device(self.device_id, channel)

    async def run(self) -> None:
        """Keep a session to the broker, for ever; a session that cannot be opened is
        tried again with the reconnect backoff."""
        will = Will(topic=self._topic(DeviceChannel.PRESENCE), payload=OFFLINE, retain=True)
        retry = Retry(RECONNECT)
        try:
            while True:
                session = Session(
                    self._endpoint,
                    client_id=self.device_id,
                    will=will,
                    keepalive=self._config.keepalive,
                    connect_timeout=self._config.connect_timeout,
                )
                try:
                    async with session:
                        await self._linked(session)
                except TransportError as exc:
                    log.warning("%s: %s", self.device_id, bound_text(str(exc)))
                await asyncio.sleep(retry.next_delay())
        finally:
            if self._soak is not None:
                self._soak.cancel()

    async def _linked(self, session: Session) -> None:
        await session.subscribe(topics.trust(), topics.class_manifest(self.hw_class))
        self._session = session
        self._stats.connection(1)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._reassert(session))
                tg.create_task(self._receive(session))
                tg.create_task(self._state_loop())
                if self._config.telemetry_s > 0:
                    tg.create_task(self._telemetry_loop())
        finally:
            self._stats.connection(-1)
            self._session = None

    async def _reassert(self, session: Session) -> None:
        async for _ in session.connections():
            await self._publish(DeviceChannel.PRESENCE, ONLINE, retain=True)
            await self._publish_state()
            if self._health is not None:
                await self._publish(DeviceChannel.HEALTH, self._health, retain=True)

    async def _receive(self, session: Session) -> None:
        async for message in session.messages():
            for outcome in self._judge(message):
                await self._take(outcome)

    def _judge(self, message: Message) -> list[Outcome]:
        if not message.payload:
            return []
        now = self._clock()
        if message.topic == topics.trust():
            return self._intake.trust(message.payload, now=now)
        return self._intake.manifest(message.payload, now=now)

    async def _take(self, outcome: Outcome) -> None:
        if isinstance(outcome, Refused):
            self._stats.refused += 1
            detail = bound_text(outcome.detail, _DETAIL_CHARS)
            self._rejection = Rejection(
                reason=outcome.reason.value, detail=detail, at=self._clock()
            )
            event = Event(
                event_id=self._next_id("event"),
                device_id=self.device_id,
                kind=outcome.kind,
                reason=outcome.reason.value,
                detail=detail,
                at=self._clock(),
            )
            await self._publish(DeviceChannel.EVENTS, encode(event))
        elif isinstance(outcome, ManifestTaken):
            self._stats.manifests[outcome.manifest.seq] += 1
            self._observer.verified(self.device_id, outcome.manifest.seq)
            self._apply(outcome)
        self._state_change()  # a manifest or trust taken, or a rejection

    def _apply(self, taken: ManifestTaken) -> None:
        """Run the release the manifest assigns, if it is another one, and soak it."""
        release = taken.desired.release
        self._rollout_id = taken.desired.rollout_id
        target = self._target
        if release is None or (target is not None and release.artifact == target.artifact):
            return  # nothing to run yet, or the same build (a re-sign, a promotion)
        if self._soak is not None:
            self._soak.cancel()
        self._target = release
        self._previous = self._release
        self._release = release
        self._mode = Mode.UPDATING
        self._soak = asyncio.create_task(self._soak_release(release, taken.manifest.seq))

    async def _soak_release(self, release: Release, seq: int) -> None:
        soak = self._config.soak_s
        soak = release.health.soak_seconds if soak is None else soak
        started = self._clock()
        await asyncio.sleep(soak)
        if self.behaviour is Behaviour.SILENT:
            return
        await self._gate.passage()
        report = self._report(release, seq, soak)
        await self._publish(DeviceChannel.TELEMETRY, encode(self._summary(release, started)))
        self._stats.telemetry += 1
        if report.verdict is Verdict.UNHEALTHY:
            self._release = self._previous
            self._mode = Mode.DEGRADED
        else:
            self._mode = Mode.SERVING
        self._health = encode(report)
        self._stats.reports[report.verdict] += 1
        self._observer.reporting(self.device_id, report)
        await self._publish(DeviceChannel.HEALTH, self._health, retain=True)
        self._state_change()

    def _report(self, release: Release, seq: int, soak: float) -> HealthReport:
        budget = release.health
        inferences = max(budget.min_inferences, int(self._config.inference_hz * soak))
        healthy = self.behaviour is Behaviour.HEALTHY
        errors = 0 if healthy else inferences // 2
        reasons = () if healthy else (f"error rate 0.50 over budget {budget.max_error_rate:g}",)
        return HealthReport(
            report_id=self._next_id("health"),
            device_id=self.device_id,
            rollout_id=self._rollout_id,
            manifest_seq=seq,
            release=release.release_id,
            verdict=Verdict.HEALTHY if healthy else Verdict.UNHEALTHY,
            reasons=reasons,
            inferences=inferences,
            errors=errors,
            p95_latency_ms=self._config.latency_ms if healthy else budget.p95_latency_ms * 3,
            soak_seconds=soak,
            at=self._clock(),
        )

    def _summary(self, release: Release | None, start: float) -> TelemetrySummary:
        end = self._clock()
        count = max(1, int((end - start) * self._config.inference_hz))
        errors = 0 if self.behaviour is Behaviour.HEALTHY else count // 2
        confidence = (0,) * (CONFIDENCE_BINS - 1) + (count,)
        return TelemetrySummary(
            summary_id=self._next_id("telemetry"),
            device_id=self.device_id,
            release=None if release is None else release.release_id,
            window_start=start,
            window_end=end,
            count=count,
            errors=errors,
            latency_ms=LogHistogram.from_counts(
                Counter({latency_bucket(self._config.latency_ms): count})
            ),
            confidence=confidence,
        )

    async def _telemetry_loop(self) -> None:
        period = self._config.telemetry_s
        # Spread over the period: a fleet that connected together does not report in step.
        await asyncio.sleep(period * bucket(_PHASE_SALT, self.device_id) / BUCKETS)
        while True:
            start = self._clock()
            await asyncio.sleep(period)
            if self.behaviour is not Behaviour.SILENT:
                summary = self._summary(self._release, start)
                await self._publish(DeviceChannel.TELEMETRY, encode(summary))
                self._stats.telemetry += 1

    def _next_id(self, what: str) -> str:
        self._sent += 1
        return f"{self.device_id}-{what}-{self._started:.0f}-{self._sent}"

    def _state(self) -> DeviceState:
        now = self._clock()
        running = self._release
        return DeviceState(
            device_id=self.device_id,
            hw_class=self.hw_class,
            mode=self._mode,
            active_release=None if running is None else running.release_id,
            active_sha256=None if running is None else running.artifact.sha256,
            target_release=None if self._target is None else self._target.release_id,
            rollout_id=self._rollout_id,
            applied_seq=self._intake.applied_seq,
            trust_version=self._intake.trust_version,
            inferences_total=int((now - self._started) * self._config.inference_hz),
            last_inference_at=now,
            last_rejection=self._rejection,
            updated_at=now,
        )

    async def _state_loop(self) -> None:
        """Publish the state like an agent (``agent.link.Link``): a change after the
        settle, with the changes that join it meanwhile, and the state again every
        ``state_interval_s`` (0: only on changes)."""
        config = self._config
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(config.state_interval_s or None):
                    await self._state_changed.wait()
            changed = self._state_changed.is_set()
            if changed:
                await asyncio.sleep(settle_delay(config.state_settle_s))
            self._state_changed.clear()
            await self._publish_state()
            if changed:
                self._stats.settling(-1)

    def _state_change(self) -> None:
        if not self._state_changed.is_set():
            self._stats.settling(1)
            self._state_changed.set()

    async def _publish_state(self) -> None:
        await self._publish(DeviceChannel.STATE, encode(self._state()), retain=True)

    async def _publish(
        self, channel: DeviceChannel, payload: bytes, *, retain: bool = False
    ) -> None:
        """Publish on one of the device's channels; while disconnected, what is retained
        is re-asserted on the next connect and the rest is dropped (logged)."""
        session = self._session
        if session is None:
            return
        try:
            await session.publish(self._topic(channel), payload, retain=retain)
        except TransportError as exc:
            log.info("%s: %s not published: %s", self.device_id, channel.value, exc)


class Simulator:
    """Simulated devices, one per enrollment bundle folder, in one task group."""

    def __init__(
        self,
        folders: Sequence[Path],
        config: SimConfig,
        *,
        observer: Observer | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Reads every bundle (blocking).

        Raises:
            OSError, ValueError: a bundle is missing or malformed.
        """
        self.config = config
        self.stats = SimStats()
        self.gate = Gate()
        seen = observer or Observer()
        self.devices = [
            SimDevice(
                Bundle.load(folder),
                folder,
                config,
                gate=self.gate,
                stats=self.stats,
                observer=seen,
                clock=clock,
            )
            for folder in folders
        ]

    def behaviours(self) -> Counter[Behaviour]:
        return Counter(device.behaviour for device in self.devices)

    async def run(self) -> None:
        """Run every device until cancelled."""
        async with asyncio.TaskGroup() as tg:
            for device in self.devices:
                tg.create_task(device.run(), name=f"sim-{device.device_id}")

    async def until_quiet(self) -> None:
        """Return once no device has a changed state waiting to be published."""
        while self.stats.unpublished:
            self.stats.changed.clear()
            await self.stats.changed.wait()

    async def until_connected(self, n: int | None = None) -> None:
        """Return once ``n`` devices (default: all) have their session open."""
        wanted = len(self.devices) if n is None else n
        while self.stats.connected < wanted:
            self.stats.changed.clear()
            await self.stats.changed.wait()
