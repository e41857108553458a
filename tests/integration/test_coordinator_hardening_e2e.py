"""The coordinator against hostile input and a damaged cache, on a real broker: staged
uploads checked before devices see them, one device or spec unable to stop it (nor its
stored record on a restart), refusals visible, the broker's cache watched and repaired,
and artifacts no manifest names cleared."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import pytest

from coordinator import CoordinatorLimits
from coordinator.operator import publish_artifact
from coordinator.rollout import RolloutRecord
from coordinator.store import CoordinatorStore
from edgefleet.fleet import Fleet
from models import DemoModel
from schemas import (
    ONLINE,
    Desired,
    DeviceState,
    HealthReport,
    Phase,
    Role,
    RolloutStatus,
    Verdict,
    encode,
    seal,
    split_artifact,
    topics,
)
from schemas.device import Mode
from schemas.rollout import MAX_REASON_CHARS, ROLLOUT_SPEC_KIND
from schemas.topics import DeviceChannel
from tests.integration.fleetkit import (
    JETSON,
    MakeFleet,
    Wire,
    audit_log,
    coordinator_session,
    live,
    publish_spec,
    release_id,
    run,
    signed_spec,
    spec_for,
    stop_coordinator,
)

DEVICE = "jetson-000"


def _status(wire: Wire, rollout_id: str, phase: Phase) -> RolloutStatus | None:
    statuses = wire.statuses.get(rollout_id, [])
    return statuses[-1] if statuses and statuses[-1].phase is phase else None


def _rejected(wire: Wire, rollout_id: str) -> Callable[[], RolloutStatus | None]:
    return lambda: _status(wire, rollout_id, Phase.REJECTED)


def _retained(wire: Wire) -> dict[str, bytes]:
    """What the broker retains under the wire's filters (the latest of each topic)."""
    return {m.topic: m.payload for m in wire.raw if m.retain}


async def _admitted(fleet: Fleet, v2: DemoModel, rollout_id: str = "r") -> bytes:
    """Upload ``v2`` as the operator does (to staging) with a signed spec; wait for the
    rollout's first wave (its manifest out). Returns the spec bytes."""
    async with fleet.operator() as operator, Wire.open(fleet.home) as wire:
        await publish_artifact(operator, v2.path.read_bytes(), name=v2.name, chunk_size=4096)
        spec = spec_for(v2, rollout_id=rollout_id, classes=(JETSON,))
        payload = await publish_spec(operator, fleet.home, spec)
        await wire.until(lambda: _status(wire, rollout_id, Phase.WAVE), what="admitted")
        await wire.until(
            lambda: any(
                m.rollout is not None and m.rollout.id == rollout_id
                for m in wire.verified_manifests(JETSON)
            ),
            what="the first wave's manifest",
        )
    return payload


# -- rule 5: staging ----------------------------------------------------------------------


def test_staged_upload_is_checked_then_published_under_artifacts_and_cleared(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 1})
    run(_staged(fleet, demo_models["digits-v2"]))


async def _staged(fleet: Fleet, v2: DemoModel) -> None:
    data = v2.path.read_bytes()
    _, chunks = split_artifact(data, name=v2.name, chunk_size=4096)
    filters = (topics.staging_chunks(v2.sha256), topics.artifact_chunks(v2.sha256))
    async with live(fleet, agents=()):
        await _admitted(fleet, v2)

        def settled(wire: Wire) -> dict[str, bytes] | None:
            seen = _retained(wire)
            staged = [t for t in seen if t.startswith("fleet/v1/staging/")]
            return seen if len(seen) == len(chunks) + 1 and not staged else None

        # Read afresh until the staged upload is gone and artifacts/ holds the bytes.
        deadline = time.monotonic() + 30.0
        while True:
            async with Wire.open(fleet.home, filters=filters) as wire:
                await asyncio.sleep(0.5)
                seen = settled(wire)
            if seen is not None or time.monotonic() > deadline:
                break
        assert seen is not None, "staging not cleared, or artifacts/ incomplete"
        assert [seen[topics.artifact_chunk(v2.sha256, i)] for i in range(len(chunks))] == chunks
        assert topics.artifact_meta(v2.sha256) in seen


# -- rule 1: one device, one spec, one stored record ------------------------------------


def test_device_with_long_reasons_cannot_stop_the_coordinator_nor_its_restart(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 1})
    run(_long_reasons(fleet, demo_models["digits-v2"]))


async def _long_reasons(fleet: Fleet, v2: DemoModel) -> None:
    async with live(fleet, agents=()) as tg, Wire.open(fleet.home) as wire:
        await _admitted(fleet, v2)
        now = time.time()
        state = DeviceState(
            device_id=DEVICE,
            hw_class=JETSON,
            mode=Mode.SERVING,
            active_release=None,
            active_sha256=v2.sha256,
            target_release=None,
            rollout_id="r",
            applied_seq=1,
            trust_version=1,
            inferences_total=0,
            last_inference_at=None,
            last_rejection=None,
            updated_at=now,
        )
        # Schema-valid extremes: 16 reasons of 200 characters each.
        report = HealthReport(
            report_id=uuid.uuid4().hex,
            device_id=DEVICE,
            rollout_id="r",
            manifest_seq=1,
            release=release_id(v2),
            verdict=Verdict.UNHEALTHY,
            reasons=tuple(f"p95_latency_ms:{'9' * 182}>{i:02d}" for i in range(16)),
            inferences=10,
            errors=0,
            p95_latency_ms=1.0,
            soak_seconds=1.0,
            at=now,
        )
        async with coordinator_session(fleet.home) as device:
            await device.publish(topics.device(DEVICE, DeviceChannel.PRESENCE), ONLINE, retain=True)
            await device.publish(
                topics.device(DEVICE, DeviceChannel.STATE), encode(state), retain=True
            )
            await device.publish(
                topics.device(DEVICE, DeviceChannel.HEALTH), encode(report), retain=True
            )
        final = await wire.until(lambda: _status(wire, "r", Phase.ROLLED_BACK), what="rollback")
        assert final.reason is not None
        assert DEVICE in final.reason
        assert len(final.reason) <= MAX_REASON_CHARS
        assert fleet.coordinator_task is not None
        assert not fleet.coordinator_task.done()

        # A record stored by an earlier version with an unbounded reason: the restarted
        # coordinator publishes it bounded instead of failing on it at every start.
        await stop_coordinator(fleet)
        store = CoordinatorStore(fleet.workdir / "coordinator" / "coordinator.json")
        record: RolloutRecord = store.rollouts()["r"]
        store.put_rollout(record.model_copy(update={"reason": "x" * 5000, "updated_at": now + 1}))
        store.close()
        wire.statuses.clear()
        fleet.start_coordinator(tg)

        def restated_status() -> RolloutStatus | None:
            latest = wire.statuses.get("r", [])
            return latest[-1] if latest and latest[-1].updated_at == now + 1 else None

        restated = await wire.until(restated_status, what="the stored record re-asserted")
        assert restated.reason is not None
        assert len(restated.reason) == MAX_REASON_CHARS
        await asyncio.sleep(1.0)
        assert not fleet.coordinator_task.done()


def test_signed_spec_naming_64_unknown_classes_is_rejected_and_the_next_admitted(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 1})
    run(_unknown_classes(fleet, demo_models["digits-v2"]))


async def _unknown_classes(fleet: Fleet, v2: DemoModel) -> None:
    classes = tuple(f"c{i:02d}{'x' * 61}" for i in range(64))
    async with (
        live(fleet, agents=()),
        fleet.operator() as operator,
        Wire.open(fleet.home) as wire,
    ):
        await publish_spec(operator, fleet.home, spec_for(v2, rollout_id="u", classes=classes))
        rejected = await wire.until(lambda: _status(wire, "u", Phase.REJECTED), what="rejected")
        assert "unknown classes" in (rejected.reason or "")
        assert len(rejected.reason or "") <= MAX_REASON_CHARS
        await _admitted(fleet, v2)
        assert fleet.coordinator_task is not None
        assert not fleet.coordinator_task.done()


# -- rule 9: refusals are visible, and logged once -------------------------------------


def test_refused_specs_get_a_rejected_status_reported_once(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 1})
    run(_refused(fleet, demo_models["digits-v2"]))
    refusals = [e for e in audit_log(fleet) if e["event"] == "spec_rejected"]
    assert sorted(e["rollout"] for e in refusals) == ["forged", "replayed"], refusals


async def _refused(fleet: Fleet, v2: DemoModel) -> None:
    async with live(fleet, agents=()) as tg, fleet.operator() as operator:
        async with Wire.open(fleet.home) as wire:
            # Signed by the manifest key, which may not sign specs.
            forged = spec_for(v2, rollout_id="forged", classes=(JETSON,))
            await operator.publish(
                topics.rollout_spec("forged"),
                seal(ROLLOUT_SPEC_KIND, encode(forged), [fleet.home.key(Role.MANIFEST)]),
                retain=True,
            )
            # A genuine spec of rollout "a", replayed under the id "replayed".
            genuine = signed_spec(fleet.home, spec_for(v2, rollout_id="a", classes=(JETSON,)))
            await operator.publish(topics.rollout_spec("replayed"), genuine, retain=True)
            for rollout_id in ("forged", "replayed"):
                status = await wire.until(_rejected(wire, rollout_id), what=rollout_id)
                assert status.reason is not None
                assert status.reason.startswith("spec refused"), status.reason
        # A restart redelivers the retained specs: refused again, not reported again.
        await stop_coordinator(fleet)
        async with Wire.open(fleet.home, filters=(topics.coordinator_presence(),)) as wire:
            fleet.start_coordinator(tg)
            await wire.until(
                lambda: any(m.payload == ONLINE and not m.retain for m in wire.raw),
                what="the coordinator back",
            )
            await asyncio.sleep(1.5)


def test_a_flood_of_junk_specs_costs_a_bounded_store_and_broker(
    make_fleet: MakeFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = make_fleet({JETSON: 1})
    start = fleet.start_coordinator
    monkeypatch.setattr(
        fleet,
        "start_coordinator",
        lambda tg, **changes: start(tg, limits=CoordinatorLimits(refusals_kept=2), **changes),
    )
    run(_flood(fleet))
    store = CoordinatorStore(fleet.workdir / "coordinator" / "coordinator.json")
    try:
        assert sorted(store.refusals()) == ["junk-2", "junk-3"]
    finally:
        store.close()


async def _flood(fleet: Fleet) -> None:
    ids = [f"junk-{i}" for i in range(4)]
    filters = (topics.all_rollout_specs(), topics.all_rollout_statuses())
    async with live(fleet, agents=()), fleet.operator() as operator:
        async with Wire.open(fleet.home, filters=filters) as wire:
            for rollout_id in ids:
                await operator.publish(topics.rollout_spec(rollout_id), b"junk", retain=True)
                await wire.until(_rejected(wire, rollout_id), what=rollout_id)
            # The oldest refusals are forgotten, their junk spec and status cleared.
            await wire.until(
                lambda: all(
                    any(m.topic == t and not m.payload for m in wire.raw)
                    for i in ids[:2]
                    for t in (topics.rollout_spec(i), topics.rollout_status(i))
                ),
                what="the oldest refusals cleared",
            )
        async with Wire.open(fleet.home, filters=filters) as wire:
            kept = {f"rollouts/{i}/{t}" for i in ids[2:] for t in ("spec", "status")}

            def retained() -> set[str] | None:
                seen = {m.topic.removeprefix(topics.PREFIX + "/") for m in wire.raw if m.retain}
                return seen if seen >= kept else None

            assert await wire.until(retained, what="the kept refusals") == kept


# -- rule 5(b): the broker's cache is watched ------------------------------------------


def test_tampered_cache_is_put_back_at_once(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 1})
    run(_tampered(fleet, demo_models["digits-v2"]))


async def _tampered(fleet: Fleet, v2: DemoModel) -> None:
    data = v2.path.read_bytes()
    meta, chunks = split_artifact(data, name=v2.name, chunk_size=4096)
    garbage = b"\x00garbage"
    watched = (
        topics.trust(),
        topics.class_manifest(JETSON),
        topics.rollout_spec("r"),
        topics.rollout_status("r"),
        topics.artifact_chunk(v2.sha256, 1),
        topics.artifact_meta(v2.sha256),
        topics.coordinator_presence(),
    )
    emptied = topics.artifact_chunk(v2.sha256, 2)
    async with live(fleet, agents=()):
        await _admitted(fleet, v2)
        async with Wire.open(fleet.home, filters=(*watched, emptied)) as wire:

            def cache() -> dict[str, bytes] | None:
                seen = _retained(wire)
                return seen if seen.keys() >= set(watched) else None

            good = await wire.until(cache, what="the retained cache")
            assert good[topics.artifact_chunk(v2.sha256, 1)] == chunks[1]
            wire.raw.clear()
            async with coordinator_session(fleet.home) as intruder:
                for topic in watched:
                    await intruder.publish(topic, garbage, retain=True)
                await intruder.publish(emptied, b"", retain=True)

            def restored() -> bool:
                latest = {m.topic: m.payload for m in wire.raw}
                return (
                    all(latest.get(t) == good[t] for t in watched)
                    and latest.get(emptied) == chunks[2]
                )

            await wire.until(restored, what="every tampered topic put back", timeout=20.0)
        assert len(meta.chunks) > 2


def test_chunks_tampered_after_admission_neither_judge_nor_stop_the_rollout(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 3})
    run(_tampered_mid_rollout(fleet, demo_models["digits-v2"]))


async def _tampered_mid_rollout(fleet: Fleet, v2: DemoModel) -> None:
    meta, _ = split_artifact(v2.path.read_bytes(), name=v2.name, chunk_size=4096)
    async with live(fleet), Wire.open(fleet.home) as wire:
        await _admitted(fleet, v2)
        # While the devices fetch, someone with write access overwrites every chunk,
        # again and again: the coordinator puts them back, devices fetch again.
        async with coordinator_session(fleet.home) as intruder:
            for _ in range(5):
                for index in range(len(meta.chunks)):
                    await intruder.publish(
                        topics.artifact_chunk(v2.sha256, index), b"\x00tampered", retain=True
                    )
                await asyncio.sleep(0.2)
        final = await wire.until(lambda: wire.final_status("r"), what="the rollout to end")
        assert final.phase is Phase.COMPLETED, final.reason
        assert final.counts.unhealthy == 0
        assert all(r.verdict is Verdict.HEALTHY for r in wire.health.values())


# -- rule 6: artifacts no manifest names are cleared -------------------------------------


def test_artifacts_no_manifest_names_and_stale_uploads_are_cleared(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 1})
    run(_orphans(fleet, demo_models["digits-v2"], demo_models["digits-v1"]))


async def _orphans(fleet: Fleet, v2: DemoModel, v1: DemoModel) -> None:
    async with live(fleet, coordinator=False, agents=()) as tg:
        fleet.start_coordinator(tg, orphan_grace_s=2.0)
        spec = await _admitted(fleet, v2)
        async with fleet.operator() as operator:
            # An upload no spec ever names.
            await publish_artifact(operator, v1.path.read_bytes(), name=v1.name, chunk_size=4096)
            abort = spec_for(
                v2, rollout_id="r", classes=(JETSON,), generation=2, desired=Desired.ABORTED
            )
            await publish_spec(operator, fleet.home, abort)
        assert spec
        filters = (
            topics.artifact_chunks(v2.sha256),
            topics.staging_chunks(v1.sha256),
            topics.artifact_chunks(v1.sha256),
        )
        deadline = time.monotonic() + 30.0
        while True:
            async with Wire.open(fleet.home, filters=filters) as wire:
                await asyncio.sleep(0.5)
                left = {t for t, p in _retained(wire).items() if p}
            if not left or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert left == set(), sorted(left)[:5]
