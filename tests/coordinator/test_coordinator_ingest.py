"""The coordinator's ingest (``coordinator.ingest``) taking bursts as batches, over a
scripted transport whose messages all wait from the start, a real store and a real fleet
view: a long batch is read in a thread and applied in the order it arrived, so a fence
counts only once every message before it is applied; a bad message drops only itself."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from broker.transport import Message
from coordinator import CoordinatorLimits
from coordinator.clock import Settling
from coordinator.core import Core
from coordinator.fetching import Fetcher
from coordinator.fleet import FleetView
from coordinator.ingest import Ingest
from coordinator.intake import Intake
from coordinator.keeper import Keeper
from coordinator.ledger import TELEMETRY_FILENAME, TelemetryLedger
from coordinator.metrics import Counters
from coordinator.signer import Signer
from schemas import (
    OFFLINE,
    ONLINE,
    KeyPair,
    encode,
    topics,
)
from schemas.codec import MAX_MESSAGE_BYTES
from schemas.errors import MAX_DETAIL_CHARS
from schemas.topics import DeviceChannel
from tests.coordinator.kit import ScriptedTransport, make_config
from tests.coordinator.records import T0, device_state, health_report
from tests.coordinator.summaries import numbered


@dataclass
class _Watched(Settling):
    """Settling that notes, each time a fence settles the view, which devices had a
    state applied by then."""

    fleet: FleetView = field(default_factory=FleetView)
    seen: list[set[str]] = field(default_factory=list)

    def came_back(self, payload: bytes) -> bool:
        settled = super().came_back(payload)
        if settled:
            self.seen.append({d for d, v in self.fleet.devices.items() if v.state is not None})
        return settled


@dataclass
class _Rig:
    core: Core
    ingest: Ingest
    counters: Counters
    ledger: TelemetryLedger
    settling: _Watched

    def fence(self) -> Message:
        """This connection's fence, as it comes back from the broker."""
        payload = self.settling.linked(1, 0.0)
        return Message(topic=topics.coordinator_fence(), payload=payload, retain=False, qos=1)

    async def dispatch(self, incoming: list[Message]) -> None:
        """Hand ``incoming`` to the ingest, all waiting at once; return once handled."""
        transport = ScriptedTransport(fail=False, incoming=incoming, ends=True)
        await self.ingest.dispatch(transport)

    def states(self) -> set[str]:
        return {d for d, v in self.core.fleet.devices.items() if v.state is not None}


@asynccontextmanager
async def _rig(tmp_path: Path, **limits: Any) -> AsyncIterator[_Rig]:
    config = make_config(tmp_path, KeyPair.generate(), limits=CoordinatorLimits(**limits))
    core = Core(config, clock=lambda: T0)
    settling = core.settling = _Watched(nonce="n", resend_s=10.0, fleet=core.fleet)
    counters = Counters()
    ledger = TelemetryLedger(tmp_path / TELEMETRY_FILENAME, counters=counters, clock=lambda: T0)
    fetcher = Fetcher(core)
    keeper = Keeper(core, fetcher)
    intake = Intake(core, fetcher, keeper, Signer(core))
    ingest = Ingest(core, intake, keeper, ledger=ledger, counters=counters)
    try:
        yield _Rig(core, ingest, counters, ledger, settling)
    finally:
        core.store.close()


def _run(tmp_path: Path, test: Callable[[_Rig], Coroutine[Any, Any, None]], **limits: Any) -> None:
    async def main() -> None:
        async with asyncio.timeout(10.0), _rig(tmp_path, **limits) as rig:
            await test(rig)

    asyncio.run(main())


def _device(device_id: str, channel: DeviceChannel, payload: bytes) -> Message:
    return Message(topic=topics.device(device_id, channel), payload=payload, retain=True, qos=1)


def _state(device_id: str, seq: int = 3) -> Message:
    state = device_state(device_id).model_copy(update={"applied_seq": seq})
    return _device(device_id, DeviceChannel.STATE, encode(state))


def _health(device_id: str) -> Message:
    report = health_report(device_id)
    return _device(device_id, DeviceChannel.HEALTH, encode(report))


def _telemetry(device_id: str, *, sender: str | None = None) -> Message:
    """A numbered summary of ``device_id`` published on ``sender``'s channel."""
    summary = numbered(1).model_copy(update={"device_id": device_id})
    return _device(sender or device_id, DeviceChannel.TELEMETRY, encode(summary))


def test_a_fence_behind_a_burst_counts_only_once_the_burst_before_it_is_applied(
    tmp_path: Path,
) -> None:
    before = [f"cam-a{i:03d}" for i in range(40)]
    after = [f"cam-b{i:03d}" for i in range(40)]

    async def burst(rig: _Rig) -> None:
        incoming = [*map(_state, before), rig.fence(), *map(_state, after)]
        await rig.dispatch(incoming)
        assert rig.settling.seen == [set(before)]
        assert rig.states() == {*before, *after}
        # One batch of all 81, read in one thread hop.
        counters = rig.counters
        assert (counters.ingest_batches, counters.ingest_batches_threaded) == (1, 1)
        assert counters.ingest_messages_threaded == 81

    _run(tmp_path, burst)


def test_a_fence_in_a_later_batch_counts_after_every_batch_before_it(tmp_path: Path) -> None:
    before = [f"cam-a{i:03d}" for i in range(25)]

    async def batches(rig: _Rig) -> None:
        incoming = [*map(_state, before), rig.fence(), *(_state(f"cam-b{i}") for i in range(10))]
        await rig.dispatch(incoming)
        assert rig.settling.seen == [set(before)]
        # 36 messages in batches of 10: three read in a thread, the last 6 on the loop.
        counters = rig.counters
        assert (counters.ingest_batches, counters.ingest_batches_threaded) == (4, 3)
        assert counters.ingest_messages_threaded == 30

    _run(tmp_path, batches, ingest_batch=10, ingest_thread_min=10)


def test_a_device_s_messages_in_one_batch_are_applied_in_the_order_they_came(
    tmp_path: Path,
) -> None:
    async def ordered(rig: _Rig) -> None:
        clear = b""
        incoming = [
            *(_state(f"cam-{i:03d}") for i in range(20)),  # a burst: read in a thread
            _state("cam-kept", seq=1),
            _device("cam-kept", DeviceChannel.PRESENCE, ONLINE),
            _state("cam-kept", seq=2),
            _device("cam-kept", DeviceChannel.STATE, clear),
            _state("cam-kept", seq=4),
            _device("cam-kept", DeviceChannel.PRESENCE, OFFLINE),
            _state("cam-gone", seq=5),
            _device("cam-gone", DeviceChannel.PRESENCE, ONLINE),
            _device("cam-gone", DeviceChannel.STATE, clear),
            _telemetry("cam-kept"),
        ]
        await rig.dispatch(incoming)
        assert rig.counters.ingest_batches_threaded == 1
        kept = rig.core.fleet.devices["cam-kept"]
        assert kept.state is not None
        assert (kept.state.applied_seq, kept.online) == (4, False)
        assert "cam-gone" not in rig.core.fleet.devices
        assert rig.ledger.mark("cam-kept") is not None
        assert rig.counters.messages_dropped == 0

    _run(tmp_path, ordered)


def test_hostile_messages_in_a_burst_drop_only_themselves_with_bounded_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = [f"cam-{i:03d}" for i in range(20)]
    hostile = [
        _device("cam-junk", DeviceChannel.STATE, b"\xc1 not msgpack"),
        _device("cam-wrong", DeviceChannel.STATE, _health("cam-wrong").payload),
        _device("cam-huge", DeviceChannel.HEALTH, b"\x00" * (MAX_MESSAGE_BYTES + 1)),
        Message(
            topic=topics.device("cam-x", DeviceChannel.STATE).replace("cam-x", "x/" * 4000),
            payload=_state("cam-x").payload,
            retain=True,
            qos=1,
        ),
        _telemetry("cam-000", sender="cam-001"),  # another device's summary: not counted
    ]

    async def flood(rig: _Rig) -> None:
        incoming = [_state(good[0]), *hostile[:3], *map(_state, good[1:]), *hostile[3:]]
        incoming.append(_health("cam-001"))
        with caplog.at_level(logging.WARNING):
            await rig.dispatch(incoming)
        assert rig.counters.ingest_batches_threaded == 1
        assert rig.states() == set(good)
        assert rig.core.fleet.devices["cam-001"].health is not None
        assert rig.ledger.mark("cam-000") is None
        assert rig.counters.messages_dropped == len(hostile)

    _run(tmp_path, flood)
    dropped = [r.getMessage() for r in caplog.records if r.name == "coordinator.ingest"]
    assert len(dropped) == len(hostile) - 1  # the misdirected summary is counted, not logged
    assert all(m.startswith("coordinator: dropped ") for m in dropped), dropped
    assert max(len(m) for m in dropped) < 3 * MAX_DETAIL_CHARS
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_few_messages_are_read_on_the_loop(tmp_path: Path) -> None:
    async def few(rig: _Rig) -> None:
        await rig.dispatch([_state("cam-1"), _health("cam-1"), rig.fence()])
        assert rig.settling.seen == [{"cam-1"}]
        counters = rig.counters
        assert (counters.ingest_batches, counters.ingest_batches_threaded) == (1, 0)

    _run(tmp_path, few)


def test_batch_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="ingest_batch"):
        CoordinatorLimits(ingest_batch=0)
    with pytest.raises(ValueError, match="ingest_thread_min"):
        CoordinatorLimits(ingest_thread_min=0)
