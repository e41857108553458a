"""The audit log: append-only, kept across restarts, bounded by count, never in the way."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from coordinator.audit import AuditLog, read_audit
from coordinator.store import CoordinatorStore


def test_entries_are_appended_in_order_and_survive_a_reopen(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.sqlite")
    for i in range(5):
        log.append({"at": float(i), "event": "advance", "rollout": "r", "detail": f"wave {i}"})
    log.close()
    reopened = AuditLog(tmp_path / "audit.sqlite")
    try:
        assert [e["detail"] for e in reopened.entries()] == [f"wave {i}" for i in range(5)]
        assert len(reopened) == 5
    finally:
        reopened.close()


def test_a_full_log_drops_its_oldest_entries_and_stays_bounded(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.sqlite", max_entries=20)
    try:
        for i in range(500):
            log.append({"n": i})
            assert len(log) <= 22  # max_entries plus a tenth, then pruned back
        kept = [e["n"] for e in log.entries()]
        assert kept == list(range(500 - len(kept), 500))
        assert 20 <= len(kept) <= 22
    finally:
        log.close()
    with sqlite3.connect(tmp_path / "audit.sqlite") as db:
        (rows,) = db.execute("SELECT count(*) FROM audit").fetchone()
    assert rows == len(kept)


def test_a_damaged_audit_log_is_set_aside_and_the_store_opens(tmp_path: Path) -> None:
    (tmp_path / "audit.sqlite").write_bytes(b"this is not a database" * 100)
    store = CoordinatorStore(tmp_path / "coordinator.json")
    try:
        store.audit({"event": "admitted"})
        assert store.audit_log() == [{"event": "admitted"}]
    finally:
        store.close()
    assert len(list(tmp_path.glob("audit.sqlite.damaged-*"))) == 1


def test_an_audit_table_of_an_older_store_moves_to_the_log(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.json"
    older = {"audit": {"1": {"event": "admitted"}, "2": {"event": "advance"}}, "classes": {}}
    path.write_text(json.dumps(older), encoding="utf-8")
    store = CoordinatorStore(path)
    try:
        assert [e["event"] for e in store.audit_log()] == ["admitted", "advance"]
    finally:
        store.close()
    assert "audit" not in json.loads(path.read_text(encoding="utf-8"))


def test_max_entries_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_entries"):
        AuditLog(tmp_path / "audit.sqlite", max_entries=0)


def test_the_log_is_private_to_its_owner(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.sqlite")
    try:
        log.append({"event": "admitted"})
    finally:
        log.close()
    assert all(p.stat().st_mode & 0o077 == 0 for p in tmp_path.glob("audit.sqlite*"))


def test_a_reader_sees_one_rollouts_entries_while_the_coordinator_writes(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    log = AuditLog(path)
    try:
        log.append({"at": 1.0, "event": "admitted", "rollout": "r1", "detail": "wave 1"})
        log.append({"at": 2.0, "event": "admitted", "rollout": "r2", "detail": "wave 1"})
        log.append({"at": 3.0, "event": "rolled_back", "rollout": "r1", "detail": "timed out"})
        assert [e["event"] for e in read_audit(path, "r1")] == ["admitted", "rolled_back"]
        assert len(read_audit(path)) == 3
        log.append({"at": 4.0, "event": "completed", "rollout": "r2", "detail": "done"})
        assert [e["event"] for e in read_audit(path, "r2")] == ["admitted", "completed"]
    finally:
        log.close()
    size = path.stat().st_size
    read_audit(path)
    assert path.stat().st_size == size  # read only: nothing written


def test_reading_a_missing_log_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no audit log at"):
        read_audit(tmp_path / "audit.sqlite")
    assert not (tmp_path / "audit.sqlite").exists()
