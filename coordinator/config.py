"""The coordinator's settings and its named limits, in one place.

Built once by the composition root (``edgefleet.compose``) and handed to
:class:`coordinator.Coordinator`; nothing below reads files or the environment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.backoff import RECONNECT, Backoff
from broker.transport import Endpoint, listen_address
from coordinator.aggregate import AggregateSettings
from coordinator.profiles import ClassProfile
from schemas import KeyPair
from schemas.rollout import MAX_REASON_CHARS

__all__ = ["CoordinatorConfig", "CoordinatorLimits", "MetricsConfig"]


@dataclass(frozen=True, kw_only=True)
class CoordinatorLimits:
    """Bounds on what the coordinator keeps, sends at once and writes."""

    refusals_kept: int = 256
    """Refused spec ids kept (stored, with a retained ``rejected`` status). Beyond it the
    oldest is forgotten and its spec and status are cleared from the broker, so an
    account that floods ``rollouts/+/spec`` with junk costs neither the store nor the
    broker more."""
    noted_kept: int = 10_000
    """(rollout id, payload digest) pairs of unwanted spec bytes remembered as logged."""
    publish_window: int = 32
    """Chunks of one artifact published at once when re-asserting it."""
    reason_chars: int = MAX_REASON_CHARS
    """Bound of every rollout reason, refusal and audit detail built from input."""
    unhealthy_quoted: int = 3
    """Devices whose own reasons a failure rollback quotes."""
    device_reason_chars: int = 300
    """One device's part of a rollback reason: several fit in the status's reason."""
    reports_remembered: int = 100_000
    """Health report ids remembered to drop redeliveries (telemetry is counted by its
    devices' numbers, ``coordinator.ledger``)."""
    stop_publish_s: float = 2.0
    """On a clean stop, how long the ``offline`` presence may take to be acknowledged."""
    ingest_batch: int = 500
    """Incoming messages already waiting that the ingest takes as one batch, at most:
    bounds what applying one batch costs the event loop (a few microseconds each)."""
    ingest_thread_min: int = 16
    """A batch this long is read (topics parsed, device payloads decoded) in a thread:
    the hop costs the loop about as much as reading that many device messages on it."""

    def __post_init__(self) -> None:
        if min(self.refusals_kept, self.noted_kept, self.publish_window) < 1:
            msg = "refusals_kept, noted_kept and publish_window must be positive"
            raise ValueError(msg)
        if min(self.ingest_batch, self.ingest_thread_min) < 1:
            msg = "ingest_batch and ingest_thread_min must be positive"
            raise ValueError(msg)
        if not 1 <= self.reason_chars <= MAX_REASON_CHARS:
            msg = f"reason_chars must be within 1..{MAX_REASON_CHARS} (the status's bound)"
            raise ValueError(msg)


@dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    """Where the coordinator serves its Prometheus metrics (``coordinator.exporter``), and
    how many series it lets grow from what devices and operators name."""

    host: str = "127.0.0.1"
    port: int = 9464
    """0: a free port (``Coordinator.metrics_address`` says which)."""
    device_series: int = 500
    """Device census series (class, release, mode, online) at most: beyond it, the
    smallest are summed into one series labelled ``other``."""
    finished_rollouts: int = 20
    """Finished rollouts shown beside the live ones, the latest first."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            msg = f"metrics port {self.port} outside 0..65535"
            raise ValueError(msg)
        if self.device_series < 1 or self.finished_rollouts < 0:
            msg = "device_series must be positive, finished_rollouts not negative"
            raise ValueError(msg)

    @classmethod
    def parse(cls, address: str) -> MetricsConfig:
        """``PORT``, ``HOST:PORT`` or ``[IPv6]:PORT``; the host is 127.0.0.1 when not given.

        Raises:
            ValueError: not such an address.
        """
        try:
            host, port = listen_address(address, cls.host)
        except ValueError as exc:
            msg = f"invalid metrics address: {exc}"
            raise ValueError(msg) from None
        return cls(host=host, port=port)


@dataclass(frozen=True, kw_only=True)
class CoordinatorConfig:
    data_dir: Path
    endpoint: Endpoint
    profiles: dict[str, ClassProfile]
    manifest_key: KeyPair
    trust: bytes
    """The root-signed TrustDoc envelope to publish; the root key stays offline."""
    root_keys: dict[str, Ed25519PublicKey]
    tick_s: float = 0.5
    fence_s: float = 10.0
    """After connecting, how long the fence may take to come back before it is sent
    again (``coordinator.clock.Settling``)."""
    artifact_timeout_s: float = 60.0
    session_expiry_s: int = 7 * 24 * 3600
    reconnect: Backoff = RECONNECT
    """Waits between attempts to reach a broker unreachable (at start or after a drop)."""
    heartbeat_s: float = 2.0
    """How often, at most, the store learns that the coordinator still watches."""
    probe_s: float = 10.0
    """On connect, how long at most to wait for the broker's retained topics (they come
    before the echo of the coordinator's presence) before publishing anyway."""
    orphan_grace_s: float = 600.0
    """A staged upload or retained artifact that no spec names is cleared after this
    long: an operator uploads before publishing the spec that names it."""
    datasets_dir: Path | None = None
    """Held-out data sets (``<name>.npz``) the classes' accuracy gates name."""
    limits: CoordinatorLimits = field(default_factory=CoordinatorLimits)
    telemetry: AggregateSettings = field(default_factory=AggregateSettings)
    """The fleet telemetry aggregated per class (``classes/{class}/telemetry``): how often
    it is published, how many releases and labels it follows, its alerts' hysteresis."""
    metrics: MetricsConfig | None = None
    """Where to serve Prometheus metrics; None (the default): not served."""
