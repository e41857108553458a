"""A hardware class's telemetry, aggregated by the coordinator: for each release its
devices run, the last minute and the last hour (rate, error rate, latency quantiles,
confidence bins, labels), its drift from a reference distribution, and its health against
its budget. Retained on ``classes/{class}/telemetry``, coordinator only; dashboards read
it.

Bounded whatever the devices send: at most ``MAX_RELEASES`` releases, ``MAX_LABELS_SHOWN``
labels per distribution (the rest counted together under ``…other``), reasons of at most
200 characters; a full message stays well under the codec's 256 KiB.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Final

from pydantic import Field

from schemas.codec import WireModel
from schemas.manifest import HealthBudget
from schemas.telemetry import CONFIDENCE_BINS, MAX_LABEL_CHARS

__all__ = [
    "MAX_LABELS_SHOWN",
    "MAX_RELEASES",
    "ClassTelemetry",
    "DriftStatus",
    "HealthStatus",
    "ReferenceSource",
    "ReleaseRole",
    "ReleaseTelemetry",
    "WindowStats",
]

MAX_RELEASES: Final = 16
MAX_LABELS_SHOWN: Final = 32
"""Labels of one distribution shown by name; the rest are summed under ``…other``."""
MAX_RELEASE_CHARS: Final = 200

_Ms = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
_Seconds = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
_Share = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
_Bins = Annotated[
    tuple[Annotated[int, Field(ge=0)], ...],
    Field(min_length=CONFIDENCE_BINS, max_length=CONFIDENCE_BINS),
]
_Labels = Annotated[
    dict[Annotated[str, Field(max_length=MAX_LABEL_CHARS)], Annotated[int, Field(ge=0)]],
    Field(max_length=MAX_LABELS_SHOWN + 1),
]


class ReleaseRole(StrEnum):
    STABLE = "stable"
    """The class's stable release."""
    CANDIDATE = "candidate"
    """The candidate of a live rollout of the class."""
    PAST = "past"
    """Neither any more (rolled back, replaced), still heard from in the last hour."""


class ReferenceSource(StrEnum):
    ROLLOUT = "rollout"
    """What the release's devices saw during its rollout."""
    FIRST_HOUR = "first_hour"
    """Its first hour as this coordinator saw it (a release it did not roll out)."""


class WindowStats(WireModel):
    """One rolling window of one release, over every device that runs it."""

    seconds: _Seconds
    """The window's length (60 or 3600)."""
    observed_s: _Seconds
    """How much of it the coordinator watched (less while it has run for less)."""
    inferences: int = Field(ge=0)
    errors: int = Field(ge=0)
    rate_per_s: _Share
    """Inferences per second over ``observed_s``."""
    error_rate: _Share | None
    """None without inferences."""
    p50_ms: _Ms | None
    p95_ms: _Ms | None
    p99_ms: _Ms | None
    """Upper bounds of the log buckets holding each quantile (high by at most 10 %)."""
    confidence: _Bins
    labels: _Labels


class DriftStatus(WireModel):
    reference: ReferenceSource | None
    """Where the reference comes from; None while it is still being gathered."""
    reference_inferences: int = Field(ge=0)
    reference_confidence: _Bins
    reference_labels: _Labels
    window_s: _Seconds | None
    """The window last compared with the reference (None: not judged, too few)."""
    confidence_psi: _Share | None
    confidence_ks: _Share | None
    labels_psi: _Share | None
    psi_threshold: float = Field(gt=0.0, allow_inf_nan=False)
    alert: bool
    since: float | None
    """When the alert was raised."""


class HealthStatus(WireModel):
    budget: HealthBudget | None
    """The release's health budget (None: the coordinator does not know the release)."""
    window_s: _Seconds | None
    """The window last judged (None: too few inferences)."""
    breach: bool
    reasons: tuple[Annotated[str, Field(max_length=200)], ...] = Field(max_length=4)
    since: float | None
    """When the breach began."""


class ReleaseTelemetry(WireModel):
    release: str = Field(min_length=1, max_length=MAX_RELEASE_CHARS)
    role: ReleaseRole
    rollout_id: str | None = Field(max_length=64)
    """The rollout it is (or was last) the candidate of."""
    first_seen: float
    last_seen: float
    minute: WindowStats
    hour: WindowStats
    drift: DriftStatus
    health: HealthStatus


class ClassTelemetry(WireModel):
    hw_class: str = Field(max_length=64)
    at: float
    releases: tuple[ReleaseTelemetry, ...] = Field(max_length=MAX_RELEASES)
    unattributed: int = Field(ge=0)
    """Inferences of the last hour from releases not followed (none the coordinator
    names, or beyond ``MAX_RELEASES``)."""
