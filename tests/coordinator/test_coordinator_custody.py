"""Artifact custody (``coordinator.custody``) and the downtime clock
(``coordinator.clock``): decisions from state and ``now``, no broker or disk."""

from __future__ import annotations

import hashlib

from coordinator import clock, custody
from coordinator.clock import Heartbeat, Settling
from coordinator.custody import BrokerArtifacts, Held, Orphan
from coordinator.store import ClassRecord
from schemas import ArtifactMeta, Phase
from tests.coordinator.conftest import CLASS, T0
from tests.coordinator.records import make_record, make_release

A, B, C = "aa" * 32, "bb" * 32, "cc" * 32
GRACE = 600.0
ONE, TWO, SIX, BAD = (tag.ljust(1024, b".") for tag in (b"one", b"two", b"six", b"bad"))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _meta(*chunks: bytes) -> ArtifactMeta:
    data = b"".join(chunks)
    return ArtifactMeta(
        sha256=_sha(data),
        size=len(data),
        chunk_size=max(len(c) for c in chunks),
        chunks=tuple(_sha(c) for c in chunks),
        name="model.onnx",
    )


# -- what is named ----------------------------------------------------------------------


def test_stables_and_live_candidates_are_named_ended_candidates_are_not() -> None:
    stable = make_release("digits-v1", A)
    classes = [ClassRecord(name=CLASS, stable=stable), ClassRecord(name="empty")]
    live = make_record(candidates={CLASS: make_release("digits-v2", B)})
    ended = make_record(
        id="old", phase=Phase.ROLLED_BACK, candidates={CLASS: make_release(sha256=C)}
    )
    assert set(custody.named_refs(classes, [live, ended])) == {A, B}
    paused = live.model_copy(update={"phase": Phase.PAUSED})
    assert set(custody.named_refs([], [paused])) == {B}


# -- following the broker ---------------------------------------------------------------


def test_the_broker_is_followed_by_digest_and_forgotten_when_cleared() -> None:
    seen = BrokerArtifacts()
    seen.note(A, None, b"meta", None, staged=False, now=T0)
    seen.note(A, 0, b"chunk", _sha(b"chunk"), staged=False, now=T0 + 1)
    held = seen.held(A, staged=False)
    assert held == Held(first_seen=T0, meta=b"meta", chunks={0: _sha(b"chunk")})
    assert seen.held(A, staged=True) is None
    seen.note(A, 0, b"", None, staged=False, now=T0 + 2)
    seen.note(A, None, b"", None, staged=False, now=T0 + 2)
    assert seen.held(A, staged=False) is None
    seen.note(B, None, b"", None, staged=True, now=T0)  # a clear of nothing
    assert seen.staged == {}


def test_an_orphans_grace_runs_from_its_first_sighting_across_rereads() -> None:
    seen = BrokerArtifacts()
    seen.note(A, None, b"meta", None, staged=True, now=T0)
    seen.reread()
    assert seen.staged == {}
    seen.note(A, None, b"meta", None, staged=True, now=T0 + 500)
    held = seen.held(A, staged=True)
    assert held is not None
    assert held.first_seen == T0
    seen.note(B, None, b"meta", None, staged=True, now=T0 + 500)
    assert seen.orphans(T0 + GRACE + 1, GRACE, referenced=set(), busy=set()) == [
        Orphan(A, staged=True)
    ]


def test_orphans_an_ended_rollout_named_go_at_once_others_after_their_grace() -> None:
    seen = BrokerArtifacts()
    for sha in (A, B, C):
        seen.note(sha, None, b"meta", None, staged=False, now=T0)
    seen.note(A, None, b"meta", None, staged=True, now=T0)
    now = T0 + 1
    assert seen.orphans(now, GRACE, referenced={C}, busy=set(), ended={A}) == [
        Orphan(A, staged=False)
    ]
    assert not seen.orphans_due(now, GRACE, referenced={C}, busy=set())
    later = T0 + GRACE + 1
    assert seen.orphans(later, GRACE, referenced={C}, busy={A}) == [
        Orphan(A, staged=False),
        Orphan(B, staged=False),
    ]
    assert seen.orphans_due(later, GRACE, referenced={A, B, C}, busy=set())
    assert not seen.orphans_due(later, GRACE, referenced={A, B, C}, busy={A})


# -- repairs ----------------------------------------------------------------------------


def test_a_broker_that_holds_the_copy_needs_no_repair() -> None:
    meta = _meta(ONE, TWO)
    held = Held(first_seen=T0, meta=b"meta", chunks={0: _sha(ONE), 1: _sha(TWO)})
    assert custody.repair_plan(meta, b"meta", held) is None


def test_a_repair_sends_missing_and_different_chunks_clears_extra_ones_and_the_meta_follows() -> (
    None
):
    meta = _meta(ONE, TWO, SIX)
    held = Held(first_seen=T0, meta=b"meta", chunks={0: _sha(ONE), 1: _sha(BAD), 5: "x"})
    plan = custody.repair_plan(meta, b"meta", held)
    assert plan == custody.Repair(wrong=(1, 2), extra=(5,))
    assert plan.batches(1) == [(1,), (2,)]
    lost = custody.repair_plan(meta, b"meta", None)
    assert lost == custody.Repair(wrong=(0, 1, 2), extra=())
    other_meta = custody.repair_plan(
        meta, b"meta", Held(T0, b"forged", dict(enumerate(meta.chunks)))
    )
    assert other_meta == custody.Repair(wrong=(), extra=())


def test_only_a_message_unlike_the_copy_of_a_named_artifact_calls_for_a_repair() -> None:
    meta = _meta(ONE, TWO)
    copies = {A: (meta, b"meta")}

    def contradicts(index: int | None, payload: bytes, *, named: set[str] = {A}) -> bool:  # noqa: B006
        digest = _sha(payload) if index is not None and payload else None
        return custody.contradicts(copies, named, A, index=index, payload=payload, digest=digest)

    assert not contradicts(None, b"meta")
    assert contradicts(None, b"forged")
    assert contradicts(None, b"")
    assert not contradicts(0, ONE)
    assert contradicts(0, BAD)
    assert contradicts(1, b"")
    assert contradicts(7, b"extra")
    assert not contradicts(7, b"")
    assert not contradicts(0, BAD, named=set())


# -- the downtime clock and settling ----------------------------------------------------


def test_a_resume_shifts_live_waves_by_the_time_unobserved() -> None:
    wave = make_record()
    paused = make_record(id="paused", phase=Phase.PAUSED)
    resumed = clock.resume([wave, paused], last_beat=T0 + 10, now=T0 + 70)
    assert resumed.gap == 60
    assert [(r.id, r.lanes[CLASS].published_at) for r in resumed.shifted] == [
        ("rollout-7", T0 + 60)
    ]
    assert resumed.shifted[0].lanes[CLASS].entered_at == T0 + 60


def test_no_resume_on_a_first_start_or_a_clock_gone_back() -> None:
    assert clock.resume([make_record()], last_beat=None, now=T0) == clock.Resumed(0.0, ())
    assert clock.resume([make_record()], last_beat=T0 + 5, now=T0) == clock.Resumed(0.0, ())


def test_heartbeats_are_due_only_while_watching_and_at_most_every_period() -> None:
    beat = Heartbeat(every_s=2.0)
    assert not beat.due(T0, watching=False)
    assert beat.due(T0, watching=True)
    beat.beat(T0)
    assert not beat.due(T0 + 1.9, watching=True)
    assert beat.due(T0 + 2.0, watching=True)


def test_the_fleet_view_is_known_once_the_fence_of_the_same_connection_came_back() -> None:
    settling = Settling(nonce="n1", resend_s=10.0)
    assert not settling.known(connected=True, generation=1)
    fence = settling.linked(1, 100.0)
    # However long it takes: only the fence coming back settles the view.
    assert not settling.known(connected=True, generation=1)
    assert settling.came_back(fence)
    assert settling.known(connected=True, generation=1)
    assert not settling.came_back(fence)  # once is enough
    assert not settling.known(connected=False, generation=1)
    # A reconnect the re-assert loop has not caught up with: not settled.
    assert not settling.known(connected=True, generation=2)
    settling.unlinked()
    assert not settling.known(connected=True, generation=1)
    assert not settling.came_back(fence)


def test_no_older_fence_settles_the_view() -> None:
    earlier = Settling(nonce="process-1", resend_s=10.0)
    settling = Settling(nonce="process-2", resend_s=10.0)
    old_process = earlier.linked(1, 100.0)
    old_connection = settling.linked(1, 100.0)
    old_session = settling.linked(2, 105.0)
    settling.linked(1, 110.0)  # a new session: its generations start at 1 again
    # A kept session delivers an earlier process's or connection's fence first.
    assert not settling.came_back(old_process)
    assert not settling.came_back(old_connection)
    assert not settling.came_back(old_session)
    assert not settling.came_back(b"garbage")
    assert not settling.known(connected=True, generation=1)
    assert settling.came_back(settling.fence())
    assert settling.known(connected=True, generation=1)


def test_a_fence_that_does_not_come_back_is_sent_again() -> None:
    settling = Settling(nonce="n1", resend_s=10.0)
    assert settling.resend(500.0) is None  # not linked
    fence = settling.linked(1, 100.0)
    assert settling.resend(109.9) is None
    assert settling.resend(110.0) == fence
    assert settling.resend(119.9) is None
    assert settling.came_back(fence)
    assert settling.resend(200.0) is None
