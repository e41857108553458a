"""End-to-end delivery in the outbox: a summary leaves only on the coordinator's ack, is
sent again with backoff until then, and merging under the cap never makes a row the
coordinator would drop or count twice (checked against the coordinator's own rule)."""

from __future__ import annotations

import random
from pathlib import Path

from agent.outbox import Outbox, OutboxItem
from coordinator.telemetry import Mark, Verdict, judge
from schemas import TelemetrySummary, decode
from tests.agent.test_agent_outbox import EVENTS, TOPIC, _summary


def _decoded(items: list[OutboxItem]) -> list[TelemetrySummary]:
    return [decode(i.payload, TelemetrySummary) for i in items if i.kind == "telemetry"]


def test_a_summary_the_broker_took_stays_until_the_coordinator_acknowledges_it(
    tmp_path: Path,
) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite", resend_s=10.0)
    stored = [outbox.append_summary(TOPIC, _summary(i)) for i in range(3)]
    outbox.append("event", EVENTS, b"e")
    assert [(s.seq, s.last_seq) for s in stored] == [(1, 1), (2, 2), (3, 3)]
    assert len({s.stream for s in stored}) == 1
    batch = outbox.peek(10, now=0.0)
    outbox.settle([i.id for i in batch], [], now=0.0)
    assert len(outbox) == 3, "the event left on its PUBACK, the summaries wait"
    assert outbox.unsent() == 0
    assert outbox.peek(10, now=9.9) == []
    stream = stored[0].stream
    assert stream is not None
    assert outbox.acknowledge("another-stream", 3) == 0
    assert outbox.acknowledge(stream, 2) == 2
    assert [s.seq for s in _decoded(outbox.peek(10, now=10.0))] == [3]
    outbox.close()


def test_unacknowledged_summaries_are_sent_again_with_a_doubling_wait(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite", resend_s=10.0, resend_max_s=40.0)
    outbox.append_summary(TOPIC, _summary(0))
    now, dues = 0.0, []
    for _ in range(5):
        batch = outbox.peek(10, now=now)
        assert len(batch) == 1
        outbox.settle([batch[0].id], [], now=now)
        due = outbox.next_due()
        assert due is not None
        dues.append(due - now)
        now = due
    assert dues == [10.0, 20.0, 40.0, 40.0, 40.0]
    outbox.close()


def test_a_reconnect_or_a_restart_makes_every_waiting_summary_due_at_once(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.sqlite"
    outbox = Outbox(path, resend_s=100.0)
    for i in range(2):
        outbox.append_summary(TOPIC, _summary(i))
    outbox.settle([i.id for i in outbox.peek(10, now=0.0)], [], now=0.0)
    assert outbox.peek(10, now=1.0) == []
    outbox.due_again()
    assert len(outbox.peek(10, now=1.0)) == 2
    outbox.settle([i.id for i in outbox.peek(10, now=1.0)], [], now=1.0)
    outbox.close()
    reopened = Outbox(path, resend_s=100.0)
    assert len(reopened.peek(10, now=0.0)) == 2
    reopened.close()


def test_numbers_go_on_across_a_restart_and_base_is_the_lowest_held(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    outbox = Outbox(path)
    first = outbox.append_summary(TOPIC, _summary(0))
    outbox.append_summary(TOPIC, _summary(1))
    outbox.close()
    outbox = Outbox(path)
    third = outbox.append_summary(TOPIC, _summary(2))
    assert (third.stream, third.seq) == (first.stream, 3)
    assert first.stream is not None
    outbox.acknowledge(first.stream, 1)
    assert {s.base for s in _decoded(outbox.peek(10))} == {2}
    fourth = outbox.append_summary(TOPIC, _summary(3))
    assert (fourth.stream, fourth.seq, fourth.base) == (first.stream, 4, 2)
    outbox.close()


def test_merging_never_makes_a_row_the_coordinator_drops_or_counts_twice(
    tmp_path: Path,
) -> None:
    """A small outbox under a long outage with a flaky link: batches sent, some PUBACKs
    lost, some deliveries lost by the broker, duplicates delivered, acks late, windows
    appended all the while so the cap keeps merging. The coordinator (its real rule)
    counts every inference exactly once, and the outbox ends empty."""
    rand = random.Random(7)
    outbox = Outbox(tmp_path / "outbox.sqlite", max_items=6, resend_s=1.0, resend_max_s=4.0)
    mark, made, now, delivered = Mark(), 0, 0.0, []
    for step in range(400):
        now += 0.5
        if step < 300:
            made += outbox.append_summary(TOPIC, _summary(step)).count
        if rand.random() < 0.4:
            continue  # offline this step
        batch = outbox.peek(3, now=now)
        pubacked = [i for i in batch if rand.random() < 0.8]
        outbox.settle([i.id for i in pubacked], [i.id for i in batch if i not in pubacked], now=now)
        for item in batch:
            if rand.random() < 0.7:  # the broker kept it (a PUBACK lost or not)
                delivered.append(item.payload)
        rand.shuffle(delivered)  # late, duplicated, out of order
        for payload in delivered[: rand.randint(0, len(delivered))]:
            judged = judge(mark, decode(payload, TelemetrySummary))
            assert judged.verdict is not Verdict.OVERLAP
            mark = judged.mark
        delivered = delivered[rand.randint(0, len(delivered)) :]
        if mark.stream is not None and rand.random() < 0.5:
            outbox.acknowledge(mark.stream, mark.seq)
        if rand.random() < 0.1:
            outbox.due_again()  # a reconnect
    assert outbox.coarsened > 0
    while len(outbox):  # the link comes back for good: everything goes, in order
        now += 10.0
        for item in outbox.peek(100, now=now):
            mark = judge(mark, decode(item.payload, TelemetrySummary)).mark
        outbox.settle([i.id for i in outbox.peek(100, now=now)], [], now=now)
        assert mark.stream is not None
        outbox.acknowledge(mark.stream, mark.seq)
    assert mark.inferences == made
    outbox.close()
