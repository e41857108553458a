"""The intake service (``coordinator.intake``) carrying out the admission table: what it
stores and publishes for spec bytes, over a scripted transport and a real store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator import CoordinatorLimits
from coordinator.core import Core
from coordinator.fetching import Fetcher
from coordinator.intake import Intake
from coordinator.keeper import Keeper
from coordinator.signer import Signer
from coordinator.store import CoordinatorStore
from schemas import (
    Cause,
    Desired,
    KeyPair,
    Phase,
    RolloutStatus,
    WaveCounts,
    decode,
    encode,
    topics,
)
from tests.coordinator.kit import ScriptedTransport, make_config, sign_spec
from tests.coordinator.records import T0, make_record


@dataclass
class _Rig:
    core: Core
    intake: Intake
    transport: ScriptedTransport
    operator: KeyPair

    def statuses(self, rollout_id: str) -> list[RolloutStatus | None]:
        """What was published on the rollout's status topic (None: cleared)."""
        topic = topics.rollout_status(rollout_id)
        return [
            decode(p, RolloutStatus) if p else None
            for t, p in self.transport.published
            if t == topic
        ]


@asynccontextmanager
async def _rig(tmp_path: Path, **limits: Any) -> AsyncIterator[_Rig]:
    operator = KeyPair.generate()
    config = make_config(tmp_path, operator, limits=CoordinatorLimits(**limits))
    ticks = iter(range(1_000_000))
    core = Core(config, clock=lambda: T0 + next(ticks))
    core.trusted.update_trust(config.trust, now=T0)
    fetcher = Fetcher(core)
    keeper = Keeper(core, fetcher)
    intake = Intake(core, fetcher, keeper, Signer(core))
    transport = ScriptedTransport(fail=False)
    core.transport = transport
    core.ready.set()
    try:
        yield _Rig(core, intake, transport, operator)
    finally:
        core.store.close()


def _run(tmp_path: Path, test: Callable[[_Rig], Coroutine[Any, Any, None]], **limits: Any) -> None:
    async def main() -> None:
        async with asyncio.timeout(10.0), _rig(tmp_path, **limits) as rig:
            await test(rig)

    asyncio.run(main())


def test_junk_is_refused_once_and_the_oldest_refusals_are_forgotten(tmp_path: Path) -> None:
    async def flood(rig: _Rig) -> None:
        for i in range(4):
            await rig.intake.on_spec(f"junk-{i}", b"junk")
        for i in range(4):
            status = rig.statuses(f"junk-{i}")[0]
            assert status is not None
            assert (status.phase, status.cause) == (Phase.REJECTED, Cause.SPEC_REFUSED)
            assert (status.reason or "").startswith("spec refused: malformed")
        # Beyond the two kept, the oldest's status and spec are cleared.
        for i in (0, 1):
            assert rig.statuses(f"junk-{i}")[-1] is None
            assert (topics.rollout_spec(f"junk-{i}"), b"") in rig.transport.published
        assert sorted(rig.core.refusals) == ["junk-2", "junk-3"]
        # A redelivery, or other bytes failing alike, adds nothing.
        rig.transport.published.clear()
        await rig.intake.on_spec("junk-3", b"junk")
        await rig.intake.on_spec("junk-3", b"other junk")
        assert rig.transport.published == []

    _run(tmp_path, flood, refusals_kept=2)
    store = CoordinatorStore(tmp_path / "coordinator.json")
    try:
        assert sorted(store.refusals()) == ["junk-2", "junk-3"]
    finally:
        store.close()


def test_an_abort_before_admission_is_recorded_and_names_no_manifest(tmp_path: Path) -> None:
    async def abort(rig: _Rig) -> None:
        payload = sign_spec(rig.operator, "r1", desired=Desired.ABORTED)
        await rig.intake.on_spec("r1", payload)
        record = rig.core.rollouts["r1"]
        assert (record.phase, record.reason, record.cause, record.candidates) == (
            Phase.ROLLED_BACK,
            "aborted by operator",
            Cause.OPERATOR_ABORT,
            {},
        )
        status = rig.statuses("r1")[-1]
        assert status is not None
        assert (status.phase, status.reason, status.cause) == (
            Phase.ROLLED_BACK,
            "aborted by operator",
            Cause.OPERATOR_ABORT,
        )
        assert not any("/manifest" in t for t, _ in rig.transport.published)

    _run(tmp_path, abort)


def test_a_spec_for_classes_in_a_live_rollout_is_rejected(tmp_path: Path) -> None:
    async def conflict(rig: _Rig) -> None:
        rig.core.rollouts["live"] = make_record(id="live")
        await rig.intake.on_spec("r2", sign_spec(rig.operator, "r2"))
        record = rig.core.rollouts["r2"]
        assert (record.phase, record.cause) == (Phase.REJECTED, Cause.CLASSES_UNAVAILABLE)
        assert record.reason == "classes already in rollout ['live']"
        status = rig.statuses("r2")[-1]
        assert status is not None
        assert (status.reason, status.cause) == (record.reason, Cause.CLASSES_UNAVAILABLE)

    _run(tmp_path, conflict)


def test_a_newer_generation_is_taken_an_older_one_put_back_and_junk_put_back(
    tmp_path: Path,
) -> None:
    async def generations(rig: _Rig) -> None:
        gen2 = sign_spec(rig.operator, "rollout-7", generation=2)
        rig.core.rollouts["rollout-7"] = make_record(generation=2, spec=gen2)
        paused = sign_spec(rig.operator, "rollout-7", generation=3, desired=Desired.PAUSED)
        await rig.intake.on_spec("rollout-7", paused)
        record = rig.core.rollouts["rollout-7"]
        assert (record.generation, record.desired, record.spec) == (3, Desired.PAUSED, paused)
        assert rig.core.changed.is_set()
        spec_topic = topics.rollout_spec("rollout-7")
        for stale in (sign_spec(rig.operator, "rollout-7", generation=1), b"junk", b""):
            rig.transport.published.clear()
            await rig.intake.on_spec("rollout-7", stale)
            assert (spec_topic, paused) in rig.transport.published
        assert rig.core.refusals == {}

    _run(tmp_path, generations)


def test_a_lost_store_records_what_the_retained_status_says_ended(tmp_path: Path) -> None:
    async def recovered(rig: _Rig) -> None:
        ended = RolloutStatus(
            id="r3",
            generation=1,
            phase=Phase.COMPLETED,
            wave=3,
            waves_percent=(10.0, 50.0, 100.0),
            counts=WaveCounts(targeted=2, healthy=2),
            classes=(),
            updated_at=T0 - 60,
        )
        rig.core.retained_statuses["r3"] = encode(ended)
        await rig.intake.on_spec("r3", sign_spec(rig.operator, "r3"))
        record = rig.core.rollouts["r3"]
        assert (record.phase, record.wave, record.updated_at) == (Phase.COMPLETED, 3, T0 - 60)
        assert rig.core.claims == {}

    _run(tmp_path, recovered)
