"""The inference path: every inference the device makes, whoever asks for it.

Theory of operation. Callers on the loop (the paced input source, and
:meth:`Inference.infer` for applications and the local endpoint) hand in a job and wait
for it; the jobs waiting at one moment run in batches (:mod:`agent.batches`). Each job is
counted (the telemetry window, the engine's soak) before its caller sees it, a batch in
one update: sources, the endpoint and the embedding API share one counting.

Where a batch runs depends on the model. A tiny one runs inline, on the loop: while the
worker is idle, a caller whose model's last call took at most ``inline_ms`` and whose job
fits the turn's ``inline_ms`` of model time (estimated from that call, see
:meth:`ModelSlot.took`) yields once (``asyncio.sleep(0)``), so that the callers ready at
that moment join it, and the first of them back runs the batch for all: no thread hop and
no future. Everything else (a slower model, more work than ``inline_ms``, a model not yet
measured, a busy worker) goes to the one worker thread through a queue: onnxruntime
releases the GIL, so the model overlaps the loop; the worker takes every job waiting and
gives results back with one ``loop.call_soon_threadsafe`` per batch. While a candidate
soaks in the shadow of the serving model (:attr:`Inference.shadow`) every job goes to the
worker, which runs the candidate on the same batch after the serving model and compares
their answers; the candidate answers nobody and counts only for its soak.

The model served is :attr:`Inference.slot` (the update service swaps it). With no model,
callers are told :class:`NotReadyError` and the paced loop sleeps until one is loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
import types
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Protocol

from agent.batches import Job, run_beside, run_jobs
from agent.events import EngineEvent, Inferred
from agent.limits import Limits
from agent.runtime import Feed, InferenceError, Inputs, ModelSlot, Outputs, Tally
from schemas import Release

__all__ = [
    "Inference",
    "InferenceFailedError",
    "InputSource",
    "NotReadyError",
    "OverloadedError",
    "Prediction",
]

log = logging.getLogger(__name__)


class InputSource(Protocol):
    """Where the device's inputs come from (a camera, a sensor); one feed per call."""

    def __call__(self) -> Feed: ...


class NotReadyError(InferenceError):
    """No model serves here yet (or the agent is not running)."""


class OverloadedError(InferenceError):
    """Too many inferences wait already; ask again later."""


class InferenceFailedError(InferenceError):
    """The model failed on these inputs, or gave non-finite outputs (counted as an
    inference error of the release serving)."""


@dataclass(frozen=True, slots=True)
class Prediction:
    """The model's answer, and the release that gave it."""

    outputs: Outputs
    release: Release

    @property
    def release_id(self) -> str:
        return self.release.release_id


@types.coroutine
def _next_turn() -> Generator[None, None, None]:
    """Let the tasks ready now run first: ``asyncio.sleep(0)`` without its own frame."""
    yield


class _Worker:
    """The thread that runs every inference not run inline (see the module's docstring)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        deliver: Callable[[list[Job], list[Tally], list[Tally]], None],
        max_rows: int,
    ) -> None:
        self._loop = loop
        self._deliver = deliver
        self._max_rows = max_rows
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="inference", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    async def stop(self) -> None:
        """Finish the batch in hand; jobs still queued are handed back unrun."""
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)

    def _serve(self) -> None:
        stopping = False
        while not stopping:
            job = self._queue.get()
            if job is None:
                break
            jobs, rows = [job], job.rows
            while rows < self._max_rows:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    break
                jobs.append(more)
                rows += more.rows
            tallies = run_jobs(jobs, self._max_rows)
            self._post(jobs, tallies, run_beside(jobs, self._max_rows))
        left: list[Job] = []
        with contextlib.suppress(queue.Empty):
            while True:
                more = self._queue.get_nowait()
                if more is not None:
                    left.append(more)
        if left:
            self._post(left, [], [])

    def _post(self, jobs: list[Job], tallies: list[Tally], shadows: list[Tally]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            self._loop.call_soon_threadsafe(self._deliver, jobs, tallies, shadows)


class Inference:
    """Every inference of the device: the paced source loop (at ``hz``, if there is a
    source) and :meth:`infer`; counts what it did."""

    def __init__(
        self,
        source: InputSource | None,
        *,
        device_id: str,
        hz: float,
        record: Callable[[Tally], None],
        feed: Callable[[EngineEvent], None],
        clock: Callable[[], float],
        limits: Limits,
    ) -> None:
        self.source = source
        self._device_id = device_id
        self._interval = 1.0 / hz
        self._record = record
        self._feed = feed
        self._clock = clock
        self._max_batch = limits.max_batch
        self._max_waiting = limits.max_waiting
        self._inline_ms = limits.inline_ms
        self._slot: ModelSlot | None = None
        self._shadow: tuple[ModelSlot, ModelSlot] | None = None
        """The serving slot and the candidate that runs beside it."""
        self._loaded = asyncio.Event()
        self._worker: _Worker | None = None
        self._waiting = 0
        self._busy = 0
        """Jobs handed to the worker and not yet delivered."""
        self._inline: list[Job] = []
        """Jobs to run inline by the first of their callers back on the loop."""
        self._inline_cost = 0.0
        self.total = 0
        self.errors = 0
        self.last_at: float | None = None
        self.turns = {"inline": 0, "worker": 0}
        """How many times jobs ran inline on the loop or in the worker (one or more
        model calls each): where the path spends its time, for ``bench/agent.py``."""

    @property
    def slot(self) -> ModelSlot | None:
        """The model serving, None before one is loaded."""
        return self._slot

    @slot.setter
    def slot(self, slot: ModelSlot | None) -> None:
        """Serve ``slot`` (None: nothing), and it alone: a shadow ends."""
        self._slot = slot
        self._shadow = None
        if slot is None:
            self._loaded.clear()
        else:
            self._loaded.set()

    @property
    def shadow(self) -> ModelSlot | None:
        """The candidate running beside the serving model, never answering: every job
        for that model then goes to the worker, which runs the candidate on it too."""
        return None if self._shadow is None else self._shadow[1]

    @shadow.setter
    def shadow(self, candidate: ModelSlot | None) -> None:
        slot = self._slot
        self._shadow = None if candidate is None or slot is None else (slot, candidate)

    @property
    def ready(self) -> bool:
        """Whether an inference asked now would run."""
        return self._slot is not None and self._worker is not None

    async def until_ready(self) -> None:
        """Return once a model serves (the worker runs once :meth:`run` runs)."""
        while not self.ready:
            await self._loaded.wait()
            if self._worker is None:
                await asyncio.sleep(0.01)

    def sample(self, slot: ModelSlot) -> Feed:
        """A real input for a self-test: the source's next, or zeros without a source."""
        return slot.blank_feed() if self.source is None else self.source()

    async def infer(self, feed: Inputs) -> Prediction:
        """Run the serving model on ``feed`` (counted like every inference).

        Raises:
            InvalidInputError: ``feed`` does not fit the serving release's inputs.
            NotReadyError: no model serves yet, or the agent is not running.
            OverloadedError: ``max_waiting`` inferences wait already.
            InferenceFailedError: the model failed on ``feed``.
        """
        job, cost = self._admit(feed)
        if job.future is not None:
            await job.future
        else:
            try:
                await _next_turn()  # the callers ready now join; the first back runs all
            except asyncio.CancelledError:
                if not job.ran:  # its caller gave up before it ran: nothing to count
                    self._inline.remove(job)
                    self._inline_cost -= cost
                    self._waiting -= 1
                raise
            if not job.ran:
                jobs, self._inline, self._inline_cost = self._inline, [], 0.0
                self.turns["inline"] += 1
                self._deliver(jobs, run_jobs(jobs, self._max_batch), [])
        if job.outputs is not None:
            return Prediction(job.outputs, job.slot.release)
        if not job.ran:
            msg = "the agent stopped"
            raise NotReadyError(msg)
        raise InferenceFailedError(job.error or "inference failed")

    def _admit(self, feed: Inputs) -> tuple[Job, float]:
        """A job for ``feed``, queued inline (with its estimated cost) or handed to the
        worker (with a future), as the module's docstring tells.

        Raises:
            InvalidInputError, NotReadyError, OverloadedError: see :meth:`infer`.
        """
        slot, worker = self._slot, self._worker
        if slot is None or worker is None:
            msg = "no model serves here yet"
            raise NotReadyError(msg)
        rows = slot.check_feed(feed)
        if self._waiting >= self._max_waiting:
            msg = f"{self._waiting} inferences wait already"
            raise OverloadedError(msg)
        self._waiting += 1
        job = Job(slot, feed, rows)
        shadow = self._shadow
        if shadow is not None and shadow[0] is slot:
            job.shadow = shadow[1]
        cost = self._inline_cost_of(slot, rows)
        if cost is None:
            job.future = asyncio.get_running_loop().create_future()
            self._busy += 1
            worker.submit(job)
            return job, 0.0
        self._inline.append(job)
        self._inline_cost += cost
        return job, cost

    def _inline_cost_of(self, slot: ModelSlot, rows: int) -> float | None:
        """The estimated model time of ``rows`` of ``slot`` run inline this turn; None when
        they go to the worker: a shadow runs, the worker is busy, the model is not yet
        measured or its last call took more than ``inline_ms``, or the turn's inline work
        would."""
        row_ms = slot.row_ms
        if self._shadow or self._busy or row_ms is None or slot.call_ms > self._inline_ms:
            return None
        cost = row_ms * rows
        return cost if self._inline_cost + cost <= self._inline_ms else None

    async def run(self) -> None:
        """Run the worker, and the paced source loop if there is a source."""
        worker = _Worker(asyncio.get_running_loop(), self._deliver, self._max_batch)
        worker.start()
        self._worker = worker
        try:
            if self.source is None:
                await asyncio.get_running_loop().create_future()  # serve until cancelled
            else:
                await self._paced(self.source)
        finally:
            self._worker = None
            await worker.stop()

    async def _paced(self, source: InputSource) -> None:
        next_at = time.monotonic()
        while True:
            slot = self._slot
            if slot is None:
                await self._loaded.wait()  # no wake-ups without a model
                next_at = time.monotonic()
                continue
            try:
                feed = source()  # on the loop: sources need not be thread-safe
                await self.infer(feed)
            except (NotReadyError, OverloadedError):
                pass  # nothing ran, nothing to count
            except InferenceFailedError:
                pass  # counted where it was delivered
            except Exception as exc:  # noqa: BLE001 (a camera failure, a feed that does not fit)
                log.debug("%s: inference error: %s", self._device_id, exc)
                failed = slot.tally()
                failed.add(None)
                self._count(failed, self._clock())
            next_at += self._interval
            delay = next_at - time.monotonic()
            if delay < 0:
                next_at = time.monotonic()
                delay = 0
            await asyncio.sleep(delay)

    def _deliver(self, jobs: list[Job], tallies: list[Tally], shadows: list[Tally]) -> None:
        """On the loop: count what ran (a shadow's runs only for its soak: it answered
        nobody), then wake the callers that wait on the worker."""
        now = self._clock()
        self._waiting -= len(jobs)
        for tally in tallies:
            self._count(tally, now)
        for tally in shadows:
            runs = tuple(tally.runs)
            self._feed(
                Inferred(tally.sha256, runs, tally.errors, now, tally.compared, tally.agreed)
            )
        if tallies and jobs[0].future is not None:
            self.turns["worker"] += 1
        for job in jobs:
            future = job.future
            if future is not None:
                self._busy -= 1
                if not future.done():  # else the caller gave up meanwhile
                    future.set_result(None)

    def _count(self, tally: Tally, now: float) -> None:
        self.total += tally.count
        self.errors += tally.errors
        self.last_at = now
        self._record(tally)
        self._feed(Inferred(tally.sha256, tuple(tally.runs), tally.errors, now))
