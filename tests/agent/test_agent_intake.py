"""Trust and manifest intake alone: signed bytes in, outcomes out, ``now`` made up.
Named after what each one stages; milliseconds each, no disk, no broker."""

from __future__ import annotations

import hashlib

import pytest

from agent.events import Desired
from agent.intake import Intake, ManifestTaken, Outcome, Refused, TrustTaken
from schemas import (
    MANIFEST_KIND,
    TRUST_KIND,
    ArtifactRef,
    EventKind,
    HealthBudget,
    KeyPair,
    Manifest,
    Reason,
    Release,
    Role,
    Runtime,
    TensorSpec,
    encode,
    seal,
)
from schemas.envelope import public_raw
from schemas.manifest import RolloutCohort
from schemas.trust import RoleKeys, TrustDoc

DEVICE = "jetson-000"
HW_CLASS = "jetson-vision-standard"
NOW = 1_000_000.0
ROOT, MANIFEST, OPERATOR = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()
V1 = Release(
    name="v1",
    artifact=ArtifactRef(sha256=hashlib.sha256(b"v1").hexdigest(), size=10),
    runtime=Runtime(providers=("CPUExecutionProvider",)),
    inputs=(TensorSpec(name="x", dtype="float32", shape=(1,)),),
    outputs=(TensorSpec(name="y", dtype="float32", shape=(1,)),),
    health=HealthBudget(max_error_rate=0.1, p95_latency_ms=5.0, min_inferences=1, soak_seconds=0),
)
V2 = V1.model_copy(update={"name": "v2"})


def trust(version: int = 1, *, manifest: KeyPair = MANIFEST, ttl: float = 86400) -> bytes:
    keys = {Role.ROOT: ROOT, Role.MANIFEST: manifest, Role.OPERATOR: OPERATOR}
    doc = TrustDoc(
        version=version,
        issued_at=NOW,
        expires_at=NOW + ttl,
        keys={pair.id: public_raw(pair.public) for pair in keys.values()},
        roles={role: RoleKeys(keys=(pair.id,)) for role, pair in keys.items()},
    )
    return seal(TRUST_KIND, encode(doc), [ROOT])


def manifest(
    seq: int,
    *,
    stable: Release | None = V1,
    candidate: Release | None = None,
    key: KeyPair = MANIFEST,
    hw_class: str = HW_CLASS,
    ttl: float = 3600,
) -> bytes:
    rollout = (
        None
        if candidate is None
        else RolloutCohort(id="r1", candidate=candidate, salt="r1", cutoff_bp=0, canaries=(DEVICE,))
    )
    doc = Manifest(
        hw_class=hw_class,
        seq=seq,
        issued_at=NOW,
        expires_at=NOW + ttl,
        stable=stable,
        rollout=rollout,
    )
    return seal(MANIFEST_KIND, encode(doc), [key])


def intake() -> Intake:
    return Intake({ROOT.id: ROOT.public}, hw_class=HW_CLASS, device_id=DEVICE)


def trusted() -> Intake:
    taking = intake()
    (taken,) = taking.trust(trust(), now=NOW)
    assert isinstance(taken, TrustTaken)
    return taking


def refused(outcomes: list[Outcome]) -> tuple[EventKind, Reason]:
    (outcome,) = outcomes
    assert isinstance(outcome, Refused)
    return outcome.kind, outcome.reason


def test_manifest_taken_names_this_devices_target() -> None:
    taking = trusted()
    (taken,) = taking.manifest(manifest(1, candidate=V2), now=NOW)
    assert isinstance(taken, ManifestTaken)
    assert taken.desired == Desired(V2, "r1", 1), "a canary targets the candidate"
    assert taking.applied_seq == 1
    (stable,) = taking.manifest(manifest(2), now=NOW)
    assert isinstance(stable, ManifestTaken)
    assert stable.desired == Desired(V1, None, 2)


def test_manifest_before_any_trust_is_refused_and_judged_again_once_trust_comes() -> None:
    taking = intake()
    early = manifest(1)
    assert refused(taking.manifest(early, now=NOW)) == (
        EventKind.MANIFEST_REJECTED,
        Reason.NOT_TRUSTED,
    )
    taken, again = taking.trust(trust(), now=NOW)
    assert isinstance(taken, TrustTaken)
    assert isinstance(again, ManifestTaken)
    assert again.payload == early


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (manifest(1, key=OPERATOR), Reason.UNKNOWN_KEY),
        (manifest(1, hw_class="intel-lowpower-detector"), Reason.WRONG_CLASS),
        (manifest(1, ttl=-1), Reason.EXPIRED),
        (b"\xc1 not msgpack", Reason.MALFORMED),
    ],
)
def test_manifest_attack_is_refused_with_its_reason(payload: bytes, reason: Reason) -> None:
    assert refused(trusted().manifest(payload, now=NOW)) == (EventKind.MANIFEST_REJECTED, reason)


def test_manifest_replay_of_an_older_seq_is_refused() -> None:
    taking = trusted()
    taking.manifest(manifest(5), now=NOW)
    assert refused(taking.manifest(manifest(4), now=NOW))[1] is Reason.REPLAYED
    assert taking.applied_seq == 5


def test_redelivered_bytes_cost_nothing_whether_taken_or_refused() -> None:
    taking = trusted()
    good, bad = manifest(1), manifest(2, key=OPERATOR)
    assert taking.manifest(good, now=NOW)
    assert taking.manifest(bad, now=NOW)
    for _ in range(3):  # a flapping link: the retained messages again and again
        assert taking.manifest(good, now=NOW) == []
        assert taking.manifest(bad, now=NOW) == []
        assert taking.trust(trust(), now=NOW) == []
    junk = intake()
    assert refused(junk.trust(b"\xc1 junk", now=NOW))[0] is EventKind.TRUST_REJECTED
    assert junk.trust(b"\xc1 junk", now=NOW) == []


def test_trust_rotation_verifies_the_manifest_refused_under_the_old_keys() -> None:
    taking = trusted()
    new_key = KeyPair.generate()
    by_new_key = manifest(1, key=new_key)
    assert refused(taking.manifest(by_new_key, now=NOW))[1] is Reason.UNKNOWN_KEY
    taken, again = taking.trust(trust(2, manifest=new_key), now=NOW)
    assert isinstance(taken, TrustTaken)
    assert taking.trust_version == 2
    assert isinstance(again, ManifestTaken)
    assert again.desired.seq == 1


def test_trust_rollback_to_an_older_version_is_refused() -> None:
    taking = intake()
    taking.trust(trust(2), now=NOW)
    assert refused(taking.trust(trust(1), now=NOW)) == (EventKind.TRUST_REJECTED, Reason.REPLAYED)
    assert taking.trust_version == 2


def test_restore_reverifies_the_kept_manifest_at_its_own_seq() -> None:
    kept = manifest(3, candidate=V2)
    taking = intake()
    restored = taking.restore(trust=trust(), manifest=kept, applied_seq=3, now=NOW)
    assert restored.problems == ()
    assert restored.desired == Desired(V2, "r1", 3)
    assert taking.applied_seq == 3
    assert taking.manifest(kept, now=NOW) == [], "the kept bytes count as judged"


def test_restore_of_expired_documents_keeps_going_and_says_why() -> None:
    taking = intake()
    restored = taking.restore(trust=trust(), manifest=manifest(3), applied_seq=3, now=NOW + 7200)
    assert restored.desired is None
    assert [p.split(":")[0] for p in restored.problems] == ["stored manifest no longer valid"]
    later = intake()
    gone = later.restore(trust=trust(ttl=10), manifest=None, applied_seq=0, now=NOW + 20)
    assert gone.problems[0].startswith("stored trust no longer valid")
