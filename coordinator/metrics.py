"""What the coordinator counts about its ingest, in one place: every drop, every overflow,
and what became of each telemetry summary. Plain integers on the event loop; the services
add to them, and an exporter (logs today, Prometheus later) reads :meth:`Counters.snapshot`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["Counters"]


@dataclass
class Counters:
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

    def snapshot(self) -> dict[str, int]:
        return asdict(self)
