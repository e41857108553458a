"""The fleet's telemetry per class, published; its alerts written to the audit log.

The ingest hands every summary the ledger counted to :meth:`Reporter.counted` on the
event loop (the device's class looked up in the fleet view, then
:meth:`coordinator.aggregate.Aggregator.add`: a few dict operations). Every
``telemetry.publish_s`` (10 s) :meth:`Reporter.run` names the releases the coordinator
publishes (the classes' stables and their live rollouts' candidates), ticks the engine,
writes the alerts due to the audit log (``drift``, ``drift_cleared``, ``health_breach``,
``health_recovered``, under the release's rollout or ``-``) and publishes each class's
:class:`schemas.ClassTelemetry`, retained, where it differs from what this connection last
carried (a new connection carries them all again: the broker's cache may have lost them).

Restart. Nothing is published before the first connection has read the broker's retained
topics, among them these snapshots: :meth:`Reporter.retained` takes back each release's
fixed reference and raised alarms from them, so a release keeps the reference of its
rollout and an alarm already in the audit log is not written again. Later, a retained
snapshot that is not the one last published (cleared, or written by someone else) is
published again at the next report.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Final

from broker.transport import TransportError
from coordinator.aggregate import Aggregator, Named
from coordinator.alerts import Alert
from coordinator.core import Core, describe
from schemas import (
    ClassTelemetry,
    RejectedError,
    ReleaseRole,
    TelemetrySummary,
    decode,
    encode,
    topics,
)

__all__ = ["NO_ROLLOUT", "RENAME_S", "Reporter"]

log = logging.getLogger(__name__)

NO_ROLLOUT: Final = "-"
"""Where alerts about a release no rollout named are filed in the audit log."""
RENAME_S: Final = 1.0
"""At most this often a summary of a release the engine does not know has the names
read again (a stray or hostile device's made-up releases cost no more than that)."""


class Reporter:
    def __init__(self, core: Core) -> None:
        self._core = core
        self.engine = Aggregator(
            {name: profile.drift for name, profile in core.config.profiles.items()},
            core.config.telemetry,
            now=core.clock(),
        )
        self._published: dict[str, bytes] = {}
        """Class -> the content (its time left out) this connection carried last."""
        self._sent: dict[str, bytes] = {}
        """Class -> the snapshot last published, as published."""
        self._generation: int | None = None
        self._started = False
        """Set on the first report: restoring is over."""
        self._named_at = -math.inf
        """When (monotonic) a summary last had the names read again."""

    # -- on the event loop, from the ingest ---------------------------------------------

    def counted(self, summary: TelemetrySummary) -> None:
        """A summary the ledger counted (its device id checked by the ingest). A release
        the engine does not know has the names read again first (a rollout admitted
        since the last report), at most once per ``RENAME_S``."""
        view = self._core.fleet.devices.get(summary.device_id)
        hw_class = None if view is None else view.hw_class
        now = self._core.monotonic()
        if (
            hw_class is not None
            and summary.release is not None
            and not self.engine.knows(hw_class, summary.release)
            and now - self._named_at >= RENAME_S
        ):
            self._named_at = now
            self.engine.name(self.named())
        self.engine.add(hw_class, summary, self._core.clock())

    def retained(self, hw_class: str, payload: bytes) -> None:
        """A class's retained snapshot. Before the first report: a snapshot of the
        coordinator before a restart, whose references and alarms are taken back. After:
        the echo of this coordinator's own, or someone else's word; if it is not what was
        last published, the next report publishes again."""
        if self._started:
            if payload != self._sent.get(hw_class):
                self._published.pop(hw_class, None)
            return
        if not payload:
            return
        try:
            snapshot = decode(payload, ClassTelemetry)
        except RejectedError as exc:
            log.warning("coordinator: retained telemetry of %s not restored: %s", hw_class, exc)
            return
        if snapshot.hw_class != hw_class:
            return
        self.engine.name(self.named())
        taken = self.engine.restore(snapshot, self._core.clock())
        if taken:
            log.info("coordinator: %s: restored %d releases' drift references", hw_class, taken)

    def named(self) -> dict[str, dict[str, Named]]:
        """The releases the coordinator publishes now: each class's stable, and the
        candidates of its live rollouts."""
        core = self._core
        named: dict[str, dict[str, Named]] = {}
        for name, record in core.classes.items():
            if record.stable is not None:
                named.setdefault(name, {})[record.stable.release_id] = Named(
                    ReleaseRole.STABLE, record.stable.health
                )
        for rollout in core.rollouts.values():
            if rollout.phase.final:
                continue
            for name, release in rollout.candidates.items():
                lane = rollout.lanes.get(name)
                if lane is not None and lane.live:
                    named.setdefault(name, {})[release.release_id] = Named(
                        ReleaseRole.CANDIDATE, release.health, rollout.id
                    )
        return named

    # -- the loop -------------------------------------------------------------------

    async def run(self) -> None:
        """Report every ``publish_s`` once the retained topics were read, until
        cancelled."""
        core = self._core
        while True:
            await asyncio.sleep(core.config.telemetry.publish_s)
            if not self._started and not core.ready.is_set():
                continue
            self._started = True
            await core.guarded("telemetry report", self.report())

    async def report(self) -> None:
        """One tick of the engine: alerts to the audit log, changed snapshots out."""
        core = self._core
        engine = self.engine
        engine.name(self.named())
        tick = engine.tick(core.clock())
        for alert in tick.alerts:
            await self._audit(alert)
        transport = core.transport
        if transport is None or not transport.connected:
            return
        if transport.generation != self._generation:
            self._published.clear()
            self._generation = transport.generation
        for hw_class, snapshot in tick.classes.items():
            content = encode(snapshot.model_copy(update={"at": 0.0}))
            if self._published.get(hw_class) == content:
                continue
            payload = encode(snapshot)
            try:
                await transport.publish(topics.class_telemetry(hw_class), payload, retain=True)
            except TransportError as exc:
                log.warning("coordinator: telemetry of %s not published: %s", hw_class, exc)
                continue
            self._published[hw_class] = content
            self._sent[hw_class] = payload

    async def _audit(self, alert: Alert) -> None:
        detail = alert.detail
        if alert.changes > 1:
            detail += f" ({alert.changes} changes since the last entry)"
        level = logging.WARNING if alert.raised else logging.INFO
        log.log(level, "coordinator: %s: %s", alert.event, self._core.bound(detail))
        try:
            await self._core.audit(alert.event, alert.rollout_id or NO_ROLLOUT, detail)
        except Exception as exc:  # noqa: BLE001 (the alert is logged; the loop goes on)
            log.error("coordinator: %s not audited: %s", alert.event, describe(exc))
