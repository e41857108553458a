"""Every topic of the edgefleet tree, built and parsed in one place.

No other module assembles a topic string by hand. Names that go into a topic
(device ids, classes, rollout ids) are checked here, so a hostile id cannot inject
``/``, ``+`` or ``#`` into another party's namespace.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from schemas.errors import MalformedPayloadError, Reason

__all__ = [
    "MAX_FILTER_CHARS",
    "NAME_PATTERN",
    "PREFIX",
    "DeviceChannel",
    "ParsedTopic",
    "TopicKind",
    "all_artifact_metas",
    "all_artifacts",
    "all_class_manifests",
    "all_class_telemetry",
    "all_device_acks",
    "all_devices",
    "all_rollout_specs",
    "all_rollout_statuses",
    "all_staging",
    "artifact_chunk",
    "artifact_chunks",
    "artifact_meta",
    "check_name",
    "class_manifest",
    "class_telemetry",
    "coordinator_fence",
    "coordinator_presence",
    "device",
    "device_ack",
    "device_all",
    "everything",
    "parse",
    "rollout_spec",
    "rollout_status",
    "scoped",
    "staging_chunk",
    "staging_chunks",
    "staging_meta",
    "trust",
]

PREFIX: Final = "fleet/v1"
NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""What a name that stands as one topic level (class, device id, rollout id) looks like."""
_NAME = re.compile(NAME_PATTERN)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_INDEX = re.compile(r"0|[1-9][0-9]{0,8}")


class DeviceChannel(StrEnum):
    """The topics under ``devices/{id}/``."""

    PRESENCE = "presence"
    STATE = "state"
    HEALTH = "health"
    TELEMETRY = "telemetry"
    EVENTS = "events"


class TopicKind(StrEnum):
    TRUST = "trust"
    CLASS_MANIFEST = "class_manifest"
    CLASS_TELEMETRY = "class_telemetry"
    ARTIFACT_META = "artifact_meta"
    ARTIFACT_CHUNK = "artifact_chunk"
    STAGING_META = "staging_meta"
    STAGING_CHUNK = "staging_chunk"
    ROLLOUT_SPEC = "rollout_spec"
    ROLLOUT_STATUS = "rollout_status"
    DEVICE = "device"
    DEVICE_ACK = "device_ack"
    COORDINATOR_PRESENCE = "coordinator_presence"
    COORDINATOR_FENCE = "coordinator_fence"


@dataclass(frozen=True, kw_only=True)
class ParsedTopic:
    """A topic of the tree, taken apart. Only the fields its kind uses are set."""

    kind: TopicKind
    name: str | None = None
    """The class, rollout id, device id or artifact sha256 the topic is about."""
    channel: DeviceChannel | None = None
    index: int | None = None


def check_name(value: str, what: str = "name") -> str:
    """Return ``value`` if it may stand as one topic level, else raise ValueError."""
    if not _NAME.fullmatch(value):
        msg = f"invalid {what} {value!r}: use 1-64 of [A-Za-z0-9._-], starting alphanumeric"
        raise ValueError(msg)
    return value


def _sha(value: str) -> str:
    if not _SHA256.fullmatch(value):
        msg = f"invalid sha256 {value!r}"
        raise ValueError(msg)
    return value


def trust() -> str:
    return f"{PREFIX}/trust"


def class_manifest(hw_class: str) -> str:
    return f"{PREFIX}/classes/{check_name(hw_class, 'class')}/manifest"


def class_telemetry(hw_class: str) -> str:
    """Where the coordinator keeps, retained, the class's aggregated telemetry
    (``schemas.classtelemetry.ClassTelemetry``)."""
    return f"{PREFIX}/classes/{check_name(hw_class, 'class')}/telemetry"


def artifact_meta(sha256: str) -> str:
    return f"{PREFIX}/artifacts/{_sha(sha256)}/meta"


def artifact_chunk(sha256: str, index: int) -> str:
    if index < 0:
        msg = f"negative chunk index {index}"
        raise ValueError(msg)
    return f"{PREFIX}/artifacts/{_sha(sha256)}/{index}"


def artifact_chunks(sha256: str) -> str:
    """Filter for every chunk (and the meta) of one artifact."""
    return f"{PREFIX}/artifacts/{_sha(sha256)}/+"


def staging_meta(sha256: str) -> str:
    """Where an operator uploads an artifact's meta, for the coordinator to check."""
    return f"{PREFIX}/staging/{_sha(sha256)}/meta"


def staging_chunk(sha256: str, index: int) -> str:
    if index < 0:
        msg = f"negative chunk index {index}"
        raise ValueError(msg)
    return f"{PREFIX}/staging/{_sha(sha256)}/{index}"


def staging_chunks(sha256: str) -> str:
    """Filter for every staged chunk (and the meta) of one artifact."""
    return f"{PREFIX}/staging/{_sha(sha256)}/+"


def rollout_spec(rollout_id: str) -> str:
    return f"{PREFIX}/rollouts/{check_name(rollout_id, 'rollout id')}/spec"


def rollout_status(rollout_id: str) -> str:
    return f"{PREFIX}/rollouts/{check_name(rollout_id, 'rollout id')}/status"


def device(device_id: str, channel: DeviceChannel) -> str:
    return f"{PREFIX}/devices/{check_name(device_id, 'device id')}/{channel.value}"


def device_ack(device_id: str) -> str:
    """Where the coordinator says, retained, how much of the device's telemetry it has
    durably counted (``schemas.telemetry.TelemetryAck``). Not a :class:`DeviceChannel`:
    the device only reads it."""
    return f"{PREFIX}/devices/{check_name(device_id, 'device id')}/ack"


def coordinator_presence() -> str:
    return f"{PREFIX}/coordinator/presence"


def coordinator_fence() -> str:
    """Where the coordinator sends itself a message, never retained, to learn that
    everything the broker sent before it was read (``coordinator.clock.Settling``)."""
    return f"{PREFIX}/coordinator/fence"


def all_devices(channel: DeviceChannel) -> str:
    return f"{PREFIX}/devices/+/{channel.value}"


def all_device_acks() -> str:
    return f"{PREFIX}/devices/+/ack"


def all_class_manifests() -> str:
    return f"{PREFIX}/classes/+/manifest"


def all_class_telemetry() -> str:
    return f"{PREFIX}/classes/+/telemetry"


def all_rollout_specs() -> str:
    return f"{PREFIX}/rollouts/+/spec"


def all_rollout_statuses() -> str:
    return f"{PREFIX}/rollouts/+/status"


def all_artifacts() -> str:
    return f"{PREFIX}/artifacts/#"


def all_staging() -> str:
    """Filter for every staged upload (operators write here, only the coordinator reads)."""
    return f"{PREFIX}/staging/#"


def all_artifact_metas() -> str:
    return f"{PREFIX}/artifacts/+/meta"


def device_all(device_id: str) -> str:
    """Filter for every topic of one device."""
    return f"{PREFIX}/devices/{check_name(device_id, 'device id')}/#"


def everything() -> str:
    """Filter for the whole tree."""
    return f"{PREFIX}/#"


MAX_FILTER_CHARS: Final = 512
"""The longest topic filter :func:`scoped` takes (the tree's longest topic is ~100)."""


def scoped(topic_filter: str) -> str:
    """A filter a person gave (``edgefleet tail``): as it is when it starts with the
    prefix, else taken under it (``devices/+/state``, ``#``).

    Raises:
        ValueError: not a valid MQTT filter (``#`` only as the last level, ``+`` only as a
            whole level, no NUL), or longer than ``MAX_FILTER_CHARS``.
    """
    if not topic_filter or len(topic_filter) > MAX_FILTER_CHARS or "\0" in topic_filter:
        msg = f"invalid topic filter {topic_filter[:MAX_FILTER_CHARS]!r}"
        raise ValueError(msg)
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        wild = ("+" in level or "#" in level) and level not in ("+", "#")
        if wild or (level == "#" and i != len(levels) - 1):
            msg = f"invalid topic filter {topic_filter!r}: '+' and '#' stand alone, '#' last"
            raise ValueError(msg)
    if topic_filter == PREFIX or topic_filter.startswith(PREFIX + "/"):
        return topic_filter
    return f"{PREFIX}/{topic_filter}"


def parse(topic: str) -> ParsedTopic:
    """Take a received topic apart.

    Raises:
        MalformedPayloadError: the topic is not one of the tree's.
    """
    if not topic.startswith(PREFIX + "/"):
        raise MalformedPayloadError(Reason.MALFORMED, f"topic {topic!r} outside {PREFIX}")
    parts = topic[len(PREFIX) + 1 :].split("/")
    try:
        return _parse_parts(parts)
    except ValueError as exc:
        raise MalformedPayloadError(Reason.MALFORMED, f"topic {topic!r}: {exc}") from exc


_CLASS_KINDS: Final = {
    "manifest": TopicKind.CLASS_MANIFEST,
    "telemetry": TopicKind.CLASS_TELEMETRY,
}

_ARTIFACT_KINDS: Final = {
    ("artifacts", True): TopicKind.ARTIFACT_META,
    ("artifacts", False): TopicKind.ARTIFACT_CHUNK,
    ("staging", True): TopicKind.STAGING_META,
    ("staging", False): TopicKind.STAGING_CHUNK,
}


def _artifact_topic(area: str, sha256: str, leaf: str) -> ParsedTopic:
    """``{area}/{sha256}/meta`` or ``{area}/{sha256}/{index}``."""
    if leaf == "meta":
        return ParsedTopic(kind=_ARTIFACT_KINDS[area, True], name=sha256)
    if not _INDEX.fullmatch(leaf):
        msg = "unknown topic"
        raise ValueError(msg)
    return ParsedTopic(kind=_ARTIFACT_KINDS[area, False], name=sha256, index=int(leaf))


def _parse_parts(parts: list[str]) -> ParsedTopic:
    parsed: ParsedTopic
    match parts:
        case ["trust"]:
            parsed = ParsedTopic(kind=TopicKind.TRUST)
        case ["classes", name, "manifest" | "telemetry" as leaf]:
            parsed = ParsedTopic(kind=_CLASS_KINDS[leaf], name=check_name(name, "class"))
        case ["artifacts" | "staging" as area, sha, leaf]:
            parsed = _artifact_topic(area, _sha(sha), leaf)
        case ["rollouts", rid, "spec"]:
            parsed = ParsedTopic(kind=TopicKind.ROLLOUT_SPEC, name=check_name(rid, "rollout id"))
        case ["rollouts", rid, "status"]:
            parsed = ParsedTopic(kind=TopicKind.ROLLOUT_STATUS, name=check_name(rid, "rollout id"))
        case ["devices", did, channel] if channel in DeviceChannel.__members__.values():
            parsed = ParsedTopic(
                kind=TopicKind.DEVICE,
                name=check_name(did, "device id"),
                channel=DeviceChannel(channel),
            )
        case ["devices", did, "ack"]:
            parsed = ParsedTopic(kind=TopicKind.DEVICE_ACK, name=check_name(did, "device id"))
        case ["coordinator", "presence"]:
            parsed = ParsedTopic(kind=TopicKind.COORDINATOR_PRESENCE)
        case ["coordinator", "fence"]:
            parsed = ParsedTopic(kind=TopicKind.COORDINATOR_FENCE)
        case _:
            msg = "unknown topic"
            raise ValueError(msg)
    return parsed
