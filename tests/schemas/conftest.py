"""Shared fixtures for the wire-contract tests: real Ed25519 keys and real messages.

Every fixture is function-scoped and builds fresh keys: generating an Ed25519 key
takes microseconds, and no test can then lean on state another test left behind.
"""

from __future__ import annotations

import hashlib

import pytest

from schemas import (
    ArtifactRef,
    Candidate,
    DeviceState,
    Event,
    EventKind,
    HealthBudget,
    HealthReport,
    KeyPair,
    LogHistogram,
    Manifest,
    Mode,
    Phase,
    Rejection,
    Release,
    Role,
    RoleKeys,
    RolloutCohort,
    RolloutSpec,
    RolloutStatus,
    Runtime,
    TelemetrySummary,
    TensorSpec,
    TrustDoc,
    TrustedState,
    Variant,
    Verdict,
    WaveCounts,
    encode,
    public_raw,
    seal,
)
from schemas.trust import TRUST_KIND

HW_CLASS = "jetson-vision-standard"
NOW = 1_700_000_000.0
DAY = 86_400.0


def _release(name: str, payload: bytes) -> Release:
    return Release(
        name=name,
        artifact=ArtifactRef(sha256=hashlib.sha256(payload).hexdigest(), size=len(payload)),
        runtime=Runtime(providers=("CUDAExecutionProvider", "CPUExecutionProvider")),
        inputs=(TensorSpec(name="images", dtype="float32", shape=("batch", 3, 224, 224)),),
        outputs=(TensorSpec(name="logits", dtype="float32", shape=(None, 1000)),),
        health=HealthBudget(
            max_error_rate=0.01, p95_latency_ms=40.0, min_inferences=200, soak_seconds=300.0
        ),
    )


@pytest.fixture
def now() -> float:
    """The clock reading every verification in these tests happens at."""
    return NOW


@pytest.fixture
def hw_class() -> str:
    return HW_CLASS


@pytest.fixture
def root_key() -> KeyPair:
    return KeyPair.generate()


@pytest.fixture
def manifest_key() -> KeyPair:
    return KeyPair.generate()


@pytest.fixture
def operator_key() -> KeyPair:
    return KeyPair.generate()


@pytest.fixture
def trust_doc(root_key: KeyPair, manifest_key: KeyPair, operator_key: KeyPair) -> TrustDoc:
    """Version 1 of the trust: one key per role, valid for a year."""
    keys = (root_key, manifest_key, operator_key)
    return TrustDoc(
        version=1,
        issued_at=NOW - DAY,
        expires_at=NOW + 365 * DAY,
        keys={k.id: public_raw(k.public) for k in keys},
        roles={
            Role.ROOT: RoleKeys(keys=(root_key.id,)),
            Role.MANIFEST: RoleKeys(keys=(manifest_key.id,)),
            Role.OPERATOR: RoleKeys(keys=(operator_key.id,)),
        },
    )


@pytest.fixture
def trusted(root_key: KeyPair, trust_doc: TrustDoc) -> TrustedState:
    """A device enrolled with ``root_key`` that has accepted ``trust_doc``."""
    state = TrustedState({root_key.id: root_key.public})
    state.update_trust(seal(TRUST_KIND, encode(trust_doc), [root_key]), now=NOW)
    return state


@pytest.fixture
def release() -> Release:
    return _release("resnet50-int8", b"stable model bytes")


@pytest.fixture
def candidate_release() -> Release:
    return _release("resnet50-int8-v2", b"candidate model bytes")


@pytest.fixture
def manifest(release: Release, candidate_release: Release) -> Manifest:
    """A live manifest for ``HW_CLASS`` at seq 5 with a 10 % rollout and one canary."""
    return Manifest(
        hw_class=HW_CLASS,
        seq=5,
        issued_at=NOW - 60.0,
        expires_at=NOW + DAY,
        stable=release,
        rollout=RolloutCohort(
            id="rollout-42",
            candidate=candidate_release,
            salt="rollout-42-salt",
            cutoff_bp=1000,
            canaries=("dev-canary-1",),
        ),
    )


@pytest.fixture
def rollout_spec(candidate_release: Release) -> RolloutSpec:
    return RolloutSpec(
        id="rollout-42",
        generation=1,
        classes=(HW_CLASS,),
        candidate=Candidate(
            name=candidate_release.name,
            variants=(
                Variant(
                    label="int8",
                    artifact=candidate_release.artifact,
                    inputs=candidate_release.inputs,
                    outputs=candidate_release.outputs,
                ),
            ),
        ),
        waves_percent=(1.0, 10.0, 50.0, 100.0),
        canaries=("dev-canary-1",),
        success_ratio=0.95,
        max_failure_ratio=0.05,
        issued_at=NOW,
        operator="alice@example.com",
    )


@pytest.fixture
def rollout_status() -> RolloutStatus:
    return RolloutStatus(
        id="rollout-42",
        generation=1,
        phase=Phase.WAVE,
        wave=1,
        waves_percent=(1.0, 10.0, 50.0, 100.0),
        counts=WaveCounts(targeted=100, updated=90, healthy=85, unhealthy=2),
        classes=(HW_CLASS,),
        release="resnet50-int8-v2@0123456789ab",
        reason=None,
        updated_at=NOW,
    )


@pytest.fixture
def device_state() -> DeviceState:
    return DeviceState(
        device_id="dev-0001",
        hw_class=HW_CLASS,
        mode=Mode.DEGRADED,
        active_release="resnet50-int8@0123456789ab",
        active_sha256=hashlib.sha256(b"stable model bytes").hexdigest(),
        target_release="resnet50-int8-v2@ba9876543210",
        rollout_id="rollout-42",
        applied_seq=5,
        trust_version=1,
        inferences_total=123_456,
        last_inference_at=NOW - 1.5,
        last_rejection=Rejection(reason="replayed", detail="manifest seq 4 not above 5", at=NOW),
        updated_at=NOW,
    )


@pytest.fixture
def health_report() -> HealthReport:
    return HealthReport(
        report_id="dev-0001-5-1",
        device_id="dev-0001",
        rollout_id="rollout-42",
        manifest_seq=5,
        release="resnet50-int8-v2@ba9876543210",
        verdict=Verdict.UNHEALTHY,
        reasons=("p95 latency 51.2 ms above 40 ms",),
        inferences=1000,
        errors=3,
        p95_latency_ms=51.2,
        soak_seconds=300.0,
        at=NOW,
    )


@pytest.fixture
def event() -> Event:
    return Event(
        event_id="evt-1",
        device_id="dev-0001",
        kind=EventKind.MANIFEST_REJECTED,
        reason="bad_signature",
        detail="manifest signature by key ... does not verify",
        manifest_seq=6,
        at=NOW,
    )


@pytest.fixture
def telemetry_summary() -> TelemetrySummary:
    return TelemetrySummary(
        summary_id="dev-0001-w-17",
        device_id="dev-0001",
        release="resnet50-int8@0123456789ab",
        window_start=NOW - 60.0,
        window_end=NOW,
        count=6,
        errors=1,
        latency_ms=LogHistogram.of([3.0, 4.5, 4.6, 12.0, 80.0, 0.0]),
        confidence=(0, 0, 0, 0, 0, 1, 0, 2, 1, 2),
        labels={"cat": 4, "dog": 2},
        max_rss_bytes=512 * 1024 * 1024,
    )
