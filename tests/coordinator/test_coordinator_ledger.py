"""The telemetry ledger over a real SQLite file: counted once, durably across restarts,
and acknowledged to a device only once its count is committed."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from coordinator.ledger import LedgerSettings, TelemetryLedger, TelemetryStore
from coordinator.metrics import Counters
from coordinator.telemetry import Mark, Verdict
from schemas import TelemetryAck, decode, topics
from tests.coordinator.kit import ScriptedTransport
from tests.coordinator.summaries import numbered

ACK = topics.device_ack("cam-0001")


def _ledger(path: Path, counters: Counters | None = None) -> TelemetryLedger:
    return TelemetryLedger(
        path, counters=counters or Counters(), settings=LedgerSettings(commit_s=0.01)
    )


def _acks(transport: ScriptedTransport) -> list[TelemetryAck]:
    return [decode(p, TelemetryAck) for t, p in transport.published if t == ACK]


def test_an_ack_goes_out_only_after_the_count_is_committed(tmp_path: Path) -> None:
    async def main() -> None:
        ledger = _ledger(tmp_path / "telemetry.sqlite")
        await ledger.open()
        transport = ScriptedTransport(fail=False)
        assert ledger.offer(numbered(1, 2)) is Verdict.COUNTED
        assert ledger.offer(numbered(3)) is Verdict.COUNTED
        assert ledger.committed("cam-0001") is None  # counted in memory only
        assert transport.published == []
        await ledger.commit()
        stored = TelemetryStore(tmp_path / "telemetry.sqlite")  # a second reader
        assert stored.load()["cam-0001"] == Mark(
            stream="s1", seq=3, inferences=30, errors=3, windows=3
        )
        stored.close()
        await ledger.publish_acks(transport)
        (ack,) = _acks(transport)
        assert (ack.device_id, ack.stream, ack.seq) == ("cam-0001", "s1", 3)
        await ledger.close()

    asyncio.run(main())


def test_a_restarted_coordinator_counts_nothing_twice(tmp_path: Path) -> None:
    async def main() -> None:
        counters = Counters()
        first = _ledger(tmp_path / "telemetry.sqlite", counters)
        await first.open()
        for n in range(1, 6):
            first.offer(numbered(n, base=1))
        await first.close()  # a clean stop commits what is left

        again = _ledger(tmp_path / "telemetry.sqlite", counters)
        await again.open()
        # The device had no ack yet: it sends everything again, then goes on.
        verdicts = [again.offer(numbered(n, base=1)) for n in range(1, 8)]
        assert verdicts == [Verdict.DUPLICATE] * 5 + [Verdict.COUNTED] * 2
        mark = again.mark("cam-0001")
        assert mark is not None
        assert (mark.seq, mark.inferences) == (7, 70)
        assert counters.telemetry_counted == 7
        await again.close()

    asyncio.run(main())


def test_a_duplicate_has_the_stored_ack_sent_again(tmp_path: Path) -> None:
    """A device that keeps re-sending what was counted missed the ack (a broker that
    crashed before saving the retained ack): it gets it again, the stored one."""

    async def main() -> None:
        ledger = _ledger(tmp_path / "telemetry.sqlite")
        await ledger.open()
        transport = ScriptedTransport(fail=False)
        ledger.offer(numbered(1))
        await ledger.commit()
        await ledger.publish_acks(transport)
        ledger.offer(numbered(2))  # counted, not committed yet
        assert ledger.offer(numbered(1)) is Verdict.DUPLICATE
        await ledger.publish_acks(transport)
        assert [a.seq for a in _acks(transport)] == [1]  # nothing new before the commit
        await ledger.commit()
        await ledger.publish_acks(transport)
        assert [a.seq for a in _acks(transport)] == [1, 2]
        await ledger.close()

    asyncio.run(main())


def test_acks_wait_for_a_link(tmp_path: Path) -> None:
    async def main() -> None:
        ledger = _ledger(tmp_path / "telemetry.sqlite")
        await ledger.open()
        transport: ScriptedTransport | None = None
        task = asyncio.create_task(ledger.run(lambda: transport))
        ledger.offer(numbered(1))
        await asyncio.sleep(0.1)  # several rounds without a link
        linked = transport = ScriptedTransport(fail=False)
        async with asyncio.timeout(10):  # a hang guard
            await linked.sent.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert [a.seq for a in _acks(linked)] == [1]
        await ledger.close()

    asyncio.run(main())


def test_unnumbered_summaries_are_counted_once_and_never_acknowledged(tmp_path: Path) -> None:
    async def main() -> None:
        counters = Counters()
        ledger = _ledger(tmp_path / "telemetry.sqlite", counters)
        await ledger.open()
        legacy = numbered(1).model_copy(
            update={"stream": None, "seq": None, "last_seq": None, "base": None}
        )
        assert ledger.offer(legacy) is Verdict.COUNTED
        assert ledger.offer(legacy) is Verdict.DUPLICATE
        transport = ScriptedTransport(fail=False)
        await ledger.commit()
        await ledger.publish_acks(transport)
        assert transport.published == []
        assert ledger.committed("cam-0001") == Mark(inferences=10, errors=1, windows=1)
        assert (counters.telemetry_unnumbered, counters.telemetry_duplicates) == (1, 1)
        await ledger.close()

    asyncio.run(main())


def test_a_damaged_store_is_moved_aside_and_begun_anew(tmp_path: Path) -> None:
    path = tmp_path / "telemetry.sqlite"
    path.write_bytes(b"not a database, " * 512)
    store = TelemetryStore(path)
    assert store.load() == {}
    store.save({"cam-0001": Mark(stream="s1", seq=2)})
    store.close()
    assert [p.name.split("-")[0] for p in tmp_path.glob("telemetry.sqlite.damaged-*")] == [
        "telemetry.sqlite.damaged"
    ]
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT device_id, seq FROM marks").fetchall() == [("cam-0001", 2)]
