"""The inference path: every inference the device makes, whoever asks for it.

Theory of operation. Callers on the loop (the paced input source, and
:meth:`Inference.infer` for applications and the local endpoint) hand in a job and wait
for it; the jobs waiting at one moment run as one batch where the model's first dimension
is free (stacked along it, the outputs handed back as views), at most ``max_batch`` rows
per model call. A batch that fails is run again job by job, so that only the job at fault
fails. Each job is counted (the telemetry window, the engine's soak) before its caller
sees it, a batch in one update: sources, the endpoint and the embedding API share one
counting.

Where a batch runs depends on the model. A tiny one runs inline, on the loop: a caller
whose job fits ``inline_ms`` of model time (estimated from the model's last call, see
:attr:`ModelSlot.row_ms`) while the worker is idle yields once (``asyncio.sleep(0)``), so
that the callers ready at that moment join it, and the first of them back runs the batch
for all: no thread hop and no future. Everything else (a slower model, more work than
``inline_ms``, a model not yet measured, a busy worker) goes to the one worker thread
through a queue: onnxruntime releases the GIL, so the model overlaps the loop; the worker
takes every job waiting and gives results back with one ``loop.call_soon_threadsafe`` per
batch.

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
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

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


@dataclass(slots=True, eq=False)
class _Job:
    slot: ModelSlot
    feed: Inputs
    rows: int
    future: asyncio.Future[None] | None = None
    """Set for a job handed to the worker: done once the job is delivered."""
    outputs: Outputs | None = None
    error: str | None = None
    ran: bool = False

    def shape_key(self) -> tuple[object, ...]:
        """What must agree for jobs to be stacked into one batch."""
        return tuple((n, a.dtype, a.shape[1:]) for n, a in self.feed.items())


@types.coroutine
def _next_turn() -> Generator[None, None, None]:
    """Let the tasks ready now run first: ``asyncio.sleep(0)`` without its own frame."""
    yield


def _stacks(first: _Job, job: _Job) -> bool:
    slot = first.slot
    return (
        job.slot is slot
        and slot.batchable
        and (slot.uniform or job.shape_key() == first.shape_key())
    )


def _batches(jobs: list[_Job], max_rows: int) -> Iterator[list[_Job]]:
    """Runs of consecutive jobs that can go through the model as one call."""
    group: list[_Job] = []
    rows = 0
    for job in jobs:
        if group and (rows + job.rows > max_rows or not _stacks(group[0], job)):
            yield group
            group, rows = [], 0
        group.append(job)
        rows += job.rows
    if group:
        yield group


def _run_jobs(jobs: list[_Job], max_rows: int) -> list[Tally]:
    """Run ``jobs`` in batches; what they count, one tally per run of jobs of a release."""
    tallies: list[Tally] = []
    for group in _batches(jobs, max_rows):
        slot = group[0].slot
        if not tallies or tallies[-1].sha256 != slot.sha256:
            tallies.append(slot.tally())
        _run_batch(group, tallies[-1])
    return tallies


def _run_one(job: _Job, tally: Tally) -> None:
    job.ran = True
    try:
        outputs, latency_ms = job.slot.timed(job.feed)
    except Exception as exc:  # noqa: BLE001 (any model failure is this job's error)
        job.error = str(exc)
        tally.add(None)
        return
    job.slot.row_ms = latency_ms / job.rows
    _finish(job, outputs, latency_ms, tally)


def _finish(job: _Job, outputs: Outputs, latency_ms: float, tally: Tally) -> None:
    job.ran = True
    try:
        result = ModelSlot.summarise(outputs, latency_ms)
    except ValueError as exc:
        job.error = str(exc)
        tally.add(None)
    else:
        job.outputs = outputs
        tally.add(result)


def _run_batch(group: list[_Job], tally: Tally) -> None:
    """Run ``group`` as one call; job by job when the batch fails or its outputs do not
    have one row per input row; each job judged on its own rows when some are not finite."""
    if len(group) == 1:
        _run_one(group[0], tally)
        return
    slot = group[0].slot
    counts = np.fromiter((job.rows for job in group), dtype=np.intp, count=len(group))
    ends = np.cumsum(counts)
    total = int(ends[-1])
    try:
        names = group[0].feed
        outputs, latency_ms = slot.timed(
            {name: np.concatenate([job.feed[name] for job in group]) for name in names}
        )
    except Exception:  # noqa: BLE001 (find the job at fault below)
        outputs, latency_ms = {}, 0.0
    if not outputs or any(a.ndim == 0 or a.shape[0] != total for a in outputs.values()):
        for job in group:
            _run_one(job, tally)
        return
    slot.row_ms = latency_ms / total
    starts = ends - counts
    spans = zip(group, starts.tolist(), ends.tolist(), strict=True)
    try:
        confidences, labels = ModelSlot.first_rows(outputs, starts)
    except ValueError:  # non-finite values: in whose rows?
        for job, start, end in spans:
            _finish(job, {n: a[start:end] for n, a in outputs.items()}, latency_ms, tally)
        return
    items = list(outputs.items())
    for job, start, end in spans:
        job.outputs = {name: a[start:end] for name, a in items}
        job.ran = True
    tally.add_batch(latency_ms, len(group), confidences, labels)


class _Worker:
    """The thread that runs every inference not run inline (see the module's docstring)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        deliver: Callable[[list[_Job], list[Tally]], None],
        max_rows: int,
    ) -> None:
        self._loop = loop
        self._deliver = deliver
        self._max_rows = max_rows
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="inference", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: _Job) -> None:
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
            self._post(jobs, _run_jobs(jobs, self._max_rows))
        left: list[_Job] = []
        with contextlib.suppress(queue.Empty):
            while True:
                more = self._queue.get_nowait()
                if more is not None:
                    left.append(more)
        if left:
            self._post(left, [])

    def _post(self, jobs: list[_Job], tallies: list[Tally]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            self._loop.call_soon_threadsafe(self._deliver, jobs, tallies)


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
        self._loaded = asyncio.Event()
        self._worker: _Worker | None = None
        self._waiting = 0
        self._busy = 0
        """Jobs handed to the worker and not yet delivered."""
        self._inline: list[_Job] = []
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
        self._slot = slot
        if slot is None:
            self._loaded.clear()
        else:
            self._loaded.set()

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
                self._deliver(jobs, _run_jobs(jobs, self._max_batch))
        if job.outputs is not None:
            return Prediction(job.outputs, job.slot.release)
        if not job.ran:
            msg = "the agent stopped"
            raise NotReadyError(msg)
        raise InferenceFailedError(job.error or "inference failed")

    def _admit(self, feed: Inputs) -> tuple[_Job, float]:
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
        job = _Job(slot, feed, rows)
        row_ms = slot.row_ms
        cost = 0.0 if row_ms is None else row_ms * rows
        if self._busy or row_ms is None or self._inline_cost + cost > self._inline_ms:
            job.future = asyncio.get_running_loop().create_future()
            self._busy += 1
            worker.submit(job)
        else:
            self._inline.append(job)
            self._inline_cost += cost
        return job, cost

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

    def _deliver(self, jobs: list[_Job], tallies: list[Tally]) -> None:
        """On the loop: count what ran, then wake the callers that wait on the worker."""
        now = self._clock()
        self._waiting -= len(jobs)
        for tally in tallies:
            self._count(tally, now)
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
