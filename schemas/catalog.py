"""Every channel of the topic tree and what travels on it, in one table.

``schemas.topics`` builds and parses topics; this table says, for each kind of topic,
which message its payload is (a wire model, a signed envelope around one, a presence
word or raw bytes), whether it is retained, and which field holds the message's own time.
Readers that take any topic (``edgefleet tail``) look a parsed topic up here, and the
AsyncAPI document (``edgefleet.asyncapi``) is generated from it. Who may publish or
subscribe is not here: ``broker.acl`` decides it, and the document derives it from there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from schemas import topics
from schemas.artifact import ArtifactMeta
from schemas.classtelemetry import ClassTelemetry
from schemas.codec import WireModel
from schemas.device import DeviceState, Event, HealthReport
from schemas.manifest import MANIFEST_KIND, Manifest
from schemas.rollout import ROLLOUT_SPEC_KIND, RolloutSpec, RolloutStatus
from schemas.telemetry import TelemetryAck, TelemetrySummary
from schemas.topics import DeviceChannel, ParsedTopic, TopicKind
from schemas.trust import TRUST_KIND, TrustDoc

__all__ = ["CHANNELS", "Body", "Channel", "Param", "channel_of"]


class Body(StrEnum):
    """How a channel's payload is encoded."""

    MSGPACK = "msgpack"
    """A wire model, msgpack (``schemas.codec``)."""
    SIGNED = "signed"
    """A signed envelope (``schemas.envelope``) whose body is a wire model, msgpack."""
    PRESENCE = "presence"
    """The word ``online`` or ``offline`` (a Last Will says ``offline``)."""
    BYTES = "bytes"
    """Raw bytes: an artifact's chunk, or the coordinator's fence."""


@dataclass(frozen=True)
class Param:
    """One level of a topic that names something."""

    name: str
    description: str
    sample: str
    """A valid value, distinct from every other parameter's, for building addresses."""
    other: str
    """A second valid value: what an account may do on someone else's topic."""


DEVICE_ID: Final = Param(
    "deviceId",
    "A device id, the CN of its certificate: 1-64 of [A-Za-z0-9._-], alphanumeric first.",
    "device-1",
    "device-2",
)
HW_CLASS: Final = Param(
    "hwClass",
    "A hardware class of the coordinator's profiles: 1-64 of [A-Za-z0-9._-].",
    "class-1",
    "class-2",
)
ROLLOUT_ID: Final = Param(
    "rolloutId",
    "A rollout id: 1-64 of [A-Za-z0-9._-], alphanumeric first.",
    "rollout-1",
    "rollout-2",
)
SHA256: Final = Param(
    "sha256", "The artifact's sha256, 64 lowercase hex digits.", "a" * 64, "b" * 64
)
INDEX: Final = Param("index", "A chunk's index from 0, in decimal without leading zeros.", "7", "8")


@dataclass(frozen=True, kw_only=True)
class Channel:
    """One kind of topic and what travels on it."""

    key: str
    """Its name in the AsyncAPI document."""
    kind: TopicKind
    device_channel: DeviceChannel | None = None
    params: tuple[Param, ...] = ()
    build: Callable[..., str]
    """``schemas.topics``' builder, called with the parameters' values in order."""
    body: Body
    model: type[WireModel] | None = None
    """The message (the signed body's, for a signed channel)."""
    signed_kind: str | None = None
    retained: bool
    stamp: str | None = None
    """The model's field holding the message's own time (seconds since the epoch)."""
    summary: str

    def address(self, values: tuple[str, ...] | None = None) -> str:
        """The topic for ``values`` (the parameters' samples by default)."""
        values = tuple(p.sample for p in self.params) if values is None else values
        args = [int(v) if p is INDEX else v for p, v in zip(self.params, values, strict=True)]
        return self.build(*args)

    def template(self) -> str:
        """The address with each parameter as ``{name}``, as AsyncAPI writes it."""
        names = {p.sample: p.name for p in self.params}
        return "/".join(
            f"{{{names[level]}}}" if level in names else level
            for level in self.address().split("/")
        )


def _device(channel: DeviceChannel) -> Callable[[str], str]:
    def build(device_id: str) -> str:
        return topics.device(device_id, channel)

    return build


CHANNELS: Final[tuple[Channel, ...]] = (
    Channel(
        key="trust",
        kind=TopicKind.TRUST,
        build=topics.trust,
        body=Body.SIGNED,
        model=TrustDoc,
        signed_kind=TRUST_KIND,
        retained=True,
        stamp="issued_at",
        summary="The root-signed TrustDoc: which keys may sign manifests and rollout specs.",
    ),
    Channel(
        key="classManifest",
        kind=TopicKind.CLASS_MANIFEST,
        params=(HW_CLASS,),
        build=topics.class_manifest,
        body=Body.SIGNED,
        model=Manifest,
        signed_kind=MANIFEST_KIND,
        retained=True,
        stamp="issued_at",
        summary="The signed manifest of one hardware class: its stable release and rollout.",
    ),
    Channel(
        key="classTelemetry",
        kind=TopicKind.CLASS_TELEMETRY,
        params=(HW_CLASS,),
        build=topics.class_telemetry,
        body=Body.MSGPACK,
        model=ClassTelemetry,
        retained=True,
        stamp="at",
        summary="A class's telemetry aggregated per release over 1 min and 1 h; drift, health.",
    ),
    Channel(
        key="artifactMeta",
        kind=TopicKind.ARTIFACT_META,
        params=(SHA256,),
        build=topics.artifact_meta,
        body=Body.MSGPACK,
        model=ArtifactMeta,
        retained=True,
        summary="An admitted artifact's size, chunk size and per-chunk sha256.",
    ),
    Channel(
        key="artifactChunk",
        kind=TopicKind.ARTIFACT_CHUNK,
        params=(SHA256, INDEX),
        build=topics.artifact_chunk,
        body=Body.BYTES,
        retained=True,
        summary="One chunk of an admitted artifact, raw bytes.",
    ),
    Channel(
        key="stagingMeta",
        kind=TopicKind.STAGING_META,
        params=(SHA256,),
        build=topics.staging_meta,
        body=Body.MSGPACK,
        model=ArtifactMeta,
        retained=True,
        summary="An operator's upload, described: the coordinator checks it before admission.",
    ),
    Channel(
        key="stagingChunk",
        kind=TopicKind.STAGING_CHUNK,
        params=(SHA256, INDEX),
        build=topics.staging_chunk,
        body=Body.BYTES,
        retained=True,
        summary="One chunk of an operator's upload, raw bytes.",
    ),
    Channel(
        key="rolloutSpec",
        kind=TopicKind.ROLLOUT_SPEC,
        params=(ROLLOUT_ID,),
        build=topics.rollout_spec,
        body=Body.SIGNED,
        model=RolloutSpec,
        signed_kind=ROLLOUT_SPEC_KIND,
        retained=True,
        stamp="issued_at",
        summary="An operator-signed rollout spec; pause, resume and abort are new generations.",
    ),
    Channel(
        key="rolloutStatus",
        kind=TopicKind.ROLLOUT_STATUS,
        params=(ROLLOUT_ID,),
        build=topics.rollout_status,
        body=Body.MSGPACK,
        model=RolloutStatus,
        retained=True,
        stamp="updated_at",
        summary="What the coordinator observed and decided of a rollout, class by class.",
    ),
    Channel(
        key="devicePresence",
        kind=TopicKind.DEVICE,
        device_channel=DeviceChannel.PRESENCE,
        params=(DEVICE_ID,),
        build=_device(DeviceChannel.PRESENCE),
        body=Body.PRESENCE,
        retained=True,
        summary="online, or offline (the device's Last Will).",
    ),
    Channel(
        key="deviceState",
        kind=TopicKind.DEVICE,
        device_channel=DeviceChannel.STATE,
        params=(DEVICE_ID,),
        build=_device(DeviceChannel.STATE),
        body=Body.MSGPACK,
        model=DeviceState,
        retained=True,
        stamp="updated_at",
        summary="A device's class, release, mode, applied seq and inventory.",
    ),
    Channel(
        key="deviceHealth",
        kind=TopicKind.DEVICE,
        device_channel=DeviceChannel.HEALTH,
        params=(DEVICE_ID,),
        build=_device(DeviceChannel.HEALTH),
        body=Body.MSGPACK,
        model=HealthReport,
        retained=True,
        stamp="at",
        summary="A device's verdict on the release it soaked, for one rollout and manifest.",
    ),
    Channel(
        key="deviceTelemetry",
        kind=TopicKind.DEVICE,
        device_channel=DeviceChannel.TELEMETRY,
        params=(DEVICE_ID,),
        build=_device(DeviceChannel.TELEMETRY),
        body=Body.MSGPACK,
        model=TelemetrySummary,
        retained=False,
        stamp="window_end",
        summary="One numbered window of a device's inference, summarised (QoS 1).",
    ),
    Channel(
        key="deviceEvents",
        kind=TopicKind.DEVICE,
        device_channel=DeviceChannel.EVENTS,
        params=(DEVICE_ID,),
        build=_device(DeviceChannel.EVENTS),
        body=Body.MSGPACK,
        model=Event,
        retained=False,
        stamp="at",
        summary="A notable event on a device: a rejection, a rollback, storage trouble.",
    ),
    Channel(
        key="deviceAck",
        kind=TopicKind.DEVICE_ACK,
        params=(DEVICE_ID,),
        build=topics.device_ack,
        body=Body.MSGPACK,
        model=TelemetryAck,
        retained=True,
        stamp="at",
        summary="How much of a device's telemetry the coordinator has durably counted.",
    ),
    Channel(
        key="coordinatorPresence",
        kind=TopicKind.COORDINATOR_PRESENCE,
        build=topics.coordinator_presence,
        body=Body.PRESENCE,
        retained=True,
        summary="online, or offline (the coordinator's Last Will).",
    ),
    Channel(
        key="coordinatorFence",
        kind=TopicKind.COORDINATOR_FENCE,
        build=topics.coordinator_fence,
        body=Body.BYTES,
        retained=False,
        summary="The coordinator's note to itself that its fleet view is complete.",
    ),
)

_BY_TOPIC: Final = {(c.kind, c.device_channel): c for c in CHANNELS}


def channel_of(parsed: ParsedTopic) -> Channel:
    """The channel a parsed topic belongs to (every topic ``topics.parse`` takes has one).

    Raises:
        KeyError: a kind of topic the table does not list (a test keeps this from
            happening: ``tests/schemas/test_catalog.py``).
    """
    return _BY_TOPIC[parsed.kind, parsed.channel]
