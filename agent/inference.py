"""The inference loop: the device's reason to exist, run whatever else happens.

It serves from the slot it is given (:attr:`Inference.slot`; the update service swaps
it), at a fixed rate, and tells each outcome to the telemetry window and to the engine
(which counts the soak of a model under test). The input source is called on the loop:
sources (camera drivers) need not be thread-safe; the model runs in a thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from agent.events import EngineEvent, Inferred
from agent.runtime import Feed, InferenceResult, ModelSlot

__all__ = ["Inference", "InputSource"]

log = logging.getLogger(__name__)


class InputSource(Protocol):
    """Where the device's inputs come from (a camera, a sensor); one feed per call."""

    def __call__(self) -> Feed: ...


class Inference:
    """Runs the active model at ``hz``; counts what it did."""

    def __init__(
        self,
        source: InputSource,
        *,
        device_id: str,
        hz: float,
        record: Callable[[str, InferenceResult | None], None],
        feed: Callable[[EngineEvent], None],
        clock: Callable[[], float],
    ) -> None:
        self.source = source
        self._device_id = device_id
        self._interval = 1.0 / hz
        self._record = record
        self._feed = feed
        self._clock = clock
        self.slot: ModelSlot | None = None
        self.total = 0
        self.errors = 0
        self.last_at: float | None = None

    async def run(self) -> None:
        next_at = time.monotonic()
        while True:
            slot = self.slot
            if slot is not None:
                result: InferenceResult | None = None
                try:
                    feed = self.source()  # on the loop: sources need not be thread-safe
                    result = await asyncio.to_thread(slot.run, feed)
                except Exception as exc:  # noqa: BLE001 (a camera or model failure: an inference error)
                    log.debug("%s: inference error: %s", self._device_id, exc)
                self._count(slot, result)
            next_at += self._interval
            delay = next_at - time.monotonic()
            if delay < 0:
                next_at = time.monotonic()
                delay = 0
            await asyncio.sleep(delay)

    def _count(self, slot: ModelSlot, result: InferenceResult | None) -> None:
        now = self._clock()
        self.total += 1
        self.last_at = now
        release = slot.release
        self._record(release.release_id, result)
        if result is None:
            self.errors += 1
        latency = None if result is None else result.latency_ms
        self._feed(Inferred(release.artifact.sha256, latency, now))
