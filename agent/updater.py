"""Carrying out the update engine's commands: the only place they touch the world.

:meth:`Updater.feed` hands an event to the engine and acts on the commands it returns.
Those that only change what is served or shown (revert, cancel, state, log, the last
rejection, a swap to a model already held) take effect at once, so that inference and
the published state never lag behind the engine. The rest go in order to
:meth:`Updater.run`, the update task: the swap to a candidate waits there for the write
before it, the soak's record (the crash-loop guard, see :mod:`agent.engine`);
writes, reports and events are awaited one after the other (the report before the event:
it is what the coordinator waits for), and fetching, loading and self-testing run as
tasks of their own whose results come back as events. Blocking work runs in threads.
The update task also ticks the engine when it asked to be woken (a soak's deadline, a
retry).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

from agent.artifacts import ArtifactKind
from agent.engine import UpdateEngine
from agent.events import (
    Cancel,
    Command,
    Emit,
    EngineEvent,
    Failure,
    FailureKind,
    Fetch,
    Fetched,
    Load,
    Loaded,
    Log,
    Note,
    Persist,
    Report,
    Revert,
    SelfTest,
    SelfTested,
    StateChanged,
    Swap,
    Tick,
)
from agent.fetch import Fetcher
from agent.inference import Inference
from agent.journal import Journal
from agent.persistence import StateKeeper
from agent.runtime import Feed, ModelSlot, read_golden
from broker.fetch import FetchFailed
from schemas import ArtifactError, Reason, RejectedError, Rejection, Release, encode
from schemas.topics import DeviceChannel

__all__ = ["Updater"]

log = logging.getLogger(__name__)

Publish = Callable[[DeviceChannel, bytes], Awaitable[None]]


def _failure(exc: Exception) -> Failure:
    """What a failed fetch, load or self-test means for the engine."""
    if isinstance(exc, TimeoutError):
        return Failure(FailureKind.TIMEOUT, str(exc))
    if isinstance(exc, FetchFailed):
        return Failure(FailureKind.REFETCH, exc.detail, exc.reason)
    if isinstance(exc, RejectedError):
        return Failure(FailureKind.REJECTED, exc.detail, exc.reason)
    return Failure(FailureKind.ERROR, f"{type(exc).__name__}: {exc}")


class Updater:
    """The engine of one device and the hands that carry out its commands."""

    def __init__(
        self,
        engine: UpdateEngine,
        *,
        fetcher: Fetcher,
        inference: Inference,
        keeper: StateKeeper,
        journal: Journal,
        publish: Publish,
        state_changed: Callable[[], None],
        clock: Callable[[], float],
        providers: tuple[str, ...] | None = None,
    ) -> None:
        self.engine = engine
        self._fetcher = fetcher
        self._inference = inference
        self._keeper = keeper
        self._journal = journal
        self._publish = publish
        self._state_changed = state_changed
        self._clock = clock
        self._open = partial(ModelSlot, providers=providers)
        """How a model is loaded: on the device's own providers, or its release's."""
        self.slots: dict[str, ModelSlot] = {}
        """Loaded models by sha256: the one serving and the one to fall back to."""
        self._tested: dict[int, ModelSlot] = {}
        """Models loaded by an update, by attempt, until swapped in or dropped."""
        self._queue: deque[Command] = deque()
        self._wake = asyncio.Event()
        self._work: dict[int, asyncio.Task[None]] = {}
        self.last_rejection: Rejection | None = None

    @property
    def device_id(self) -> str:
        return self.engine.device_id

    def feed(self, event: EngineEvent) -> None:
        """Hand ``event`` to the engine; act on its commands. The update task wakes
        only for commands to carry out or a new wake-up time (not for each inference)."""
        wake_at, queued = self.engine.wake_at, len(self._queue)
        for command in self.engine.handle(event):
            if isinstance(command, Persist):
                # Memory at once, the disk in turn: whatever ends the agent meanwhile, its
                # last write (see Agent.run) takes the newest state.
                self._keeper.remember_memory(command.memory)
            if not self._at_once(command):
                self._queue.append(command)
        if len(self._queue) > queued or self.engine.wake_at != wake_at:
            self._wake.set()

    def _at_once(self, command: Command) -> bool:
        """Carry out ``command`` if it takes effect at once; False if it waits its turn."""
        if isinstance(command, Swap) and command.attempt is None:
            self._swap(command, self.slots[command.release.artifact.sha256])
        elif isinstance(command, Revert):
            to = command.to
            self._inference.slot = None if to is None else self.slots[to.artifact.sha256]
        elif isinstance(command, Cancel):
            self._tested.pop(command.attempt, None)
            task = self._work.pop(command.attempt, None)
            if task is not None:
                task.cancel()
        elif isinstance(command, StateChanged):
            self._state_changed()
        elif isinstance(command, Log):
            log.log(command.level, "%s: %s", self.device_id, command.message)
        elif isinstance(command, Note):
            self.note(command.reason, command.detail)
        else:
            return False
        return True

    def _swap(self, command: Swap, slot: ModelSlot) -> None:
        keep = {} if command.keep is None else {command.keep: self.slots[command.keep]}
        self.slots = {**keep, command.release.artifact.sha256: slot}
        self._inference.slot = slot

    async def load_active(self, release: Release | None) -> tuple[bool, str | None]:
        """Load the model served before a restart: whether it serves again, and why it
        serves degraded (a fallback provider) or why it does not load."""
        if release is None:
            return False, None
        path = await self._fetcher.stored(release.artifact, ArtifactKind.MODEL)
        if path is None:
            return False, None
        try:
            slot = await asyncio.to_thread(self._open, release, path)
        except ArtifactError as exc:
            log.error("%s: stored model does not load: %s", self.device_id, exc)
            return False, exc.detail
        self.slots = {release.artifact.sha256: slot}
        self._inference.slot = slot
        return True, slot.fallback

    def note(self, reason: Reason, detail: str) -> None:
        """Show a rejection in the device's state (the last one is shown)."""
        self.last_rejection = Rejection(reason=reason.value, detail=detail, at=self._clock())
        self._state_changed()

    # -- the update task --------------------------------------------------------------

    async def run(self) -> None:
        """Carry out queued commands in order, and tick the engine when it asked."""
        async with asyncio.TaskGroup() as tg:
            while True:
                while self._queue:
                    await self._carry_out(self._queue.popleft(), tg)
                await self._sleep()
                self.feed(Tick(self._clock()))

    async def _sleep(self) -> None:
        """Until something was fed, or the engine's wake-up time."""
        self._wake.clear()
        if self._queue:
            return
        wake_at = self.engine.wake_at
        delay = None if wake_at is None else max(0.0, wake_at - self._clock())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._wake.wait()

    async def _carry_out(self, command: Command, tg: asyncio.TaskGroup) -> None:
        if isinstance(command, Persist):
            await self._keeper.write()
        elif isinstance(command, Report):
            await self._publish(DeviceChannel.HEALTH, encode(command.report))
        elif isinstance(command, Emit):
            reason = None if command.reason is None else command.reason.value
            await self._journal.emit(command.kind, reason, command.detail, command.desired)
        elif isinstance(command, Swap):
            assert command.attempt is not None
            slot = self._tested.pop(command.attempt, None)
            if slot is not None:  # else cancelled while its record was written
                self._swap(command, slot)
        elif isinstance(command, Fetch | Load | SelfTest):
            self._spawn(command, tg)
        else:  # pragma: no cover (the others take effect at once)
            raise AssertionError(command)

    def _spawn(self, command: Fetch | Load | SelfTest, tg: asyncio.TaskGroup) -> None:
        attempt = command.attempt
        if attempt != self.engine.attempt:
            return  # superseded while it waited its turn
        if isinstance(command, Fetch):
            work = self._fetch(command)
        elif isinstance(command, Load):
            work = self._load(command)
        else:
            work = self._self_test(command)
        task = tg.create_task(work)
        self._work[attempt] = task
        task.add_done_callback(lambda _: self._work.pop(attempt, None))

    async def _fetch(self, command: Fetch) -> None:
        release = command.release
        try:
            model = await self._fetcher.fetch(release.artifact, ArtifactKind.MODEL)
            golden = (
                None
                if release.golden is None
                else await self._fetcher.fetch(release.golden, ArtifactKind.GOLDEN)
            )
        except Exception as exc:  # noqa: BLE001 (every failure is told to the engine)
            self.feed(Fetched(command.attempt, self._clock(), failure=_failure(exc)))
        else:
            self.feed(Fetched(command.attempt, self._clock(), model=model, golden=golden))

    async def _load(self, command: Load) -> None:
        """Load the model beside the one serving."""
        try:
            slot = await asyncio.to_thread(self._open, command.release, command.model)
        except Exception as exc:  # noqa: BLE001 (every failure is told to the engine)
            self.feed(Loaded(command.attempt, self._clock(), failure=_failure(exc)))
        else:
            if command.attempt == self.engine.attempt:  # else superseded while it loaded
                self._tested[command.attempt] = slot
            self.feed(Loaded(command.attempt, self._clock(), fallback=slot.fallback))

    async def _self_test(self, command: SelfTest) -> None:
        """Run the release's golden set, or else one real input (the source is called
        on the loop, like everywhere else; zeros of the declared inputs without one)."""
        slot = self._tested.get(command.attempt)
        if slot is None:
            return  # cancelled meanwhile
        try:
            check = self._inference.sample(slot) if command.golden is None else command.golden
            await asyncio.to_thread(self._check, slot, check)
        except Exception as exc:  # noqa: BLE001 (every failure is told to the engine)
            self._tested.pop(command.attempt, None)
            self.feed(SelfTested(command.attempt, self._clock(), failure=_failure(exc)))
        else:
            self.feed(SelfTested(command.attempt, self._clock()))

    @staticmethod
    def _check(slot: ModelSlot, check: Path | Feed) -> None:
        slot.self_test(read_golden(check) if isinstance(check, Path) else check)
