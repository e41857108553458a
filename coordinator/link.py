"""The coordinator's link to the broker: the session loop, and the re-assert on every
connection.

The broker as a cache. On every connection the coordinator (re)subscribes to what it
writes (trust, manifests, specs, statuses, artifact metas, the chunks of every artifact
it keeps) and waits for its own presence to come back: the broker sends retained
messages before anything published later, so by then it has read the whole cache. Only
then does it publish: a store behind the broker (new, lost) continues above the
retained seq of every class, and finished rollouts whose retained status says so are
recorded as finished, never admitted again. After that, whatever arrives that differs
from the store is put back at once (``coordinator.ingest``).

Reconnects. The session reconnects by itself; when it cannot be opened at all, or a
task of the connection fails with a :class:`TransportError`, the loop waits as
``broker.backoff`` says (logged at WARNING with the cause) and opens a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from broker.backoff import Retry
from broker.session import Session
from broker.transport import ConnectRefused, Transport, TransportError, Will
from coordinator import specs
from coordinator.config import CoordinatorConfig
from coordinator.core import Core, describe
from coordinator.ingest import Ingest
from coordinator.intake import Intake
from coordinator.keeper import Keeper
from coordinator.signer import Signer
from coordinator.ticker import Ticker
from schemas import OFFLINE, topics
from schemas.topics import DeviceChannel

__all__ = ["Connect", "Link", "session_opener"]

log = logging.getLogger(__name__)

Connect = Callable[[Will], AbstractAsyncContextManager[Transport]]
"""Opens the coordinator's session with its Will."""

# The broker forces a client id to the account name; asking for it keeps the persistent
# session's id stable when the account is not the default ``coordinator``.
_DEFAULT_CLIENT_ID = "coordinator"


def session_opener(config: CoordinatorConfig) -> Connect:
    """How the coordinator opens its persistent session on ``config``'s broker."""

    def connect(will: Will) -> AbstractAsyncContextManager[Transport]:
        return Session(
            config.endpoint,
            client_id=config.endpoint.username or _DEFAULT_CLIENT_ID,
            clean_start=False,
            session_expiry=config.session_expiry_s,
            will=will,
        )

    return connect


class Link:
    def __init__(
        self,
        core: Core,
        connect: Connect,
        *,
        ingest: Ingest,
        intake: Intake,
        keeper: Keeper,
        signer: Signer,
        ticker: Ticker,
    ) -> None:
        self._core = core
        self._connect = connect
        self._ingest = ingest
        self._intake = intake
        self._keeper = keeper
        self._signer = signer
        self._ticker = ticker
        self._republishing: asyncio.Task[None] | None = None

    async def run(self) -> None:
        """Hold a link until cancelled; an unreachable broker or a failed link is
        retried.

        Raises:
            ConnectRefused: the broker refused the coordinator's credentials.
        """
        core = self._core
        retry = Retry(core.config.reconnect)
        will = Will(topic=topics.coordinator_presence(), payload=OFFLINE, retain=True)
        while True:
            failure: str | None = None
            try:
                async with self._connect(will) as transport:
                    up = time.monotonic()
                    try:
                        failure = await self._hold(transport)
                    finally:
                        retry.linked(time.monotonic() - up)
            except ConnectRefused:
                raise
            except TransportError as exc:
                failure = f"broker unreachable ({exc})"
            finally:
                core.transport = core.tg = None
                core.settling.unlinked()
                core.ready.clear()
            delay = retry.next_delay()
            if failure is not None:
                log.warning("coordinator: %s; retry in %.2f s", failure, delay)
            await asyncio.sleep(delay)

    async def _hold(self, transport: Transport) -> str | None:
        """Run one link's tasks until one fails; what failed. A clean stop says
        ``offline``."""
        failed: list[BaseException] = []
        try:
            try:
                await self._linked(transport)
            except* TransportError as group:
                # A task of the group lost the link (e.g. the session gave up on it): the
                # loop opens a new one, the process goes on.
                failed += group.exceptions
        except asyncio.CancelledError:
            await self._say_offline(transport)
            raise
        if not failed:
            return None
        return f"the link failed ({'; '.join(describe(e) for e in failed)})"

    async def _say_offline(self, transport: Transport) -> None:
        """A clean stop: a clean DISCONNECT does not fire the Will, so say it ourselves."""
        with contextlib.suppress(TransportError, RuntimeError):
            await transport.publish(
                topics.coordinator_presence(),
                OFFLINE,
                retain=True,
                timeout=self._core.limits.stop_publish_s,
            )

    async def _linked(self, transport: Transport) -> None:
        core = self._core
        # The fence filter last: its messages come after the device topics' retained ones.
        await transport.subscribe(
            *(topics.all_devices(c) for c in DeviceChannel), topics.coordinator_fence()
        )
        core.transport = transport
        async with asyncio.TaskGroup() as tg:
            core.tg = tg
            tg.create_task(self._reassert_on_connect(transport))
            tg.create_task(self._ingest.dispatch(transport))
            tg.create_task(self._ticker.loop())

    async def _reassert_on_connect(self, transport: Transport) -> None:
        core = self._core
        async for generation in transport.connections():
            core.ready.clear()
            # Every subscription of this connection is acknowledged by now: the fence
            # comes back behind their retained messages.
            fence = core.settling.linked(generation, core.monotonic())
            await core.publish(topics.coordinator_fence(), fence, retain=False)
            # Guarded: a record that cannot be published is skipped, never a crash loop.
            await core.guarded("re-assert", self._reassert(transport))
            core.ready.set()
            # Artifacts can be large: sent beside this loop, which must be back at
            # connections() for the next reconnect; a newer re-assert replaces an older.
            if self._republishing is not None:
                self._republishing.cancel()
            self._republishing = core.spawn("artifact re-assert", self._keeper.reassert())
            self._intake.retry_deferred()

    async def _reassert(self, transport: Transport) -> None:
        """Read the broker's cache, recover from it what the store lacks, then put back
        whatever in it differs from the store."""
        core = self._core
        await self._read_cache(transport)
        if core.retained_trust is not None and core.retained_trust != core.trust_bytes:
            core.adopt_trust(core.retained_trust)
        await self._signer.recover()
        await self._ticker.resume()
        # What the broker's cache holds right (as just read) is not sent again.
        if core.retained_trust != core.trust_bytes:
            await core.publish(topics.trust(), core.trust_bytes)
        # Snapshots: specs and ticks change these dicts while we await publishes.
        for name in list(core.classes):
            record = core.classes.get(name)
            if record is not None and core.retained_manifests.get(name) != record.manifest:
                await core.publish_manifest(name)
        for rollout in list(core.rollouts.values()):
            if core.retained_specs.get(rollout.id) != specs.digest(rollout.spec):
                await core.publish(topics.rollout_spec(rollout.id), rollout.spec)
        for rollout_id in {*core.rollouts, *core.refusals}:
            if core.retained_statuses.get(rollout_id) != core.status_payload(rollout_id):
                await core.publish_status(rollout_id)
        await self._signer.sync()

    async def _read_cache(self, transport: Transport) -> None:
        """(Re)subscribe to every retained topic the coordinator writes, and wait until
        the broker has sent them all."""
        core = self._core
        core.on_broker.reread()
        for cache in (core.retained_manifests, core.retained_statuses, core.retained_specs):
            cache.clear()
        core.retained_trust = None
        try:
            await transport.subscribe(
                topics.trust(),
                topics.all_class_manifests(),
                topics.all_class_telemetry(),
                topics.all_rollout_specs(),
                topics.all_rollout_statuses(),
                topics.all_artifacts(),
                topics.all_staging(),
                topics.coordinator_presence(),
            )
        except TransportError as exc:
            log.warning("coordinator: could not read the retained topics: %s", exc)
            return
        try:
            await self._ingest.echo(core.config.probe_s)
        except TimeoutError:
            log.warning(
                "coordinator: the retained topics did not all arrive within %g s",
                core.config.probe_s,
            )
