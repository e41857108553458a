"""``edgefleet tail`` against a real Mosquitto, as an operator runs it: with the read-only
accounts (``watcher`` on the services listener, ``dashboard`` over WebSockets), retained
topics first, then live ones; signed documents checked against the home's trust."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from edgefleet.cli import main
from edgefleet.fleet import Fleet
from edgefleet.home import DASHBOARD, WATCHER
from schemas import (
    MANIFEST_KIND,
    DeviceState,
    KeyPair,
    LogHistogram,
    Manifest,
    Role,
    TelemetrySummary,
    encode,
    seal,
    topics,
)
from schemas.topics import DeviceChannel
from tests.coordinator.records import device_state
from tests.integration.fleetkit import (
    INTEL,
    JETSON,
    MakeFleet,
    coordinator_session,
    publish_manifest,
    run,
)


def _state(device_id: str, updated_at: float) -> DeviceState:
    return device_state(device_id, hw_class=JETSON, applied_seq=0, updated_at=updated_at)


def _summary(n: int) -> TelemetrySummary:
    now = time.time()
    return TelemetrySummary(
        summary_id=f"live-{n}",
        device_id="jetson-000",
        release=None,
        window_start=now - 1,
        window_end=now,
        count=3,
        errors=0,
        latency_ms=LogHistogram.of([0.5, 0.7, 0.9]),
        confidence=(0,) * 9 + (3,),
        labels={"7": 3},
    )


def _retained(fleet: Fleet) -> None:
    """What the broker holds before ``tail`` starts: two manifests (one forged), a
    device's state, an old state of another, a health report that does not decode, and
    a spec (which read-only accounts may not read)."""
    home = fleet.home
    now = time.time()

    async def publish() -> None:
        async with coordinator_session(home) as cloud:
            good = Manifest(
                hw_class=JETSON, seq=1, issued_at=now, expires_at=now + 600, stable=None
            )
            forged = good.model_copy(update={"hw_class": INTEL, "seq": 9})
            await publish_manifest(
                cloud, JETSON, seal(MANIFEST_KIND, encode(good), [home.key(Role.MANIFEST)])
            )
            await publish_manifest(
                cloud, INTEL, seal(MANIFEST_KIND, encode(forged), [KeyPair.generate()])
            )
            state = topics.device("jetson-000", DeviceChannel.STATE)
            await cloud.publish(state, encode(_state("jetson-000", now)), retain=True)
            old = topics.device("jetson-old", DeviceChannel.STATE)
            await cloud.publish(old, encode(_state("jetson-old", now - 7200)), retain=True)
            health = topics.device("jetson-000", DeviceChannel.HEALTH)
            await cloud.publish(health, b"\x92\x01\x02", retain=True)
            await cloud.publish(topics.rollout_spec("r1"), b"spec bytes", retain=True)

    run(publish())


def _lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


def _by_topic(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {line["topic"]: line for line in lines}


def _check_retained(lines: list[dict[str, Any]]) -> None:
    seen = _by_topic(lines)
    assert set(seen) == {
        topics.class_manifest(JETSON),
        topics.class_manifest(INTEL),
        topics.device("jetson-000", DeviceChannel.STATE),
        topics.device("jetson-000", DeviceChannel.HEALTH),
    }, "the spec is not for read-only accounts; the old state is older than --since"
    assert all(line["retained"] for line in lines)
    good = seen[topics.class_manifest(JETSON)]
    assert (good["signed"]["verified"], good["message"]["seq"]) == (True, 1)
    assert good["signed"]["signers"][0]["roles"] == ["manifest"]
    forged = seen[topics.class_manifest(INTEL)]
    assert forged["signed"]["verified"] is False
    assert forged["signed"]["error"]["reason"] == "unknown_key"
    state = seen[topics.device("jetson-000", DeviceChannel.STATE)]
    assert state["message"]["device_id"] == "jetson-000"
    assert state["channel"] == "deviceState"
    health = seen[topics.device("jetson-000", DeviceChannel.HEALTH)]
    assert health["error"]["reason"] == "malformed"


def test_tail_as_the_watcher_prints_retained_then_live_messages_as_json_lines(
    make_fleet: MakeFleet, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = make_fleet({JETSON: 1})
    _retained(fleet)
    argv = ["--home", str(fleet.home.root), "tail", "#", "--since", "10m"]

    async def scenario() -> int:
        tail = asyncio.create_task(
            asyncio.to_thread(main, [*argv, "--count", "5", "--timeout", "60"])
        )
        # Live telemetry reaches only a subscribed reader: publish until tail has one
        # (its fifth line, after the four retained), a bounded number of times.
        async with coordinator_session(fleet.home) as device:
            telemetry = topics.device("jetson-000", DeviceChannel.TELEMETRY)
            for n in range(300):
                if tail.done():
                    break
                await device.publish(telemetry, encode(_summary(n)))
                await asyncio.sleep(0.2)
        return await tail

    assert run(scenario()) == 0
    lines = _lines(capsys.readouterr().out)
    assert len(lines) == 5
    _check_retained(lines[:4])
    live = lines[4]
    assert live["retained"] is False
    assert live["channel"] == "deviceTelemetry"
    assert live["message"]["summary_id"].startswith("live-")
    assert live["message"]["labels"] == {"7": 3}


@pytest.mark.parametrize("account", [WATCHER, DASHBOARD])
def test_tail_reads_with_either_read_only_account(
    make_fleet: MakeFleet, capsys: pytest.CaptureFixture[str], account: str
) -> None:
    fleet = make_fleet({JETSON: 1})
    _retained(fleet)
    argv = ["--home", str(fleet.home.root), "tail", "--account", account, "#", "--since", "1h"]
    assert main([*argv, "--count", "4", "--timeout", "60"]) == 0
    _check_retained(_lines(capsys.readouterr().out))


def test_tail_raw_prints_the_bytes_and_a_short_count_ends_at_the_timeout(
    make_fleet: MakeFleet, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = make_fleet({JETSON: 1})
    _retained(fleet)
    home = str(fleet.home.root)
    health = topics.device("jetson-000", DeviceChannel.HEALTH)
    argv = ["--home", home, "tail", "devices/+/health", "--hex", "--count", "2", "--timeout", "3"]
    assert main(argv) == 1  # one retained health report, not two
    (line,) = _lines(capsys.readouterr().out)
    assert (line["topic"], line["encoding"], line["payload"]) == (health, "hex", "920102")

    with pytest.raises(SystemExit) as refused:
        main(["--home", home, "tail", "devices/#/state"])
    assert refused.value.code == 2
    assert "invalid topic filter" in capsys.readouterr().err
