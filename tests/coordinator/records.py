"""Rollout records and releases for the engine tests, built without models: the engines
read names, digests and numbers, never model bytes."""

from __future__ import annotations

from collections import Counter
from typing import Any

from coordinator.fleet import Census, FleetView
from coordinator.rollout import Lane, Policy, RolloutRecord
from coordinator.waves import percent_cutoff
from schemas import (
    ArtifactRef,
    DeviceState,
    HealthBudget,
    HealthReport,
    Mode,
    Phase,
    Release,
    Runtime,
    TensorSpec,
    Variant,
    Verdict,
    WaveSpec,
)

__all__ = [
    "CLASS",
    "POLICY",
    "T0",
    "census_by_walk",
    "device_state",
    "health_report",
    "make_record",
    "make_release",
    "make_variant",
    "with_lane",
]

CLASS = "jetson-vision-standard"
T0 = 1_700_000_000.0


def make_variant(sha256: str = "ab" * 32, size: int = 1000, label: str = "fp32") -> Variant:
    return Variant(
        label=label,
        artifact=ArtifactRef(sha256=sha256, size=size),
        inputs=(TensorSpec(name="x", dtype="float32", shape=("N", 64)),),
        outputs=(TensorSpec(name="y", dtype="float32", shape=("N", 10)),),
    )


def make_release(name: str = "digits-v2", sha256: str = "ab" * 32, **changes: Any) -> Release:
    variant = make_variant(sha256)
    release = Release(
        name=name,
        variant=variant.label,
        artifact=variant.artifact,
        runtime=Runtime(providers=("CPUExecutionProvider",)),
        inputs=variant.inputs,
        outputs=variant.outputs,
        health=HealthBudget(
            max_error_rate=0.01, p95_latency_ms=40.0, min_inferences=20, soak_seconds=5.0
        ),
    )
    return release.model_copy(update=changes)


POLICY = Policy(
    success_ratio=1.0, max_failure_ratio=0.0, timeout_s=600.0, min_soak_s=0.0, silence_s=120.0
)


def make_record(
    *,
    wave: int = 0,
    waves_percent: tuple[float, ...] = (10.0, 50.0, 100.0),
    policy: Policy = POLICY,
    **changes: Any,
) -> RolloutRecord:
    """A rollout of ``make_release()`` for ``CLASS`` (or the ``classes`` and
    ``candidates`` given), every class in ``wave`` of ``waves_percent``, its manifest
    out since T0."""
    waves = tuple(WaveSpec(percent=p) for p in waves_percent)
    classes = changes.pop("classes", (CLASS,))
    cutoff = percent_cutoff(waves_percent[wave])
    lane = Lane(
        wave=wave,
        target_bp=cutoff,
        cutoff_bp=cutoff,
        entered_at=T0,
        published_at=T0,
        policy=policy,
    )
    record = RolloutRecord(
        id="rollout-7",
        generation=1,
        spec=b"signed spec bytes",
        classes=classes,
        candidates={name: make_release() for name in classes},
        waves=waves,
        canaries=("cam-canary",),
        lanes=dict.fromkeys(classes, lane),
        phase=Phase.WAVE,
        updated_at=T0,
    )
    return record.model_copy(update=changes)


def with_lane(record: RolloutRecord, name: str = CLASS, **changes: Any) -> RolloutRecord:
    """``record`` with one lane changed."""
    lanes = {**record.lanes, name: record.lanes[name].model_copy(update=changes)}
    return record.model_copy(update={"lanes": lanes})


def device_state(
    device_id: str, *, hw_class: str = CLASS, sha256: str | None = None, **changes: Any
) -> DeviceState:
    """A serving device's retained state as the fleet view reads it: its class and the
    sha256 of the model it runs (and any other field given)."""
    fields: dict[str, Any] = {
        "device_id": device_id,
        "hw_class": hw_class,
        "mode": Mode.SERVING,
        "active_release": None,
        "active_sha256": sha256,
        "target_release": None,
        "rollout_id": None,
        "applied_seq": 3,
        "trust_version": 1,
        "inferences_total": 0,
        "last_inference_at": None,
        "last_rejection": None,
        "updated_at": T0,
    }
    return DeviceState(**{**fields, **changes})


def health_report(device_id: str, **changes: Any) -> HealthReport:
    """A healthy report of ``device_id`` on ``rollout-1`` (and any other field given)."""
    report = HealthReport(
        report_id=f"{device_id}-1",
        device_id=device_id,
        rollout_id="rollout-1",
        manifest_seq=4,
        release="digits-v2",
        verdict=Verdict.HEALTHY,
        inferences=100,
        errors=0,
        p95_latency_ms=1.0,
        soak_seconds=4.0,
        at=T0,
    )
    return report.model_copy(update=changes)


def census_by_walk(fleet: FleetView) -> dict[Census, int]:
    """The census by a walk of the whole fleet: the reference for the one the fleet view
    keeps as devices change (and the baseline of ``bench/metrics.py``)."""
    found: Counter[Census] = Counter()
    for view in fleet.devices.values():
        state = view.state
        if state is None:
            found["", "", "", view.online] += 1
        else:
            key = (state.hw_class, state.active_release or "", state.mode.value, view.online)
            found[key] += 1
    return dict(found)
