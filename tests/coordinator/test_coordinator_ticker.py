"""The rollout loop (``coordinator.ticker``) carrying out a wave's verdict: what it
stores, audits and publishes, over a scripted transport and a real store."""

from __future__ import annotations

import asyncio
from pathlib import Path

from coordinator.core import Core
from coordinator.fetching import Fetcher
from coordinator.intake import Intake
from coordinator.keeper import Keeper
from coordinator.signer import Signer
from coordinator.store import CoordinatorStore
from coordinator.ticker import Ticker
from schemas import Cause, KeyPair, Phase, RolloutStatus, decode, topics
from tests.coordinator.kit import ScriptedTransport, make_config
from tests.coordinator.records import T0, make_record


def test_a_timed_out_wave_is_stored_audited_and_published_with_its_cause(
    tmp_path: Path,
) -> None:
    text = "wave 3: timed out with 0 of 0 healthy"
    transport = ScriptedTransport(fail=False)

    async def main() -> None:
        core = Core(make_config(tmp_path, KeyPair.generate()), clock=lambda: T0 + 601.0)
        try:
            fetcher = Fetcher(core)
            keeper = Keeper(core, fetcher)
            signer = Signer(core)
            ticker = Ticker(core, signer, keeper, Intake(core, fetcher, keeper, signer))
            core.transport = transport
            core.monotonic = lambda: 100.0
            # Settled long ago: re-asserted, and the fence of this connection came back.
            core.ready.set()
            assert core.settling.came_back(core.settling.linked(transport.generation, 0.0))
            # The last wave (an empty early one is passed over), begun at T0, 600 s allowed.
            core.rollouts["rollout-7"] = make_record(wave=2)
            async with asyncio.timeout(10.0):
                await ticker.tick()
            record = core.rollouts["rollout-7"]
            assert (record.phase, record.reason, record.cause) == (
                Phase.ROLLED_BACK,
                text,
                Cause.TIMED_OUT,
            )
        finally:
            core.store.close()

    asyncio.run(main())
    topic = topics.rollout_status("rollout-7")
    (status,) = [decode(p, RolloutStatus) for t, p in transport.published if t == topic]
    assert (status.phase, status.reason, status.cause) == (
        Phase.ROLLED_BACK,
        text,
        Cause.TIMED_OUT,
    )
    store = CoordinatorStore(tmp_path / "coordinator.json")
    try:
        assert store.rollouts()["rollout-7"].cause is Cause.TIMED_OUT
        (entry,) = [e for e in store.audit_log() if e["rollout"] == "rollout-7"]
        assert (entry["event"], entry["detail"]) == ("roll_back", text)
    finally:
        store.close()


def test_the_view_is_known_only_once_the_fence_is_back_and_the_re_assert_done(
    tmp_path: Path,
) -> None:
    transport = ScriptedTransport(fail=False)

    async def main() -> None:
        core = Core(make_config(tmp_path, KeyPair.generate()), clock=lambda: T0)
        try:
            fetcher = Fetcher(core)
            keeper = Keeper(core, fetcher)
            signer = Signer(core)
            ticker = Ticker(core, signer, keeper, Intake(core, fetcher, keeper, signer))
            core.transport = transport
            fence = core.settling.linked(transport.generation, 0.0)
            core.ready.set()
            assert not ticker.fleet_known()  # re-asserted, the fence not back
            core.settling.came_back(fence)
            core.ready.clear()
            # The fence is back, but the wave clocks may not yet be shifted over downtime.
            assert not ticker.fleet_known()
            core.ready.set()
            assert ticker.fleet_known()
        finally:
            core.store.close()

    asyncio.run(main())
