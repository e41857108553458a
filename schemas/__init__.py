"""The wire contract of edgefleet: topics, messages, codec, signing and verification.

Pure: no MQTT client, no asyncio, no file or network I/O.
"""

from schemas.artifact import ArtifactMeta, split_artifact
from schemas.codec import MAX_MESSAGE_BYTES, SCHEMA_VERSION, WireModel, decode, encode
from schemas.device import (
    OFFLINE,
    ONLINE,
    DeviceState,
    Event,
    EventKind,
    HealthReport,
    Mode,
    Rejection,
    Verdict,
)
from schemas.envelope import KeyPair, key_id, open_envelope, public_from_raw, public_raw, seal
from schemas.errors import (
    ArtifactError,
    EdgefleetError,
    MalformedPayloadError,
    PolicyError,
    Reason,
    RejectedError,
    SignatureError,
    UsageError,
)
from schemas.golden import GoldenCase, GoldenSet, Tensor, Tolerance, golden_mismatches
from schemas.manifest import (
    MANIFEST_KIND,
    ArtifactRef,
    HealthBudget,
    Manifest,
    Release,
    RolloutCohort,
    Runtime,
    Target,
    TensorSpec,
    bucket,
)
from schemas.rollout import (
    ROLLOUT_SPEC_KIND,
    Candidate,
    Desired,
    Phase,
    RolloutSpec,
    RolloutStatus,
    Variant,
    WaveCounts,
)
from schemas.telemetry import LogHistogram, TelemetrySummary, merge_summaries
from schemas.trust import TRUST_KIND, Role, RoleKeys, TrustDoc
from schemas.verify import TrustedState

__all__ = [
    "MANIFEST_KIND",
    "MAX_MESSAGE_BYTES",
    "OFFLINE",
    "ONLINE",
    "ROLLOUT_SPEC_KIND",
    "SCHEMA_VERSION",
    "TRUST_KIND",
    "ArtifactError",
    "ArtifactMeta",
    "ArtifactRef",
    "Candidate",
    "Desired",
    "DeviceState",
    "EdgefleetError",
    "Event",
    "EventKind",
    "GoldenCase",
    "GoldenSet",
    "HealthBudget",
    "HealthReport",
    "KeyPair",
    "LogHistogram",
    "MalformedPayloadError",
    "Manifest",
    "Mode",
    "Phase",
    "PolicyError",
    "Reason",
    "RejectedError",
    "Rejection",
    "Release",
    "Role",
    "RoleKeys",
    "RolloutCohort",
    "RolloutSpec",
    "RolloutStatus",
    "Runtime",
    "SignatureError",
    "Target",
    "TelemetrySummary",
    "Tensor",
    "TensorSpec",
    "Tolerance",
    "TrustDoc",
    "TrustedState",
    "UsageError",
    "Variant",
    "Verdict",
    "WaveCounts",
    "WireModel",
    "bucket",
    "decode",
    "encode",
    "golden_mismatches",
    "key_id",
    "merge_summaries",
    "open_envelope",
    "public_from_raw",
    "public_raw",
    "seal",
    "split_artifact",
]
