"""The rollout loop: each tick asks :func:`coordinator.rollout.decide` what to do with
every live rollout given the fleet's counts, stores the new record *before* publishing,
and then has the manifests derived again; a restart resumes every rollout without
skipping or repeating a wave. It also keeps the downtime clock
(:mod:`coordinator.clock`): heartbeats while watching, waves shifted on a resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from coordinator import clock, rollout
from coordinator.clock import Heartbeat
from coordinator.core import Core, describe
from coordinator.intake import Intake
from coordinator.keeper import Keeper
from coordinator.signer import Signer
from coordinator.store import ClassRecord
from schemas import topics

__all__ = ["Ticker"]

log = logging.getLogger(__name__)


class Ticker:
    def __init__(self, core: Core, signer: Signer, keeper: Keeper, intake: Intake) -> None:
        self._core = core
        self._signer = signer
        self._keeper = keeper
        self._intake = intake
        self._heartbeat = Heartbeat(core.config.heartbeat_s)
        self._clearing: asyncio.Task[None] | None = None

    def fleet_known(self) -> bool:
        """Retained device topics arrive right after subscribing; until the fence came
        back behind them, the fleet view is partial (and while disconnected, stale). The
        connection's re-assert must be done too: it shifts the wave clocks over the
        downtime (:meth:`resume`) before any of them may time out."""
        core, transport = self._core, self._core.transport
        return (
            transport is not None
            and core.ready.is_set()
            and core.settling.known(connected=transport.connected, generation=transport.generation)
        )

    async def resume(self) -> None:
        """Shift live waves by the time nobody watched the fleet (coordinator down or
        disconnected), so that time does not count against their timeouts."""
        core = self._core
        last = await asyncio.to_thread(core.store.heartbeat)
        now = core.clock()
        await self._beat(now)
        async with core.rollout_lock:
            resumed = clock.resume(list(core.rollouts.values()), last, now)
            for record in resumed.shifted:
                await core.write(core.store.put_rollout, record)
                core.rollouts[record.id] = record
        if resumed.shifted:
            # One entry for all of them, under no rollout: the rollouts' own audit trails
            # keep to their decisions.
            shifted = [r.id for r in resumed.shifted]
            await core.audit(
                "clock_resumed", "", f"{resumed.gap:.1f} s unobserved; shifted {shifted}"
            )

    async def _beat(self, now: float) -> None:
        self._heartbeat.beat(now)
        await self._core.write(self._core.store.put_heartbeat, now)

    async def loop(self) -> None:
        core = self._core
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(core.config.tick_s):
                    await core.changed.wait()
            core.changed.clear()
            fence = core.settling.resend(core.monotonic())
            if fence is not None:
                log.info("coordinator: the fence is not back yet; sent again")
                core.spawn("fence", core.publish(topics.coordinator_fence(), fence, retain=False))
            if self._intake.deferred and self.fleet_known():
                self._intake.retry_deferred()
            await core.guarded("tick", self.tick())
            if (
                core.ready.is_set()
                and (self._clearing is None or self._clearing.done())
                and self._keeper.orphans_due()
            ):
                self._clearing = core.spawn(
                    "clearing orphans", self._keeper.clear_orphans(ended=False)
                )

    async def tick(self) -> None:
        core = self._core
        now = core.clock()
        known = self.fleet_known()
        if self._heartbeat.due(now, watching=known):
            await self._beat(now)
        ended = False
        core.fleet.watch_only(r for r in core.rollouts.values() if not r.phase.final)
        core.fleet.tick(now)
        for rollout_id in list(core.rollouts):
            try:
                ended = await self._tick_rollout(rollout_id, now, known=known) or ended
            except Exception as exc:  # one rollout must not stop the others
                log.error("coordinator: rollout %s tick failed: %s", rollout_id, describe(exc))
                log.debug("coordinator: rollout %s tick failed", rollout_id, exc_info=True)
        await self._signer.sync()
        await self._clocks_started(now)
        if ended:
            await self._keeper.prune()

    async def _tick_rollout(self, rollout_id: str, now: float, *, known: bool) -> bool:
        """Decide on one rollout; whether it ended."""
        core = self._core
        async with core.rollout_lock:
            record = core.rollouts.get(rollout_id)
            if record is None or record.phase.final:
                return False
            step = rollout.step(
                record,
                {
                    name: core.fleet.lane(record, name)
                    for name, lane in record.lanes.items()
                    if lane.live
                },
                now,
                fleet_known=known,
                reason_chars=core.limits.reason_chars,
            )
            if step is None:
                return False
            if step.transition:
                await self._store(step)
            else:
                core.rollouts[rollout_id] = step.record
        for change in step.changes:
            log.info(
                "coordinator: rollout %s%s %s",
                rollout_id,
                "" if change.name is None else f" {change.name}",
                change.action.value,
            )
        if step.transition:
            await self._signer.sync()
        await core.publish_status(rollout_id)
        return step.record.phase.final

    async def _clocks_started(self, now: float) -> None:
        """The manifests are out: the waves whose target they now carry start their
        clocks (stored, so a restart does not start them again later)."""
        core = self._core
        async with core.rollout_lock:
            started = [
                record
                for record in (rollout.published(r, now) for r in core.rollouts.values())
                if record is not None
            ]
            for record in started:
                await core.write(core.store.put_rollout, record)
                core.rollouts[record.id] = record
        for record in started:
            await core.publish_status(record.id)

    async def _store(self, step: rollout.Step) -> None:
        """Under the rollout lock: the record after a transition, and the candidates
        promoted to stable when their class completed."""
        core = self._core
        if step.promoted:
            # Under the sync lock: a sync in flight would otherwise store its newer seq
            # between our read of the class record and our write of it, and lose it.
            async with core.sync_lock:
                for name in step.promoted:
                    release = step.record.candidates[name]
                    current = core.classes.get(name, ClassRecord(name=name))
                    await core.put_class(current.model_copy(update={"stable": release}))
        await core.write(core.store.put_rollout, step.record)
        core.rollouts[step.record.id] = step.record
        for change in step.changes:
            await core.audit(change.action.value, step.record.id, change.text(step.record))
