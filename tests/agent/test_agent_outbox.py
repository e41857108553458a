"""The store-and-forward queue: FIFO, durable, deletes only what was acked, and when full
merges old telemetry into coarser windows without losing a single count (never a row the
MQTT client may still deliver)."""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from agent.outbox import EVENT, Outbox, OutboxItem
from agent.runtime import InferenceResult
from agent.telemetry import TelemetryWindow
from schemas import LogHistogram, TelemetrySummary, decode, merge_summaries
from tests.agent.parts import tally

TOPIC = "fleet/v1/devices/dev-0001/telemetry"
EVENTS = "fleet/v1/devices/dev-0001/events"
RELEASE = "digits-v1@0123456789ab"
T0 = 1_700_000_000.0


def _summary(index: int) -> TelemetrySummary:
    """One real window of varied inferences: latencies, confidences, labels and errors."""
    window = TelemetryWindow("dev-0001", started=T0 + 10.0 * index)
    for k in range(3 + index % 4):
        window.record(
            tally(
                RELEASE,
                InferenceResult(
                    latency_ms=0.05 + ((index * 7 + k * 3) % 40) * 0.9,
                    confidence=((index * 13 + k * 29) % 101) / 100.0,
                    label=(index + k) % 10,
                ),
            )
        )
    if index % 3 == 0:
        window.record(tally(RELEASE, None))
    return window.close(T0 + 10.0 * index + 10.0)


def _summaries(items: list[OutboxItem]) -> list[TelemetrySummary]:
    return [decode(i.payload, TelemetrySummary) for i in items if i.kind == "telemetry"]


def _total(summaries: list[TelemetrySummary]) -> TelemetrySummary:
    total = summaries[0]
    for s in summaries[1:]:
        total = merge_summaries(total, s)
    return total


def _all(outbox: Outbox) -> list[OutboxItem]:
    return outbox.peek(1_000_000)


def test_messages_come_out_in_the_order_they_went_in(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite")
    sent = [(f"kind-{i % 2}", f"topic/{i}", f"payload {i}".encode()) for i in range(12)]
    for kind, topic, payload in sent:
        outbox.append(kind, topic, payload)

    items = _all(outbox)
    assert [(i.kind, i.topic, i.payload) for i in items] == sent
    assert [i.id for i in items] == sorted(i.id for i in items)
    assert [(i.topic) for i in outbox.peek(3)] == ["topic/0", "topic/1", "topic/2"]
    outbox.close()


def test_queued_messages_survive_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    outbox = Outbox(path)
    summary = outbox.append_summary(TOPIC, _summary(1))
    outbox.append("event", EVENTS, b"rolled back")
    before = _all(outbox)
    outbox.close()

    reopened = Outbox(path)
    assert _all(reopened) == before
    assert _summaries(_all(reopened)) == [summary]
    # Ids keep growing after a restart, so FIFO order holds across it.
    reopened.append("event", EVENTS, b"after restart")
    assert _all(reopened)[-1].payload == b"after restart"
    assert _all(reopened)[-1].id > max(i.id for i in before)
    reopened.close()


def test_settle_forgets_only_the_acked_ids(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite")
    for i in range(5):
        outbox.append("event", EVENTS, f"e{i}".encode())
    items = _all(outbox)

    outbox.settle([items[1].id, items[3].id, 10_000], [items[0].id])
    assert [i.payload for i in _all(outbox)] == [b"e0", b"e2", b"e4"]
    outbox.settle([], [])
    assert len(outbox) == 3
    outbox.close()


def test_outbox_database_is_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    box = Outbox(path)
    assert len(box) == 0  # the first call opens the file
    box.close()
    with sqlite3.connect(path) as db:
        (mode,) = db.execute("PRAGMA journal_mode").fetchone()
    assert mode == "wal"


def test_full_outbox_coarsens_old_telemetry_and_conserves_every_count(tmp_path: Path) -> None:
    cap = 8
    outbox = Outbox(tmp_path / "outbox.sqlite", max_items=cap)
    appended = [_summary(i) for i in range(40)]
    for summary in appended:
        outbox.append_summary(TOPIC, summary)
        assert len(outbox) <= cap

    assert outbox.coarsened > 0
    kept = _summaries(_all(outbox))
    assert len(kept) < len(appended)
    total, expected = _total(kept), _total(appended)
    assert sum(s.windows for s in kept) == len(appended)
    assert total.count == expected.count == sum(s.count for s in appended)
    assert total.errors == expected.errors > 0
    assert Counter(total.labels) == sum((Counter(s.labels) for s in appended), Counter())
    assert total.confidence == tuple(map(sum, zip(*(s.confidence for s in appended), strict=True)))
    assert total.latency_ms == LogHistogram.from_counts(
        sum((Counter(dict(s.latency_ms.buckets)) for s in appended), Counter())
    )
    # Coarser, but still in time order and covering the whole span.
    assert [s.window_start for s in kept] == sorted(s.window_start for s in kept)
    assert min(s.window_start for s in kept) == appended[0].window_start
    assert max(s.window_end for s in kept) == appended[-1].window_end
    outbox.close()


def test_coarsening_never_merges_or_drops_events(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite", max_items=6)
    events: list[bytes] = []
    for i in range(30):
        if i % 5 == 0:
            events.append(f"event {i}".encode())
            outbox.append("event", EVENTS, events[-1])
        else:
            outbox.append_summary(TOPIC, _summary(i))

    items = _all(outbox)
    assert outbox.coarsened > 0
    assert [i.payload for i in items if i.kind == "event"] == events
    assert all(i.topic == EVENTS for i in items if i.kind == "event")
    outbox.close()


def test_outbox_of_only_events_grows_past_its_cap_rather_than_drop_one(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite", max_items=4)
    for i in range(9):
        outbox.append("event", EVENTS, f"event {i}".encode())
    assert [i.payload for i in _all(outbox)] == [f"event {i}".encode() for i in range(9)]
    assert outbox.coarsened == 0
    outbox.close()


def test_summary_merged_into_a_row_in_flight_is_not_lost_when_that_row_is_acked(
    tmp_path: Path,
) -> None:
    """The flush loop peeks a batch, awaits the PUBACKs, then settles the batch, while
    the telemetry loop keeps appending. Coarsening in between must not fold a queued window
    into a row whose *original* bytes are on the wire: the coordinator counts those bytes,
    and deleting that row on its ack would silently drop the folded-in window."""
    outbox = Outbox(tmp_path / "outbox.sqlite", max_items=4)
    appended = [_summary(i) for i in range(5)]
    for summary in appended[:4]:
        outbox.append_summary(TOPIC, summary)

    in_flight = outbox.peek(1)
    delivered = _summaries(in_flight)
    outbox.append_summary(TOPIC, appended[4])  # at the cap: coarsens while row 1 is in flight
    outbox.settle([i.id for i in in_flight], [])  # its PUBACK arrives
    (counted,) = delivered
    assert counted.stream is not None
    assert counted.last_seq is not None
    assert outbox.acknowledge(counted.stream, counted.last_seq) == 1  # and the coordinator's ack

    still_queued = _summaries(_all(outbox))
    assert sum(s.count for s in delivered + still_queued) == sum(s.count for s in appended)
    outbox.close()


def test_events_beyond_their_cap_drop_the_oldest_and_the_next_event_counts_them(
    tmp_path: Path,
) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite", max_items=100, max_events=4)
    told: list[int] = []

    def build(n: int) -> Callable[[int], bytes]:
        def payload(dropped: int) -> bytes:
            told.append(dropped)
            return f"event {n} ({dropped} dropped)".encode()

        return payload

    outbox.append_summary(TOPIC, _summary(0))
    for n in range(10):
        outbox.append_event(EVENTS, build(n))
    items = _all(outbox)
    events = [i for i in items if i.kind == EVENT]
    assert [i.payload.split(b" (")[0] for i in events] == [
        b"event 6",
        b"event 7",
        b"event 8",
        b"event 9",
    ]
    assert len(_summaries(items)) == 1, "telemetry is not an event"
    # Every event appended is either queued or counted by one that is.
    assert len(events) + sum(told[6:]) == 10
    assert told[:4] == [0, 0, 0, 0]
    outbox.close()


def test_events_on_the_wire_are_never_dropped_for_the_cap(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite", max_items=100, max_events=2)
    outbox.append("event", EVENTS, b"a")
    outbox.append("event", EVENTS, b"b")
    leased = outbox.peek(10)
    assert outbox.append_event(EVENTS, lambda _n: b"c") == 0
    assert [i.payload for i in _all(outbox)][:2] == [b"a", b"b"]
    outbox.settle([i.id for i in leased], [])
    assert [i.payload for i in _all(outbox)] == [b"c"]
    outbox.close()


def test_an_outbox_from_before_the_event_cap_opens_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, "
        "topic TEXT NOT NULL, payload BLOB NOT NULL)"
    )
    db.execute("INSERT INTO outbox (kind, topic, payload) VALUES ('event', ?, ?)", (EVENTS, b"x"))
    db.commit()
    db.close()
    outbox = Outbox(path, max_events=1)
    assert outbox.append_event(EVENTS, lambda n: f"{n} dropped".encode()) == 1
    assert [i.payload for i in _all(outbox)] == [b"1 dropped"]
    outbox.settle([], [i.id for i in _all(outbox)])  # the migration added ``sent`` too
    assert outbox.append_event(EVENTS, lambda n: f"{n} dropped".encode()) == 0
    assert [i.payload for i in _all(outbox)] == [b"1 dropped", b"0 dropped"]
    outbox.close()


def test_an_unacked_row_is_never_merged_so_its_late_delivery_loses_nothing(
    tmp_path: Path,
) -> None:
    """A flush publish that times out stays queued in the MQTT client, which delivers
    the row's original bytes after a reconnect. A long outage then fills the outbox: had
    that row been merged with later windows (keeping its summary_id), the coordinator
    would drop the merged row as a duplicate of the late delivery, and every window
    folded into it would be lost."""
    path = tmp_path / "outbox.sqlite"
    outbox = Outbox(path, max_items=4)
    appended = [_summary(i) for i in range(41)]
    for summary in appended[:3]:
        outbox.append_summary(TOPIC, summary)
    batch = outbox.peek(2)
    outbox.settle([], [i.id for i in batch])  # both PUBACKs timed out
    on_the_wire = {i.id: i.payload for i in batch}
    outbox.close()

    outbox = Outbox(path, max_items=4)  # marked durably: a restart does not forget it
    for summary in appended[3:]:  # the outage goes on and the outbox fills
        outbox.append_summary(TOPIC, summary)
    assert outbox.coarsened > 0

    queued = _all(outbox)
    assert {i.id: i.payload for i in queued if i.id in on_the_wire} == on_the_wire
    # The client delivers the originals, then the flush sends the queue; the coordinator
    # keeps the first of each summary_id. Every window arrives exactly once.
    delivered: dict[str, TelemetrySummary] = {}
    for payload in [*on_the_wire.values(), *(i.payload for i in queued)]:
        summary = decode(payload, TelemetrySummary)
        delivered.setdefault(summary.summary_id, summary)
    assert sum(s.windows for s in delivered.values()) == len(appended)
    assert sum(s.count for s in delivered.values()) == sum(s.count for s in appended)
    outbox.close()


def test_unacked_events_are_never_dropped_for_the_cap(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite", max_items=100, max_events=2)
    outbox.append("event", EVENTS, b"a")
    outbox.append("event", EVENTS, b"b")
    outbox.settle([], [i.id for i in outbox.peek(10)])  # not acked: maybe delivered later

    def build(n: int) -> Callable[[int], bytes]:
        return lambda _dropped: f"c{n}".encode()

    told = [outbox.append_event(EVENTS, build(n)) for n in range(3)]
    assert [i.payload for i in _all(outbox)] == [b"a", b"b", b"c2"]
    assert told == [0, 1, 2], "only the unsent events went, and each is counted"
    outbox.close()
