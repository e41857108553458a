"""What devices publish about themselves: state, health reports and events."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Final

from pydantic import Field

from schemas.codec import WireModel

__all__ = [
    "MAX_REASON_CHARS",
    "OFFLINE",
    "ONLINE",
    "DeviceState",
    "Event",
    "EventKind",
    "HealthReport",
    "Inventory",
    "Mode",
    "Rejection",
    "Verdict",
]

ONLINE: Final = b"online"
OFFLINE: Final = b"offline"
MAX_REASON_CHARS: Final = 500
"""Bound of ``DeviceState.degraded_reason``; builders cut their text to it."""


class Mode(StrEnum):
    IDLE = "idle"
    """No model yet."""
    SERVING = "serving"
    UPDATING = "updating"
    """Serving the previous model while a new one is fetched, loaded or soaked."""
    DEGRADED = "degraded"
    """Serving, but the last update failed and was rolled back, or the device's storage
    is failing (then ``DeviceState.degraded_reason`` says how)."""


class Rejection(WireModel):
    reason: str = Field(max_length=64)
    detail: str = Field(max_length=1000)
    at: float


_Label = Annotated[str, Field(max_length=64)]


class Inventory(WireModel):
    """What a device is, for operators and targeting: gathered once at the agent's
    start, the free disk on each state publish. Texts are bounded where they are read."""

    arch: _Label
    """CPU architecture as the kernel names it (``x86_64``, ``aarch64``)."""
    os: _Label
    """Kernel name and release, e.g. ``Linux 6.1.0``."""
    cores: int = Field(ge=0)
    ram_bytes: int = Field(ge=0)
    disk_free_bytes: int | None = Field(default=None, ge=0)
    """Free space for the agent's data folder; None when it cannot be read."""
    providers: tuple[_Label, ...] = Field(default=(), max_length=16)
    """onnxruntime's execution providers available here, in its order."""
    onnxruntime: _Label
    agent: _Label
    """The edgefleet version the agent runs."""
    temperature_c: float | None = None
    """The hottest thermal zone the OS exposes (``/sys/class/thermal``), if any."""


class DeviceState(WireModel):
    device_id: str
    hw_class: str
    mode: Mode
    active_release: str | None
    active_sha256: str | None
    target_release: str | None
    rollout_id: str | None
    applied_seq: int
    trust_version: int
    inferences_total: int
    last_inference_at: float | None
    last_rejection: Rejection | None
    updated_at: float
    degraded_reason: str | None = Field(default=None, max_length=MAX_REASON_CHARS)
    """Why the device is degraded, each cause headed by what fails: its storage (a full
    or read-only data folder, e.g. ``outbox: database or disk is full``), its model's
    execution provider (``provider: CUDAExecutionProvider: ...; serving on
    CPUExecutionProvider``), or its model (``model: ... does not load: ...``, none
    serving). None when nothing does. Any of them makes ``mode`` degraded."""
    inventory: Inventory | None = None
    """What the device is (None from agents that predate it)."""


class Verdict(StrEnum):
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


class HealthReport(WireModel):
    report_id: str
    device_id: str
    rollout_id: str | None
    manifest_seq: int
    release: str
    verdict: Verdict
    reasons: tuple[Annotated[str, Field(max_length=200)], ...] = Field(default=(), max_length=16)
    inferences: int
    errors: int
    p95_latency_ms: float | None
    soak_seconds: float
    at: float


class EventKind(StrEnum):
    TRUST_REJECTED = "trust_rejected"
    MANIFEST_REJECTED = "manifest_rejected"
    ARTIFACT_REJECTED = "artifact_rejected"
    UPDATE_APPLIED = "update_applied"
    ROLLBACK = "rollback"
    TELEMETRY_COARSENED = "telemetry_coarsened"
    ARTIFACT_RETRY = "artifact_retry"
    """A chunk, meta or assembled file did not match: dropped and fetched again (no
    verdict: the meta and chunks are unsigned, their writer may be wrong)."""
    STORAGE_DAMAGED = "storage_damaged"
    """A damaged file on the device was moved aside (or deleted); the detail names the
    file and what was lost or recovered."""
    STORAGE_RECOVERED = "storage_recovered"
    """Storage works again after failing (full or read-only); the detail says what failed."""


class Event(WireModel):
    event_id: str
    device_id: str
    kind: EventKind
    reason: str | None = Field(default=None, max_length=64)
    detail: str = Field(default="", max_length=2000)
    manifest_seq: int | None = None
    release: str | None = None
    dropped_before: int = Field(default=0, ge=0)
    """Events lost just before this one (the device's outbox was full or failing)."""
    at: float
