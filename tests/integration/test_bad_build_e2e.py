"""A build far over the latency budget is stopped in its first wave and rolled back."""

from __future__ import annotations

from edgefleet.fleet import Fleet
from models import DemoModel
from schemas import Event, EventKind, Phase, Verdict
from tests.integration.fleetkit import (
    INTEL,
    JETSON,
    WAVES,
    MakeFleet,
    Wire,
    canaries_of,
    live,
    release_id,
    roll_out,
    run,
    settled,
)


def test_slow_build_is_rolled_back_in_wave_one(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 3, INTEL: 3})
    wave_one = run(_bad_build(fleet, demo_models))

    # Devices outside the first wave never fetched a byte of the slow build; those
    # inside did (so the check looks in the right place).
    slow = demo_models["digits-v2-slow"].sha256
    outside = set(fleet.home.devices()) - wave_one
    assert outside, "the first wave covered the whole fleet: nothing to check"
    for device_id in fleet.home.devices():
        store = fleet.workdir / "agents" / device_id / "artifacts"
        fetched = (store / "models" / f"{slow}.onnx").exists() or (
            store / "partial" / slow
        ).exists()
        if device_id in outside:
            assert not fetched, f"{device_id} (not in wave 1) fetched the slow build"
    assert any(
        (fleet.workdir / "agents" / d / "artifacts" / "models" / f"{slow}.onnx").exists()
        for d in wave_one
    )


async def _bad_build(fleet: Fleet, demo_models: dict[str, DemoModel]) -> set[str]:
    v2 = release_id(demo_models["digits-v2"])
    slow = release_id(demo_models["digits-v2-slow"])
    devices = fleet.home.devices()
    async with live(fleet), Wire.open(fleet.home) as wire, fleet.operator() as operator:
        await roll_out(operator, fleet, wire, demo_models["digits-v2"], rollout_id="install-v2")
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
        assert wire.waves_seen("bad-build") == [0], "rolled back after its first wave"
        assert final.counts.unhealthy >= 1
        assert final.reason is not None
        assert "unhealthy" in final.reason

        # The first wave, as the devices' manifests drew it.
        wave_one: set[str] = set()
        for hw_class in fleet.classes:
            cohort = next(
                m
                for m in wire.verified_manifests(hw_class)
                if m.rollout is not None and m.rollout.id == "bad-build"
            )
            assert cohort.rollout is not None
            assert cohort.rollout.cutoff_bp == 1000
            wave_one |= {
                d
                for d, c in devices.items()
                if c == hw_class and cohort.target_for(d).rollout_id == "bad-build"
            }
            # Rolled back: the class manifest after it names no rollout, stable is v2.
            last = wire.verified_manifests(hw_class)[-1]
            assert last.rollout is None
            assert last.stable is not None
            assert last.stable.release_id == v2

        # The unhealthy device said why (p95 latency) and rolled itself back.
        unhealthy = [
            r
            for r in wire.health.values()
            if r.rollout_id == "bad-build" and r.verdict is Verdict.UNHEALTHY
        ]
        assert unhealthy, "no unhealthy health report retained"
        for report in unhealthy:
            assert report.device_id in wave_one
            assert report.release == slow
            assert any(r.startswith("p95_latency_ms:") for r in report.reasons), report.reasons
            assert report.p95_latency_ms is not None
        for report in unhealthy:

            def rollback_of(device_id: str = report.device_id) -> Event | None:
                return next(
                    (
                        e
                        for e in wire.events
                        if e.kind is EventKind.ROLLBACK and e.device_id == device_id
                    ),
                    None,
                )

            event = await wire.until(rollback_of, what=f"a rollback event from {report.device_id}")
            assert event.reason == "p95_latency_ms"
            assert event.release == slow

        # Every device serves v2 afterwards.
        await wire.until(
            lambda: (
                all(settled(a.stage) for a in fleet.agents.values())
                and all(
                    (s := wire.states.get(d)) is not None
                    and s.active_release == v2
                    and s.target_release == v2
                    for d in devices
                )
            ),
            what="every device back on v2",
        )
        for device_id, agent in fleet.agents.items():
            assert agent.active_release is not None, device_id
            assert agent.active_release.release_id == v2, device_id
    return wave_one
