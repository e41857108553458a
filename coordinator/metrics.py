"""What the coordinator counts about its ingest and its stores, in one place: every drop
(by reason), every overflow, what became of each telemetry summary, and how long the
stores' writes take. Plain numbers on the event loop; the services add to them, and the
exporter (``coordinator.exporter``, for Prometheus) reads them there.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Final

from schemas.errors import Reason

__all__ = ["FAILED", "REFUSALS", "WRITE_BUCKETS_S", "WRONG_DEVICE", "Counters", "Latency"]

WRONG_DEVICE: Final = "wrong_device"
"""A refusal: a device's message that names another device."""
FAILED: Final = "failed"
"""A refusal: handling the message failed (a bug, logged with its cause)."""
REFUSALS: Final = frozenset({*(r.value for r in Reason), WRONG_DEVICE, FAILED})
"""Every reason a message is refused for: a bounded set (the exporter's labels)."""
WRITE_BUCKETS_S: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0
)  # fmt: skip


@dataclass
class Latency:
    """How long one kind of write took, in the buckets of :data:`WRITE_BUCKETS_S`."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(WRITE_BUCKETS_S) + 1))
    """Writes per bucket: ``counts[i]`` took at most ``WRITE_BUCKETS_S[i]`` (and more than
    the bound before); the last, longer than every bound."""
    total_s: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(WRITE_BUCKETS_S, seconds)] += 1
        self.total_s += seconds


@dataclass
class Counters:
    messages_ingested: int = 0
    """Messages the ingest took from the session (every topic)."""
    refused: Counter[str] = field(default_factory=Counter)
    """Messages refused, by reason (one of :data:`REFUSALS`)."""
    store_writes: Latency = field(default_factory=Latency)
    """The coordinator store's writes (rollout records, classes, audit), each in its thread."""
    telemetry_commit_writes: Latency = field(default_factory=Latency)
    """The telemetry ledger's group commits, each in its thread."""
    incoming_overflow: int = 0
    """Messages the session dropped: QoS 0 beyond its incoming queue (QoS 1 is held back
    by the Receive Maximum instead, and waits in the broker)."""
    messages_dropped: int = 0
    """Messages refused (malformed, of another device, or their handler failed)."""
    ingest_batches: int = 0
    """Batches of waiting messages the ingest took (one message or more each)."""
    ingest_batches_threaded: int = 0
    """Of them, those long enough to be read in a thread (a burst)."""
    ingest_messages_threaded: int = 0
    """Messages read in a thread, in those batches."""
    telemetry_counted: int = 0
    """Summaries counted (a merged summary is one)."""
    telemetry_duplicates: int = 0
    """Summaries counted before (redelivered or sent again): dropped, acknowledged again."""
    telemetry_early: int = 0
    """Summaries dropped because an earlier number of their stream is missing (the broker
    lost or dropped it): the device sends both again; a rising count means loss in transit."""
    telemetry_stale: int = 0
    """Summaries of a stream the device has left (an outbox it replaced): dropped."""
    telemetry_overlaps: int = 0
    """Summaries overlapping what was counted without being a duplicate (no agent sends
    them): dropped."""
    telemetry_skipped: int = 0
    """Numbers a device said it no longer holds while they were not counted here: lost on
    the device (a damaged outbox) or acknowledged to a store this coordinator lost."""
    telemetry_unnumbered: int = 0
    """Summaries of agents before end-to-end delivery, counted by id (not acknowledged)."""
    telemetry_commits: int = 0
    telemetry_commit_failures: int = 0
    acks_published: int = 0
    acks_failed: int = 0
    """Acks the broker did not take: kept and published again."""

    def refuse(self, reason: str) -> None:
        """Count a message refused for ``reason`` (outside :data:`REFUSALS`: as failed)."""
        self.messages_dropped += 1
        self.refused[reason if reason in REFUSALS else FAILED] += 1

    def snapshot(self) -> dict[str, int]:
        """Every plain count, by name."""
        counts = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: value for name, value in counts.items() if isinstance(value, int)}
