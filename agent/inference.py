"""The inference path: every inference the device makes, whoever asks for it.

Theory of operation. One worker thread runs the model; onnxruntime releases the GIL, so
it overlaps the event loop. Callers on the loop (the paced input source, and
:meth:`Inference.infer` for applications and the local endpoint) put a job on a queue and
await a future: no thread hop per request. The worker takes every job waiting, up to
``max_batch`` rows, runs the jobs for the same model as one batch where the model's first
dimension is free (stacked along it, the outputs handed back as views), and gives the
results back with one ``loop.call_soon_threadsafe`` per batch. A batch that fails is run
again job by job, so that only the job at fault fails. On the loop every result is
counted (the telemetry window, the engine's soak) before its caller sees it: sources,
the endpoint and the embedding API share one counting.

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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from agent.events import EngineEvent, Inferred
from agent.limits import Limits
from agent.runtime import Feed, InferenceError, InferenceResult, Inputs, ModelSlot, Outputs
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
    feed: Mapping[str, npt.NDArray[np.generic]]
    rows: int
    future: asyncio.Future[Prediction]
    outputs: Outputs | None = None
    result: InferenceResult | None = None
    error: str | None = None
    ran: bool = False

    def shape_key(self) -> tuple[object, ...]:
        """What must agree for jobs to be stacked into one batch."""
        return tuple((n, a.dtype, a.shape[1:]) for n, a in self.feed.items())


def _batches(jobs: list[_Job]) -> Iterator[list[_Job]]:
    """Runs of consecutive jobs that can go through the model as one call."""
    group: list[_Job] = []
    for job in jobs:
        if group and not (
            job.slot is group[0].slot
            and job.slot.batchable
            and job.shape_key() == group[0].shape_key()
        ):
            yield group
            group = []
        group.append(job)
    if group:
        yield group


def _finish(job: _Job, outputs: Outputs, latency_ms: float) -> None:
    job.ran = True
    try:
        job.result = ModelSlot.summarise(outputs, latency_ms)
    except ValueError as exc:
        job.error = str(exc)
    else:
        job.outputs = outputs


def _run_one(job: _Job) -> None:
    try:
        outputs, latency_ms = job.slot.timed(job.feed)
    except Exception as exc:  # noqa: BLE001 (any model failure is this job's error)
        job.ran = True
        job.error = str(exc)
    else:
        _finish(job, outputs, latency_ms)


def _run_batch(group: list[_Job]) -> None:
    """Run ``group`` as one call; job by job when the batch fails or its outputs do not
    have one row per input row."""
    if len(group) == 1:
        _run_one(group[0])
        return
    names = group[0].feed.keys()
    feed = {name: np.concatenate([job.feed[name] for job in group]) for name in names}
    total = sum(job.rows for job in group)
    try:
        outputs, latency_ms = group[0].slot.timed(feed)
    except Exception:  # noqa: BLE001 (find the job at fault below)
        outputs, latency_ms = {}, 0.0
    if not outputs or any(a.ndim == 0 or a.shape[0] != total for a in outputs.values()):
        for job in group:
            _run_one(job)
        return
    start = 0
    for job in group:
        end = start + job.rows
        _finish(job, {name: a[start:end] for name, a in outputs.items()}, latency_ms)
        start = end


class _Worker:
    """The thread that runs every inference (see the module's docstring)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        deliver: Callable[[list[_Job]], None],
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
            for group in _batches(jobs):
                _run_batch(group)
            self._post(jobs)
        left: list[_Job] = []
        with contextlib.suppress(queue.Empty):
            while True:
                more = self._queue.get_nowait()
                if more is not None:
                    left.append(more)
        if left:
            self._post(left)

    def _post(self, jobs: list[_Job]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            self._loop.call_soon_threadsafe(self._deliver, jobs)


class Inference:
    """Every inference of the device: the paced source loop (at ``hz``, if there is a
    source) and :meth:`infer`; counts what it did."""

    def __init__(
        self,
        source: InputSource | None,
        *,
        device_id: str,
        hz: float,
        record: Callable[[str, InferenceResult | None], None],
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
        self._slot: ModelSlot | None = None
        self._loaded = asyncio.Event()
        self._worker: _Worker | None = None
        self._waiting = 0
        self.total = 0
        self.errors = 0
        self.last_at: float | None = None

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
        slot, worker = self._slot, self._worker
        if slot is None or worker is None:
            msg = "no model serves here yet"
            raise NotReadyError(msg)
        rows = slot.check_feed(feed)
        if self._waiting >= self._max_waiting:
            msg = f"{self._waiting} inferences wait already"
            raise OverloadedError(msg)
        future: asyncio.Future[Prediction] = asyncio.get_running_loop().create_future()
        self._waiting += 1
        worker.submit(_Job(slot, feed, rows, future))
        return await future

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
                self._count(slot, None, self._clock())
            next_at += self._interval
            delay = next_at - time.monotonic()
            if delay < 0:
                next_at = time.monotonic()
                delay = 0
            await asyncio.sleep(delay)

    def _deliver(self, jobs: list[_Job]) -> None:
        """On the loop: count each job's outcome, then answer its caller."""
        now = self._clock()
        self._waiting -= len(jobs)
        for job in jobs:
            future = job.future
            if not job.ran:
                if not future.done():
                    future.set_exception(NotReadyError("the agent stopped"))
                continue
            self._count(job.slot, job.result, now)
            if future.done():  # the caller gave up meanwhile
                continue
            if job.outputs is not None:
                future.set_result(Prediction(job.outputs, job.slot.release))
            else:
                future.set_exception(InferenceFailedError(job.error or "inference failed"))

    def _count(self, slot: ModelSlot, result: InferenceResult | None, now: float) -> None:
        self.total += 1
        self.last_at = now
        release = slot.release
        self._record(release.release_id, result)
        if result is None:
            self.errors += 1
        latency = None if result is None else result.latency_ms
        self._feed(Inferred(release.artifact.sha256, latency, now))
