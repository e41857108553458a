"""The coordinator: turns signed rollout specs into per-class manifests, wave by wave.

Theory of operation. The coordinator's store is the source of truth (seq numbers,
stable releases, rollout records, the artifacts manifests name); retained topics are a
cache it re-asserts on every connect (``coordinator.link``): trust, manifests, rollout
specs and statuses, and the artifacts of every release a manifest names. It keeps a
persistent MQTT session so health and telemetry published while it is down wait for
it, and retries a broker that is unreachable at start.

Who does what. Pure engines decide: :mod:`~coordinator.specs` (spec admission, a
table), :mod:`~coordinator.rollout` (waves), :mod:`~coordinator.manifests` (content,
seq, re-signing), :mod:`~coordinator.custody` (which artifacts to keep, repair and
clear), :mod:`~coordinator.clock` (downtime and settling). Services carry the decisions
out over a :class:`~coordinator.core.Core`: ``link`` (the session loop and re-assert),
``ingest`` (incoming messages), ``intake`` (specs), ``keeper`` (artifacts), ``signer``
(manifests), ``ticker`` (the rollout loop), ``fetching`` (candidate artifacts), and
``ledger`` (telemetry counted durably, then acknowledged to each device), and
``reporter`` (what the ledger counted, aggregated per class and release, published with
its drift and health alerts).

Artifacts. Operators upload to ``staging/``; the coordinator fetches a candidate from
there (or from ``artifacts/``, where it publishes), checks it, keeps a copy, and once the
rollout is admitted publishes the checked bytes under ``artifacts/`` and clears the
staged upload. Artifacts no manifest names any longer are cleared from the broker.

Robustness. Every handler of a message runs under a guard: a failure is logged with a
bounded description and the message dropped, never the service. Every text built from
input (reasons, audit details) is bounded where it is built.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable

from broker.transport import Transport
from coordinator.config import CoordinatorConfig, CoordinatorLimits
from coordinator.core import Core
from coordinator.custody import release_shas
from coordinator.exporter import Exporter
from coordinator.fetching import Fetcher
from coordinator.fleet import FleetView
from coordinator.ingest import Ingest
from coordinator.intake import Intake
from coordinator.keeper import Keeper
from coordinator.ledger import TELEMETRY_FILENAME, TelemetryLedger
from coordinator.link import Connect, Link, session_opener
from coordinator.reporter import Reporter
from coordinator.rollout import RolloutRecord
from coordinator.signer import Signer
from coordinator.ticker import Ticker

__all__ = ["Coordinator", "CoordinatorConfig", "CoordinatorLimits", "serve"]

log = logging.getLogger(__name__)


async def serve(config: CoordinatorConfig) -> None:
    """Run a coordinator until SIGTERM or SIGINT, then stop it cleanly: its presence
    says ``offline`` and every store write in flight completes. The entry point of
    ``edgefleet coordinator run``.

    Raises:
        StoreDamagedError: the store file is damaged (the message says how to recover).
        RejectedError, ConnectRefused: as :meth:`Coordinator.run`.
    """
    coordinator = Coordinator(config)
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None  # called from a coroutine
    stopping = asyncio.Event()

    def stop(signum: signal.Signals) -> None:
        log.info("coordinator: %s, stopping", signum.name)
        stopping.set()
        task.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop, signum)
    try:
        await coordinator.run()
    except asyncio.CancelledError:
        if not stopping.is_set():
            raise
        task.uncancel()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


class Coordinator:
    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        clock: Callable[[], float] = time.time,
        connect: Connect | None = None,
    ) -> None:
        """Open the store (blocking). ``connect`` opens the link (by default a
        :class:`broker.session.Session` on ``config.endpoint``).

        Raises:
            StoreDamagedError: the store file is damaged; the coordinator refuses to start
                rather than forget what it decided (the message says how to recover).
        """
        core = self._core = Core(config, clock)
        self.counters = core.counters
        """What the coordinator counted of its ingest (drops, overflows, telemetry)."""
        self.telemetry = TelemetryLedger(
            config.data_dir / TELEMETRY_FILENAME, counters=self.counters, clock=clock
        )
        self.reporter = Reporter(core)
        """The fleet's telemetry aggregated per class and release, published; alerts."""
        self._exporter = None if config.metrics is None else Exporter(core, config.metrics)
        self._fetcher = Fetcher(core)
        keeper = Keeper(core, self._fetcher)
        signer = Signer(core)
        intake = Intake(core, self._fetcher, keeper, signer)
        ticker = Ticker(core, signer, keeper, intake)
        self._link = Link(
            core,
            connect or session_opener(config),
            ingest=Ingest(
                core,
                intake,
                keeper,
                ledger=self.telemetry,
                counters=self.counters,
                reporter=self.reporter,
            ),
            intake=intake,
            keeper=keeper,
            signer=signer,
            ticker=ticker,
        )

    @property
    def fleet(self) -> FleetView:
        return self._core.fleet

    @property
    def rollouts(self) -> dict[str, RolloutRecord]:
        return dict(self._core.rollouts)

    @property
    def validating(self) -> frozenset[str]:
        """Ids of the rollout specs taken in and being validated, not yet decided."""
        return frozenset(self._core.claims)

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """Where ``/metrics`` is served (``config.metrics``) while running; None otherwise."""
        return None if self._exporter is None else self._exporter.address

    @property
    def transport(self) -> Transport | None:
        """The link held now; None between links."""
        return self._core.transport

    async def run(self) -> None:
        """Coordinate until cancelled; a broker unreachable at start is retried.

        Raises:
            RejectedError: the configured TrustDoc does not verify against the root keys.
            ConnectRefused: the broker refused the coordinator's credentials.
            OSError: the metrics address cannot be bound.
        """
        core = self._core
        core.trusted.update_trust(core.config.trust, now=core.clock())
        core.classes = await asyncio.to_thread(core.store.classes)
        core.rollouts = await asyncio.to_thread(core.store.rollouts)
        core.refusals = await asyncio.to_thread(core.store.refusals)
        core.named = {
            sha
            for record in core.rollouts.values()
            for release in record.candidates.values()
            for sha in release_shas(release)
        }
        if core.store.fresh:
            log.warning(
                "coordinator: no store at %s (a first start, or a lost store): reading the "
                "broker's retained topics before publishing",
                core.store.path,
            )
        await self.telemetry.open()
        # Beside the link, not in a task group with it: its ConnectRefused ends run() as
        # it is. The committer outlives links (what it counted is acknowledged on the next).
        committer = asyncio.create_task(self.telemetry.run(lambda: core.transport))
        reporter = asyncio.create_task(self.reporter.run())
        try:
            async with self._exporter or contextlib.nullcontext():
                await self._link.run()
        finally:
            for task in (committer, reporter):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self.telemetry.close()
            self._fetcher.cancel()
            # Under the lock: a write still running in its thread finishes first.
            async with core.store_lock:
                await asyncio.to_thread(core.store.close)
