"""Spec admission (``coordinator.specs``): what the coordinator does with spec bytes, for
every situation the table has a row for. Pure: real keys and signed specs, no broker."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from coordinator import specs
from coordinator.profiles import ClassProfile
from coordinator.reasons import RolloutReason
from coordinator.rollout import RolloutRecord
from coordinator.specs import Arrival, Claim, Kind, Verdict
from coordinator.store import Refusal
from schemas import (
    ROLLOUT_SPEC_KIND,
    Candidate,
    Cause,
    Desired,
    KeyPair,
    LanePhase,
    LaneStatus,
    Phase,
    Reason,
    Role,
    RoleKeys,
    RolloutSpec,
    RolloutStatus,
    TrustDoc,
    TrustedState,
    WaveCounts,
    encode,
    public_raw,
    seal,
)
from schemas.trust import TRUST_KIND
from tests.coordinator.conftest import CLASS, T0
from tests.coordinator.records import make_record, make_variant

LIMIT = 2000
DAY = 86_400.0

Situation = dict[str, object]


@pytest.fixture(scope="module")
def operator_key() -> KeyPair:
    return KeyPair.generate()


@pytest.fixture(scope="module")
def trusted(operator_key: KeyPair) -> TrustedState:
    root = KeyPair.generate()
    doc = TrustDoc(
        version=1,
        issued_at=T0 - DAY,
        expires_at=T0 + DAY,
        keys={k.id: public_raw(k.public) for k in (root, operator_key)},
        roles={
            Role.ROOT: RoleKeys(keys=(root.id,)),
            Role.MANIFEST: RoleKeys(keys=(root.id,)),
            Role.OPERATOR: RoleKeys(keys=(operator_key.id,)),
        },
    )
    state = TrustedState({root.id: root.public})
    state.update_trust(seal(TRUST_KIND, encode(doc), [root]), now=T0)
    return state


VARIANT = make_variant()


@pytest.fixture
def record() -> RolloutRecord:
    return make_record()


@pytest.fixture(scope="module")
def sign(operator_key: KeyPair) -> Callable[..., bytes]:
    def signed(
        rollout_id: str = "rollout-7",
        generation: int = 1,
        desired: Desired = Desired.ACTIVE,
        classes: tuple[str, ...] = (CLASS,),
    ) -> bytes:
        spec = RolloutSpec(
            id=rollout_id,
            generation=generation,
            desired=desired,
            classes=classes,
            candidate=Candidate(name="digits-v2", variants=(VARIANT,)),
            waves_percent=(10.0, 50.0, 100.0),
            issued_at=T0,
            operator="alice",
        )
        return seal(ROLLOUT_SPEC_KIND, encode(spec), [operator_key])

    return signed


def _status(phase: Phase, generation: int = 1, wave: int = 0) -> RolloutStatus:
    return RolloutStatus(
        id="rollout-7",
        generation=generation,
        phase=phase,
        wave=wave,
        waves_percent=(10.0, 50.0, 100.0),
        counts=WaveCounts(targeted=3, healthy=3),
        classes=(CLASS,),
        updated_at=T0 - 60,
    )


def _verdict(arrival: Arrival, **situation: object) -> Verdict:
    held: Situation = {
        "record": None,
        "refusal": None,
        "validating": False,
        "finished": None,
        "conflicts": False,
        "reason_chars": LIMIT,
    }
    held.update(situation)
    return specs.TABLE[(arrival.kind, specs.standing(arrival, **held))]  # type: ignore[arg-type]


def _refusal_of(payload: bytes, reason: str = "spec refused: other") -> Refusal:
    return Refusal(id="rollout-7", digest=specs.digest(payload), reason=reason, at=T0)


def _read(trusted: TrustedState, payload: bytes, own: bytes | None = None) -> Arrival:
    return specs.read(trusted, "rollout-7", payload, own, T0)


# -- reading the bytes ------------------------------------------------------------------


def test_bytes_are_read_as_own_cleared_invalid_replayed_active_or_aborted(
    trusted: TrustedState, sign: Callable[..., bytes]
) -> None:
    payload = sign()
    assert _read(trusted, payload, own=payload).kind is Kind.OWN
    cleared = _read(trusted, b"")
    assert cleared.kind is Kind.CLEARED
    assert cleared.problem is not None
    assert cleared.problem.reason is None
    junk = _read(trusted, b"junk")
    assert junk.kind is Kind.INVALID
    assert junk.problem is not None
    assert junk.problem.reason is Reason.MALFORMED
    replayed = _read(trusted, sign(rollout_id="other"))
    assert replayed.problem is not None
    assert (replayed.kind, replayed.problem.reason) == (Kind.INVALID, Reason.REPLAYED)
    assert _read(trusted, payload).kind is Kind.ACTIVE
    assert _read(trusted, sign(desired=Desired.PAUSED)).kind is Kind.ACTIVE
    assert _read(trusted, sign(desired=Desired.ABORTED)).kind is Kind.ABORTED


def test_forged_bytes_are_invalid_with_the_signature_reason(trusted: TrustedState) -> None:
    spec = RolloutSpec(
        id="rollout-7",
        generation=1,
        classes=(CLASS,),
        candidate=Candidate(name="digits-v2", variants=(VARIANT,)),
        waves_percent=(100.0,),
        issued_at=T0,
        operator="mallory",
    )
    forged = _read(trusted, seal(ROLLOUT_SPEC_KIND, encode(spec), [KeyPair.generate()]))
    assert forged.kind is Kind.INVALID
    assert forged.problem is not None
    assert forged.problem.reason is Reason.UNKNOWN_KEY
    assert forged.problem.text(LIMIT) == f"spec refused: {forged.problem.detail}"
    assert forged.problem.text(LIMIT).startswith("spec refused: unknown_key: ")


def test_a_refusal_text_is_bounded() -> None:
    assert len(specs.Problem(Reason.MALFORMED, "x" * 5000).text(100)) == 100


# -- every row of the table, by the situation it stands for -----------------------------


def _scenarios(
    trusted: TrustedState, sign: Callable[..., bytes], record: RolloutRecord
) -> list[tuple[str, Arrival, Situation, Verdict]]:
    gen2 = record.model_copy(update={"generation": 2, "spec": sign(generation=2)})
    spec1, junk = sign(), b"junk"
    junk_reason = _read(trusted, junk).problem
    assert junk_reason is not None
    return [
        (
            "own bytes redelivered",
            _read(trusted, gen2.spec, gen2.spec),
            {"record": gen2},
            Verdict.IGNORE,
        ),
        ("a known rollout's spec cleared", _read(trusted, b""), {"record": gen2}, Verdict.REASSERT),
        ("junk over a known rollout", _read(trusted, junk), {"record": gen2}, Verdict.REASSERT),
        ("an older generation retained", _read(trusted, spec1), {"record": gen2}, Verdict.REASSERT),
        (
            "an older abort retained",
            _read(trusted, sign(desired=Desired.ABORTED)),
            {"record": gen2},
            Verdict.REASSERT,
        ),
        (
            "same generation, other bytes",
            _read(trusted, sign(generation=2)),
            {"record": gen2},
            Verdict.REPUBLISH,
        ),
        (
            "same generation abort, other bytes",
            _read(trusted, sign(generation=2, desired=Desired.ABORTED)),
            {"record": gen2},
            Verdict.REPUBLISH,
        ),
        (
            "a newer generation",
            _read(trusted, sign(generation=3)),
            {"record": gen2},
            Verdict.NEW_GENERATION,
        ),
        (
            "a newer generation aborts",
            _read(trusted, sign(generation=3, desired=Desired.ABORTED)),
            {"record": gen2},
            Verdict.NEW_GENERATION,
        ),
        (
            "a refused id cleared",
            _read(trusted, b""),
            {"refusal": _refusal_of(junk)},
            Verdict.IGNORE,
        ),
        (
            "refused bytes redelivered",
            _read(trusted, junk),
            {"refusal": _refusal_of(junk)},
            Verdict.IGNORE,
        ),
        (
            "other bytes failing alike",
            _read(trusted, b"junk2"),
            {"refusal": _refusal_of(junk, junk_reason.text(LIMIT))},
            Verdict.IGNORE,
        ),
        ("an unknown id cleared", _read(trusted, b""), {}, Verdict.IGNORE),
        ("junk under a new id", _read(trusted, junk), {}, Verdict.REFUSE),
        (
            "junk failing otherwise than the refusal",
            _read(trusted, junk),
            {
                "refusal": Refusal(
                    id="rollout-7", digest="0" * 64, reason="spec refused: other", at=T0
                )
            },
            Verdict.REFUSE,
        ),
        (
            "a generation while validating",
            _read(trusted, sign(generation=2)),
            {"validating": True},
            Verdict.HOLD,
        ),
        (
            "an abort while validating",
            _read(trusted, sign(generation=2, desired=Desired.ABORTED)),
            {"validating": True},
            Verdict.HOLD,
        ),
        (
            "a lost store, the status says completed",
            _read(trusted, spec1),
            {"finished": _status(Phase.COMPLETED)},
            Verdict.FINISHED,
        ),
        (
            "a lost store, an abort the status says rolled back",
            _read(trusted, sign(desired=Desired.ABORTED)),
            {"finished": _status(Phase.ROLLED_BACK)},
            Verdict.FINISHED,
        ),
        ("classes busy or unknown", _read(trusted, spec1), {"conflicts": True}, Verdict.REJECT),
        (
            "an abort over busy classes",
            _read(trusted, sign(desired=Desired.ABORTED)),
            {"conflicts": True},
            Verdict.ABORTED,
        ),
        (
            "an abort before admission",
            _read(trusted, sign(desired=Desired.ABORTED)),
            {},
            Verdict.ABORTED,
        ),
        ("a new rollout", _read(trusted, spec1), {}, Verdict.ADMIT),
        (
            "a newer generation than the finished status",
            _read(trusted, sign(generation=2)),
            {"finished": _status(Phase.COMPLETED)},
            Verdict.ADMIT,
        ),
        (
            "a refused id, now signed",
            _read(trusted, spec1),
            {"refusal": _refusal_of(junk)},
            Verdict.ADMIT,
        ),
    ]


def test_every_situation_gets_its_verdict(
    trusted: TrustedState, sign: Callable[..., bytes], record: RolloutRecord
) -> None:
    wrong = [
        (what, got, want)
        for what, arrival, situation, want in _scenarios(trusted, sign, record)
        if (got := _verdict(arrival, **situation)) is not want
    ]
    assert wrong == []


def test_the_scenarios_reach_every_row_of_the_table(
    trusted: TrustedState, sign: Callable[..., bytes], record: RolloutRecord
) -> None:
    reached = set()
    for _, arrival, situation, _ in _scenarios(trusted, sign, record):
        held: Situation = {
            "record": None,
            "refusal": None,
            "validating": False,
            "finished": None,
            "conflicts": False,
            "reason_chars": LIMIT,
        }
        held.update(situation)
        reached.add((arrival.kind, specs.standing(arrival, **held)))  # type: ignore[arg-type]
    assert reached == set(specs.TABLE)


def test_validation_in_flight_comes_before_a_finished_status(
    trusted: TrustedState, sign: Callable[..., bytes]
) -> None:
    arrival = _read(trusted, sign())
    situation = {"validating": True, "finished": _status(Phase.COMPLETED)}
    assert _verdict(arrival, **situation) is Verdict.HOLD


# -- claims, records and phases ---------------------------------------------------------


def test_claims_name_unknown_classes_and_busy_ones(
    trusted: TrustedState,
    sign: Callable[..., bytes],
    record: RolloutRecord,
    profiles: dict[str, ClassProfile],
) -> None:
    spec = _read(trusted, sign(rollout_id="rollout-7", classes=(CLASS, "toaster-9"))).spec
    assert spec is not None
    live = record.model_copy(update={"id": "rollout-1"})
    claims = {"rollout-2": Claim(frozenset({CLASS}), frozenset())}
    problems = specs.claim_problems(spec, profiles, [live], claims)
    assert problems == [
        "unknown classes ['toaster-9']",
        "classes already in rollout ['rollout-1', 'rollout-2']",
    ]
    ended = live.model_copy(update={"phase": Phase.COMPLETED})
    assert specs.claim_problems(spec, profiles, [ended], {}) == ["unknown classes ['toaster-9']"]


def test_admission_phase_follows_the_newest_generation(
    trusted: TrustedState, sign: Callable[..., bytes]
) -> None:
    def newest(desired: Desired) -> RolloutSpec:
        spec = _read(trusted, sign(generation=2, desired=desired)).spec
        assert spec is not None
        return spec

    bad = RolloutReason(cause=Cause.INVALID_CANDIDATE, problems=("bad model",))
    assert specs.admitted_phase(bad, newest(Desired.ACTIVE)) == (Phase.REJECTED, bad)
    assert specs.admitted_phase(bad, newest(Desired.ABORTED)) == (Phase.REJECTED, bad)
    phase, reason = specs.admitted_phase(None, newest(Desired.ABORTED))
    assert (phase, reason) == (Phase.ROLLED_BACK, RolloutReason(cause=Cause.OPERATOR_ABORT))
    assert str(reason) == "aborted by operator"
    assert specs.admitted_phase(None, newest(Desired.PAUSED)) == (Phase.PAUSED, None)
    assert specs.admitted_phase(None, newest(Desired.ACTIVE)) == (Phase.WAVE, None)


def test_a_lost_store_resumes_at_the_retained_wave_of_the_same_generation(
    trusted: TrustedState, sign: Callable[..., bytes]
) -> None:
    spec = _read(trusted, sign()).spec
    assert spec is not None
    every = dict.fromkeys(spec.classes, 1)
    assert specs.retained_waves(_status(Phase.WAVE, wave=1), spec) == every
    last = dict.fromkeys(spec.classes, 2)
    assert specs.retained_waves(_status(Phase.WAVE, wave=9), spec) == last  # the last wave
    assert specs.retained_waves(_status(Phase.WAVE, generation=2, wave=1), spec) == {}
    assert specs.retained_waves(_status(Phase.PAUSED, wave=1), spec) == {}
    assert specs.retained_waves(None, spec) == {}
    # A status with lanes: each class resumes at its own wave; ended classes do not.
    name = spec.classes[0]
    lanes = {
        name: LaneStatus(phase=LanePhase.WAVE, wave=1, cutoff_bp=5000, counts=WaveCounts()),
        "gone": LaneStatus(phase=LanePhase.WAVE, wave=1, cutoff_bp=5000, counts=WaveCounts()),
    }
    with_lanes = _status(Phase.WAVE, wave=0).model_copy(update={"lanes": lanes})
    assert specs.retained_waves(with_lanes, spec) == {name: 1}
    ended = {name: lanes[name].model_copy(update={"phase": LanePhase.ROLLED_BACK})}
    assert specs.retained_waves(with_lanes.model_copy(update={"lanes": ended}), spec) == {}
    assert specs.retained_status(b"junk") is None
    assert specs.retained_status(encode(_status(Phase.WAVE))) == _status(Phase.WAVE)


def test_a_finished_record_keeps_the_retained_wave_counts_time_and_reason(
    trusted: TrustedState, sign: Callable[..., bytes], profiles: dict[str, ClassProfile]
) -> None:
    payload = sign()
    spec = _read(trusted, payload).spec
    assert spec is not None
    status = _status(Phase.COMPLETED, wave=3).model_copy(
        update={"reason": "wave 3: 3 of 3 devices healthy", "cause": Cause.PROMOTED}
    )
    record = specs.finished_record(spec, payload, T0, status, profiles)
    assert (record.phase, record.wave, record.counts, record.updated_at) == (
        Phase.COMPLETED,
        3,
        status.counts,
        T0 - 60,
    )
    assert (record.reason, record.cause) == ("wave 3: 3 of 3 devices healthy", Cause.PROMOTED)
    assert record.candidates == {}
    assert record.spec == payload
    # A status from before causes were sent: its text alone is kept.
    older = _status(Phase.ROLLED_BACK).model_copy(update={"reason": "aborted by operator"})
    record = specs.finished_record(spec, payload, T0, older, profiles)
    assert (record.reason, record.cause) == ("aborted by operator", None)


def test_a_new_generation_takes_the_operators_wish_and_bytes(
    trusted: TrustedState, sign: Callable[..., bytes], record: RolloutRecord
) -> None:
    payload = sign(generation=2, desired=Desired.PAUSED)
    spec = _read(trusted, payload).spec
    assert spec is not None
    updated = specs.new_generation(record, spec, payload)
    assert (updated.generation, updated.desired, updated.spec) == (2, Desired.PAUSED, payload)
    assert updated.phase is record.phase  # the tick acts on the wish, not the intake


def test_the_oldest_refusals_beyond_the_limit_are_forgotten() -> None:
    refusals = {
        i: Refusal(id=i, digest="0" * 64, reason="r", at=at)
        for i, at in (("c", 3.0), ("a", 1.0), ("b", 2.0))
    }
    assert specs.refusals_to_forget(refusals, 3) == []
    assert specs.refusals_to_forget(refusals, 1) == ["a", "b"]


def test_a_paused_admission_has_not_started(
    trusted: TrustedState, sign: Callable[..., bytes], profiles: dict[str, ClassProfile]
) -> None:
    payload = sign(desired=Desired.PAUSED)
    spec = _read(trusted, payload).spec
    assert spec is not None
    paused = specs.new_record(
        spec, payload, T0, Phase.PAUSED, profiles=profiles, candidates={}, reason=None
    )
    assert not paused.started
    assert (paused.reason, paused.cause) == (None, None)
