"""The coordinator's telemetry reporter (``coordinator.reporter``) behind the real ingest,
ledger, store and audit log, over a scripted transport: only what the ledger counted is
aggregated, a class's snapshot is published retained when it changed, alerts go to the
audit log, and a restarted coordinator takes its references back from its retained
snapshot before it publishes anything."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.transport import Message
from coordinator.aggregate import AggregateSettings, Aggregator, Named
from coordinator.core import Core
from coordinator.drift import DriftPolicy
from coordinator.fetching import Fetcher
from coordinator.ingest import Ingest
from coordinator.intake import Intake
from coordinator.keeper import Keeper
from coordinator.ledger import TELEMETRY_FILENAME, TelemetryLedger
from coordinator.metrics import Counters
from coordinator.reporter import Reporter
from coordinator.signer import Signer
from coordinator.store import ClassRecord
from schemas import (
    ClassTelemetry,
    KeyPair,
    ReferenceSource,
    ReleaseRole,
    TelemetrySummary,
    decode,
    encode,
    topics,
)
from schemas.topics import DeviceChannel
from tests.coordinator.kit import ScriptedTransport, make_config
from tests.coordinator.records import CLASS, T0, device_state, make_release
from tests.coordinator.summaries import numbered, window

RELEASE = make_release()


@dataclass
class _Rig:
    core: Core
    ingest: Ingest
    reporter: Reporter
    transport: ScriptedTransport
    clock: list[float]

    async def dispatch(self, incoming: list[Message]) -> None:
        await self.ingest.dispatch(ScriptedTransport(fail=False, incoming=incoming, ends=True))

    def published(self) -> list[ClassTelemetry]:
        return [
            decode(payload, ClassTelemetry)
            for topic, payload in self.transport.published
            if topic == topics.class_telemetry(CLASS)
        ]


@asynccontextmanager
async def _rig(tmp_path: Path) -> AsyncIterator[_Rig]:
    clock = [T0]
    config = make_config(
        tmp_path, KeyPair.generate(), telemetry=AggregateSettings(publish_s=0.01, audit_gap_s=0)
    )
    core = Core(config, clock=lambda: clock[0])
    core.classes[CLASS] = ClassRecord(name=CLASS, stable=RELEASE)
    counters = Counters()
    ledger = TelemetryLedger(tmp_path / TELEMETRY_FILENAME, counters=counters)
    fetcher = Fetcher(core)
    keeper = Keeper(core, fetcher)
    intake = Intake(core, fetcher, keeper, Signer(core))
    reporter = Reporter(core)
    ingest = Ingest(core, intake, keeper, ledger=ledger, counters=counters, reporter=reporter)
    transport = ScriptedTransport(fail=False)
    core.transport = transport
    try:
        yield _Rig(core, ingest, reporter, transport, clock)
    finally:
        core.store.close()


def _run(tmp_path: Path, test: Callable[[_Rig], Coroutine[Any, Any, None]]) -> None:
    async def main() -> None:
        async with asyncio.timeout(10.0), _rig(tmp_path) as rig:
            await test(rig)

    asyncio.run(main())


def _state(device_id: str) -> Message:
    payload = encode(device_state(device_id))
    topic = topics.device(device_id, DeviceChannel.STATE)
    return Message(topic=topic, payload=payload, retain=True, qos=1)


def _sent(summary: TelemetrySummary) -> Message:
    topic = topics.device(summary.device_id, DeviceChannel.TELEMETRY)
    return Message(topic=topic, payload=encode(summary), retain=False, qos=1)


def _numbered(device_id: str, seq: int, **changes: Any) -> TelemetrySummary:
    """Number ``seq`` of the device's stream: 10 inferences (1 error) of ``RELEASE``."""
    fields = {"device_id": device_id, "release": RELEASE.release_id, "window_end": T0}
    return numbered(seq).model_copy(update={**fields, **changes})


def test_only_summaries_the_ledger_counted_are_aggregated_and_published_when_changed(
    tmp_path: Path,
) -> None:
    async def counted(rig: _Rig) -> None:
        devices = [f"cam-{i}" for i in range(3)]
        once = [_sent(_numbered(d, seq)) for d in devices for seq in (1, 2)]
        again = once[:3]  # QoS 1 redeliveries: duplicates
        early = [_sent(_numbered(d, 4, base=1)) for d in devices]  # 3 is missing: waits
        stray = [_sent(_numbered("cam-unknown", 1))]  # no state: its class is unknown
        await rig.dispatch([*map(_state, devices), *once, *again, *early, *stray])
        await rig.reporter.report()
        [snapshot] = rig.published()
        [release] = snapshot.releases
        assert (release.release, release.role) == (RELEASE.release_id, ReleaseRole.STABLE)
        assert (release.hour.inferences, release.hour.errors) == (60, 6)
        assert rig.reporter.engine.stats.unclassed == 1
        await rig.reporter.report()
        assert len(rig.published()) == 1  # nothing changed: not published again
        await rig.dispatch([_sent(_numbered(devices[0], 3))])
        await rig.reporter.report()
        assert rig.published()[-1].releases[0].hour.inferences == 70

    _run(tmp_path, counted)


def test_a_health_breach_is_written_to_the_audit_log_once(tmp_path: Path) -> None:
    async def breach(rig: _Rig) -> None:
        bad = window("cam-0", release=RELEASE.release_id, end=T0, count=100, errors=30)
        await rig.dispatch([_state("cam-0"), _sent(bad)])
        await rig.reporter.report()
        await rig.reporter.report()
        entries = [e for e in rig.core.store.audit_log() if e["event"] == "health_breach"]
        assert len(entries) == 1
        assert entries[0]["rollout"] == "-"
        assert "error_rate:0.300>0.010" in entries[0]["detail"]
        [snapshot] = rig.published()
        assert snapshot.releases[0].health.breach

    _run(tmp_path, breach)


def _retained_snapshot() -> ClassTelemetry:
    """What a coordinator before the restart published: ``RELEASE`` with its reference
    fixed (all answers label 3) and a health breach raised."""
    before = Aggregator({CLASS: DriftPolicy()}, now=T0 - 7200.0)
    before.name({CLASS: {RELEASE.release_id: Named(ReleaseRole.STABLE, RELEASE.health)}})
    old = window(release=RELEASE.release_id, end=T0 - 7200.0, count=2000, labels={"3": 2000})
    before.add(CLASS, old, now=T0 - 7200.0)
    before.tick(T0 - 3600.0)  # its first hour is over: the reference is fixed
    before.add(CLASS, window(release=RELEASE.release_id, end=T0 - 3600.0, errors=50), T0 - 3600.0)
    return before.tick(T0 - 3599.0).classes[CLASS]


def test_a_restart_takes_references_back_from_the_retained_snapshot_before_publishing(
    tmp_path: Path,
) -> None:
    async def restart(rig: _Rig) -> None:
        retained = _retained_snapshot()
        assert retained.releases[0].drift.reference is ReferenceSource.FIRST_HOUR
        assert retained.releases[0].health.breach
        running = asyncio.create_task(rig.reporter.run())
        try:

            def snapshot(hw_class: str, payload: bytes) -> Message:
                topic = topics.class_telemetry(hw_class)
                return Message(topic=topic, payload=payload, retain=True, qos=1)

            summary = window("cam-0", release=RELEASE.release_id, end=T0, errors=50)
            await rig.dispatch(
                [
                    snapshot("medical-cart-cpu", b"\x93junk"),  # refused, logged
                    snapshot("medical-cart-cpu", encode(retained)),  # not that class's
                    snapshot(CLASS, encode(retained)),
                    _state("cam-0"),
                    _sent(summary),
                ]
            )
            rig.core.ready.set()  # the retained topics were read: reports may begin
            while not rig.published():
                await rig.transport.sent.wait()
                rig.transport.sent.clear()
        finally:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
        [release] = rig.published()[0].releases
        was = retained.releases[0]
        assert release.drift.reference is ReferenceSource.FIRST_HOUR
        assert release.drift.reference_labels == was.drift.reference_labels == {"3": 2000}
        assert release.health.breach
        assert release.health.since == was.health.since
        assert not [e for e in rig.core.store.audit_log() if e["event"] == "health_breach"]
        # Once reporting, a retained snapshot restores nothing: the echo of our own is
        # left alone, another one (cleared, or someone else's) is replaced.
        rig.reporter.retained(CLASS, rig.transport.published[-1][1])
        await rig.reporter.report()
        assert len(rig.published()) == 1
        rig.reporter.retained(CLASS, b"")
        await rig.reporter.report()
        assert len(rig.published()) == 2
        assert rig.published()[1].releases[0].drift.reference is ReferenceSource.FIRST_HOUR

    _run(tmp_path, restart)
