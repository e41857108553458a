"""The dashboard in a real headless Chromium against a live fleet (Mosquitto, the
coordinator, agents): it shows a rollout's waves advancing and a rolled-back rollout's
reason, exactly as the broker published them; it cannot publish; hostile payloads are
dropped and counted while the page goes on.

Set ``EDGEFLEET_SCREENSHOTS`` to a folder to keep screenshots of the page
(``dash-*.png``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import msgpack
from playwright.async_api import Page

from dashboard import DashboardServer
from edgefleet.dashcli import dashboard_config
from edgefleet.fleet import Fleet
from models import DemoModel
from schemas import (
    LanePhase,
    LaneStatus,
    Mode,
    Phase,
    RolloutStatus,
    WaveCounts,
    encode,
    topics,
)
from schemas.topics import DeviceChannel
from tests.coordinator.records import device_state
from tests.dashboard.browser import chromium, until
from tests.integration.fleetkit import (
    INTEL,
    JETSON,
    WAVES,
    MakeFleet,
    Wire,
    canaries_of,
    coordinator_session,
    live,
    roll_out,
    run,
)

GUARD_MS: Final = 90_000
"""How long the page may take to show something (a hang guard only)."""
NOT_AUTHORIZED: Final = 0x87


@contextlib.asynccontextmanager
async def dashboard(fleet: Fleet, tg: asyncio.TaskGroup) -> AsyncIterator[Page]:
    """The fleet's dashboard served (``edgefleet dashboard``'s settings) and open in
    Chromium, connected to the broker. No page error may have happened by its end."""
    config = dashboard_config(fleet.home, port=0, data=fleet.workdir / "coordinator")
    server = DashboardServer(config)
    task = tg.create_task(server.run())
    await server.serving.wait()
    try:
        async with chromium(server.url) as browser:
            page = browser.page
            await until(
                page, "window.edgefleet?.stats.link === 'connected'", what="the broker link"
            )
            yield page
            assert browser.errors == []
    finally:
        task.cancel()


async def shoot(page: Page, name: str) -> None:
    folder = os.environ.get("EDGEFLEET_SCREENSHOTS")
    if folder:
        await page.screenshot(path=str(Path(folder) / f"dash-{name}.png"), full_page=True)


def lane_history(statuses: list[RolloutStatus], hw_class: str) -> list[tuple[str, int]]:
    """A class's (phase, wave) as the rollout's statuses went, repeats collapsed."""
    seen: list[tuple[str, int]] = []
    for status in statuses:
        lane = status.lanes.get(hw_class)
        if lane is not None and (not seen or seen[-1] != (lane.phase.value, lane.wave)):
            seen.append((lane.phase.value, lane.wave))
    return seen


async def page_history(page: Page, rollout_id: str, hw_class: str) -> list[tuple[str, int]]:
    """What the page's timeline of the rollout says about a class, oldest first."""
    entries: list[list[Any]] = await page.evaluate(
        """([id, cls]) => [...document.querySelectorAll(
               `[data-rollout="${id}"] details.timeline li[data-class="${cls}"]`)]
             .map((li) => [li.dataset.phase, Number(li.dataset.wave)]).reverse()""",
        [rollout_id, hw_class],
    )
    return [(str(phase), int(wave)) for phase, wave in entries]


async def until_phase(page: Page, rollout_id: str, phase: Phase) -> None:
    await page.wait_for_selector(
        f'[data-rollout="{rollout_id}"][data-phase="{phase.value}"]', timeout=GUARD_MS
    )


def test_page_shows_waves_advancing_and_a_rollbacks_reason(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 3, INTEL: 3})
    run(_rollouts(fleet, demo_models))


async def _rollouts(fleet: Fleet, demo_models: dict[str, DemoModel]) -> None:
    async with (
        live(fleet) as tg,
        Wire.open(fleet.home) as wire,
        fleet.operator() as operator,
        dashboard(fleet, tg) as page,
    ):
        await roll_out(operator, fleet, wire, demo_models["digits-v1"], rollout_id="install-v1")
        await roll_out(
            operator,
            fleet,
            wire,
            demo_models["digits-v2"],
            rollout_id="upgrade-v2",
            waves=WAVES,
            canaries=canaries_of(fleet),
        )
        await until_phase(page, "upgrade-v2", Phase.COMPLETED)
        await shoot(page, "waves")
        for hw_class in fleet.classes:
            published = lane_history(wire.statuses["upgrade-v2"], hw_class)
            shown = await page_history(page, "upgrade-v2", hw_class)
            assert shown == published, hw_class
            waves = [wave for phase, wave in shown if phase == "wave"]
            assert len(set(waves)) >= 2, f"{hw_class}: no wave advanced: {shown}"
            assert waves == sorted(waves)
            assert shown[-1][0] == "completed"

        final = await roll_out(
            operator,
            fleet,
            wire,
            demo_models["digits-v2-slow"],
            rollout_id="bad-build",
            waves=WAVES,
            canaries=canaries_of(fleet),
            expect=Phase.ROLLED_BACK,
        )
        await until_phase(page, "bad-build", Phase.ROLLED_BACK)
        card = page.locator('[data-rollout="bad-build"]')
        assert final.reason is not None
        assert "p95_latency_ms" in final.reason
        assert await card.locator(".reason-text").text_content() == final.reason
        assert await card.locator(".cause").text_content() == "unhealthy"
        for hw_class, lane in final.lanes.items():
            row = card.locator(f'table.lanes tr[data-class="{hw_class}"]')
            assert await row.get_attribute("data-phase") == "rolled_back"
            assert lane.reason is not None
            assert lane.reason in (await row.locator("td.why").text_content() or "")
            assert await row.locator("ol.waves li.failed").count() == 1

        # The audit trail, read by the dashboard's server from the coordinator's log.
        await page.wait_for_selector(
            'table.audit tr[data-rollout="bad-build"][data-event="roll_back"]', timeout=GUARD_MS
        )
        # The devices, searchable: every one is listed, a class filters them.
        rows = "document.querySelectorAll('table.devices tr[data-device]').length"
        await until(page, f"{rows} === 6", what="every device listed")
        await page.select_option('select[data-filter="cls"]', JETSON)
        await until(page, f"{rows} === 3", what="the class's devices")
        shown_ids = await page.eval_on_selector_all(
            "table.devices tr[data-device]", "rows => rows.map(r => r.dataset.device)"
        )
        assert shown_ids == sorted(d for d, c in fleet.home.devices().items() if c == JETSON)
        await page.select_option('select[data-filter="cls"]', "")
        await until(page, f"{rows} === 6", what="every device listed again")
        await shoot(page, "rollback")


def test_page_cannot_publish(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({JETSON: 1})
    run(_publish_refused(fleet))


async def _publish_refused(fleet: Fleet) -> None:
    forged = [
        topics.rollout_spec("forged"),
        topics.class_manifest(JETSON),
        topics.device("jetson-000", DeviceChannel.STATE),
        topics.trust(),
    ]
    async with (
        asyncio.TaskGroup() as tg,
        Wire.open(fleet.home, filters=(f"{topics.PREFIX}/#",)) as wire,
        dashboard(fleet, tg) as page,
    ):
        for topic in forged:
            for retain in (False, True):
                answer = await page.evaluate(
                    """([topic, retain]) => new Promise((resolve) =>
                         window.edgefleet.client.publish(topic, "forged by the page",
                           { qos: 1, retain },
                           (error, packet) => resolve({
                             code: error ? error.code : packet?.reasonCode ?? 0,
                             version: window.edgefleet.client.options.protocolVersion })))""",
                    [topic, retain],
                )
                assert answer == {"code": NOT_AUTHORIZED, "version": 5}, (topic, retain)
        # A barrier: the broker handled every forged PUBLISH before its PUBACK, so had it
        # delivered one, the wire would have it before this later message.
        barrier = topics.device("jetson-000", DeviceChannel.EVENTS)
        async with coordinator_session(fleet.home) as admin:
            await admin.publish(barrier, b"barrier")
        await wire.until(lambda: any(m.topic == barrier for m in wire.raw), what="the barrier")
        assert [m for m in wire.raw if m.payload == b"forged by the page"] == []


def test_page_drops_hostile_payloads_and_goes_on(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({JETSON: 2})
    run(_hostile(fleet))


def _state(device_id: str, mode: Mode) -> bytes:
    return encode(
        device_state(device_id, hw_class=JETSON, mode=mode, applied_seq=0, updated_at=1.0)
    )


async def _hostile(fleet: Fleet) -> None:
    first, second = sorted(fleet.home.devices())
    wrong_kind = encode_raw({"v": 1, "kind": "trust", "body": b"", "sigs": []})
    hostile = [
        (topics.device(first, DeviceChannel.STATE), b"\xc1 not msgpack"),
        (topics.device(first, DeviceChannel.HEALTH), encode_raw({"v": 2, "device_id": first})),
        (topics.device(first, DeviceChannel.TELEMETRY), encode_raw({"v": 1, "count": "many"})),
        (topics.device(first, DeviceChannel.PRESENCE), b"<script>alert(1)</script>"),
        (topics.rollout_status("junk"), encode_raw([1, 2, 3])),
        (topics.class_manifest(JETSON), wrong_kind),
        (topics.rollout_status("huge"), b"\x00" * (300 * 1024)),
    ]
    async with (
        asyncio.TaskGroup() as tg,
        dashboard(fleet, tg) as page,
        coordinator_session(fleet.home) as admin,
    ):
        await admin.publish(topics.device(first, DeviceChannel.STATE), _state(first, Mode.IDLE))
        await page.wait_for_selector(f'tr[data-device="{first}"]', timeout=GUARD_MS)
        for topic, payload in hostile:
            await admin.publish(topic, payload)
        # One publisher's messages reach a subscriber in order: once this one shows, the
        # page has taken every hostile one before it.
        await admin.publish(topics.device(second, DeviceChannel.STATE), _state(second, Mode.IDLE))
        await page.wait_for_selector(f'tr[data-device="{second}"]', timeout=GUARD_MS)
        stats = await page.evaluate("window.edgefleet.stats")
        assert stats["dropped"] == len(hostile), stats
        assert await page.evaluate("document.title") == "edgefleet dashboard"
        assert await page.locator("script").count() == 3  # nothing written into the page ran
        await shoot(page, "hostile")
        # A rollout soaking its candidate in shadow: the class's agreement is shown.
        await admin.publish(topics.rollout_status("shadowed"), encode(_shadowed()))
        row = page.locator(f'#rollouts tr[data-class="{JETSON}"]').first
        await row.wait_for(timeout=GUARD_MS)
        assert "shadow agreement 75.0% of 400" in (await row.inner_text())
        # The coordinator's aggregate (classes/{class}/telemetry): charted as it is published.
        view = await page.evaluate(AGGREGATE)
        assert view["release"] == "digits-v2:fp32@0123456789ab"
        assert view["points"] == 2
        assert view["latest"]["rate"] == 12.5
        assert view["latest"]["p95"] == 3.0
        assert view["drift"]["alert"] is True
        assert view["breach"]["breach"] is False


def _shadowed() -> RolloutStatus:
    counts = WaveCounts(members=4, targeted=4, healthy=3, shadow_inferences=400, agreed=300)
    lane = LaneStatus(phase=LanePhase.WAVE, wave=0, cutoff_bp=2500, counts=counts)
    return RolloutStatus(
        id="shadowed",
        generation=1,
        phase=Phase.WAVE,
        wave=0,
        waves_percent=(25.0, 100.0),
        counts=counts,
        classes=(JETSON,),
        lanes={JETSON: lane},
        updated_at=1.0,
    )


AGGREGATE: Final = """() => {
  const stats = (rate) => ({ seconds: 60, observed_s: 60, inferences: 750, errors: 0,
    rate_per_s: rate, error_rate: 0, p50_ms: 1, p95_ms: 3, p99_ms: 4,
    confidence: [0, 0, 0, 0, 0, 0, 0, 0, 5, 745], labels: { "7": 700, "1": 50 } });
  const aggregate = (at, rate) => ({ v: 1, hw_class: "c", at, unattributed: 0, releases: [{
    v: 1, release: "digits-v2:fp32@0123456789ab", role: "stable", rollout_id: null,
    first_seen: 1, last_seen: at, minute: stats(rate), hour: stats(rate),
    drift: { reference: "rollout", confidence_psi: 0.4, labels_psi: 0.1, psi_threshold: 0.25,
             alert: true, since: at, window_s: 60 },
    health: { budget: null, window_s: 60, breach: false, reasons: [], since: null } }] });
  const book = window.edgefleet.book;
  book.takeAggregate("c", MessagePack.encode(aggregate(100, 10)));
  book.takeAggregate("c", MessagePack.encode(aggregate(110, 12.5)));
  const [v] = book.view("c", 120);
  return { release: v.release, points: v.points.length, latest: v.latest, drift: v.drift,
           breach: v.breach };
}"""


def encode_raw(value: object) -> bytes:
    """Any value in msgpack, as a hostile publisher would send it."""
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed
