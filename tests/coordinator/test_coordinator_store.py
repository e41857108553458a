"""The coordinator's crash-safe store: everything it decides survives a restart, and the
file is only ever replaced whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.rollout import RolloutRecord
from coordinator.store import ClassRecord, CoordinatorStore, Refusal, StoreDamagedError
from schemas import Cause, Phase, WaveCounts
from tests.coordinator.records import with_lane


def test_classes_rollouts_and_audit_survive_close_and_reopen(
    tmp_path: Path, record: RolloutRecord
) -> None:
    path = tmp_path / "coordinator" / "store.json"
    store = CoordinatorStore(path)
    klass = ClassRecord(
        name="jetson-vision-standard",
        seq=7,
        stable=record.candidates["jetson-vision-standard"],
        manifest=b"\x00signed\xffmanifest",
        expires_at=1_700_086_400.0,
        content="stable=digits-v2",
    )
    store.put_class(klass)
    store.put_rollout(record)
    later = record.model_copy(update={"wave": 1, "counts": WaveCounts(targeted=3, healthy=3)})
    store.put_rollout(later)  # same id: replaces, does not duplicate
    store.audit({"rollout": record.id, "what": "admitted"})
    store.audit({"rollout": record.id, "what": "advanced"})
    store.close()

    reopened = CoordinatorStore(path)
    assert reopened.classes() == {klass.name: klass}
    assert reopened.rollouts() == {record.id: later}
    assert reopened.rollouts()[record.id].spec == record.spec
    assert [e["what"] for e in reopened.audit_log()] == ["admitted", "advanced"]
    reopened.close()


def test_every_write_replaces_the_file_whole_and_leaves_no_temp_files(
    tmp_path: Path, record: RolloutRecord
) -> None:
    path = tmp_path / "store.json"
    store = CoordinatorStore(path)
    store.put_rollout(record)
    for wave, phase in [(1, Phase.WAVE), (1, Phase.PAUSED), (2, Phase.COMPLETED)]:
        before = path.read_bytes()
        with path.open("rb") as reader:  # a reader that opened the file before the write
            store.put_rollout(with_lane(record, wave=wave).model_copy(update={"phase": phase}))
            store.audit({"wave": wave, "phase": phase.value})
            # It still sees the whole previous document: the file was renamed over, not
            # rewritten in place.
            assert reader.read() == before
        assert path.read_bytes() != before
        assert json.loads(path.read_text())["rollouts"]
        # Beside it only the audit log's SQLite files: no temporary file is left.
        assert {p.name for p in tmp_path.iterdir()} <= {
            "store.json",
            "audit.sqlite",
            "audit.sqlite-wal",
            "audit.sqlite-shm",
        }
    assert path.stat().st_mode & 0o077 == 0  # it holds signed specs: private to its owner
    store.close()


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"", "empty file"),
        (b'{"classes": {"1": {"name": "jetson', "not JSON"),
        (b"\x00\xffgarbage", "not UTF-8"),
        (b"[1, 2]", "not a JSON object of tables"),
        (b'{"rollouts": {"1": {"id": "r", "json": "{}"}}}', "does not validate"),
    ],
)
def test_damaged_store_refuses_to_open_naming_the_file_and_the_way_out(
    tmp_path: Path, content: bytes, why: str
) -> None:
    path = tmp_path / "coordinator.json"
    path.write_bytes(content)
    with pytest.raises(StoreDamagedError) as caught:
        CoordinatorStore(path)
    message = str(caught.value)
    assert str(path) in message
    assert why in message
    assert "Move it aside" in message
    assert path.read_bytes() == content  # nothing overwritten


def test_new_store_is_written_at_once_and_refusals_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.json"
    store = CoordinatorStore(path)
    assert store.fresh
    assert json.loads(path.read_text()) == {}
    store.put_refusal(Refusal(id="r", digest="ab" * 32, reason="spec refused: x", at=1.0))
    store.close()
    reopened = CoordinatorStore(path)
    assert not reopened.fresh
    assert reopened.refusals()["r"].reason == "spec refused: x"
    reopened.close()


def test_a_record_keeps_its_cause_and_one_stored_before_causes_loads_without(
    tmp_path: Path, record: RolloutRecord
) -> None:
    path = tmp_path / "store.json"
    rolled = record.model_copy(
        update={
            "phase": Phase.ROLLED_BACK,
            "reason": "wave 1: timed out with 0 of 2 healthy",
            "cause": Cause.TIMED_OUT,
        }
    )
    store = CoordinatorStore(path)
    store.put_rollout(rolled)
    store.close()
    # An older coordinator wrote records without the key.
    older = record.model_copy(update={"id": "older", "reason": "aborted by operator"})
    data = json.loads(path.read_text())
    data["rollouts"]["2"] = {
        "id": "older",
        "json": older.model_dump_json(exclude={"cause": True, "lanes": {"__all__": {"cause"}}}),
    }
    assert '"cause"' not in data["rollouts"]["2"]["json"]
    path.write_text(json.dumps(data))

    reopened = CoordinatorStore(path)
    try:
        rollouts = reopened.rollouts()
        assert (rollouts[rolled.id].reason, rollouts[rolled.id].cause) == (
            rolled.reason,
            Cause.TIMED_OUT,
        )
        assert (rollouts["older"].reason, rollouts["older"].cause) == ("aborted by operator", None)
    finally:
        reopened.close()
