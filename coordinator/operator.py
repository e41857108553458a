"""The operator's side: upload a model's variants, publish a signed rollout spec, read
rollout status. Used by the ``edgefleet rollout`` commands.

The operator never writes what devices fetch: it uploads to ``staging/``, and the
coordinator publishes the bytes under ``artifacts/`` once it has admitted them.

Reads of retained topics need no timeout: Mosquitto queues a subscription's retained
messages before it answers any later request of the same client, so once an
UNSUBSCRIBE that follows the SUBSCRIBE is acknowledged, every retained message has
arrived. The readers here share one message stream per session and take turns.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from broker.transport import Message, Transport
from coordinator.profiles import ClassProfile
from coordinator.validate import ModelFacts, golden_problems
from coordinator.variants import Built, rank_variants
from schemas import (
    ONLINE,
    ROLLOUT_SPEC_KIND,
    ArtifactMeta,
    ArtifactRef,
    Candidate,
    Desired,
    DeviceState,
    HealthReport,
    KeyPair,
    Manifest,
    PolicyError,
    Reason,
    RejectedError,
    RolloutSpec,
    RolloutStatus,
    UsageError,
    Variant,
    decode,
    encode,
    seal,
    split_artifact,
    topics,
)
from schemas.artifact import DEFAULT_CHUNK_BYTES
from schemas.envelope import Envelope
from schemas.errors import bound_text
from schemas.topics import DeviceChannel, TopicKind

__all__ = [
    "DeviceRow",
    "RolloutExists",
    "VariantFile",
    "check_new_rollout",
    "describe_candidate",
    "list_statuses",
    "next_generation",
    "publish_artifact",
    "read_fleet",
    "read_manifests",
    "read_spec",
    "read_status",
    "submit_spec",
    "upload_candidate",
    "watch_status",
]

log = logging.getLogger(__name__)

_PUBLISH_WINDOW = 32


class RolloutExists(UsageError):  # noqa: N818 (names what the operator asked for)
    """``rollout start`` with an id that a retained spec or status already holds: the
    coordinator would ignore the new spec, so the operator's side refuses to send it."""

    def __init__(self, rollout_id: str) -> None:
        super().__init__(
            f"rollout {rollout_id!r} already exists; start it under another --id, or "
            f"pause, resume or abort it"
        )
        self.rollout_id = rollout_id


_streams: weakref.WeakKeyDictionary[Transport, AsyncIterator[Message]] = weakref.WeakKeyDictionary()


def _stream(session: Transport) -> AsyncIterator[Message]:
    """The session's one message stream, shared by this module's readers."""
    stream = _streams.get(session)
    if stream is None:
        stream = _streams[session] = session.messages()
    return stream


async def _retained(session: Transport, *wanted: str) -> dict[str, bytes]:
    """The retained payloads of the topics ``wanted`` (exact names), without waiting out
    a timeout: the UNSUBACK comes after every retained message (module docstring)."""
    stream = _stream(session)
    # QoS 0: retained messages go out at once, never held back by an in-flight window.
    await session.subscribe(*wanted, qos=0)
    await session.unsubscribe(*wanted)
    found: dict[str, bytes] = {}
    while (message := await _received(stream)) is not None:
        if message.topic in wanted and message.payload:
            found[message.topic] = message.payload
    return found


async def _received(stream: AsyncIterator[Message]) -> Message | None:
    """The next message already received, or None: never waits for one to arrive."""
    try:
        async with asyncio.timeout(0):
            return await anext(stream)
    except TimeoutError:
        return None


async def publish_artifact(
    session: Transport, data: bytes, *, name: str, chunk_size: int = DEFAULT_CHUNK_BYTES
) -> ArtifactMeta:
    """Upload an artifact for the coordinator to check: chunks (retained) to
    ``staging/{sha256}/``, then the meta, so a meta implies its chunks. Always sent, even
    when ``artifacts/`` retains it: the coordinator may be clearing that copy (no manifest
    names it) by the time the spec arrives, and then staging is where it finds the bytes.

    Raises:
        TransportError, PublishRefused: the broker refused or could not be reached.
    """
    meta, chunks = split_artifact(data, name=name, chunk_size=chunk_size)
    for start in range(0, len(chunks), _PUBLISH_WINDOW):
        batch = range(start, min(start + _PUBLISH_WINDOW, len(chunks)))
        await asyncio.gather(
            *(
                session.publish(topics.staging_chunk(meta.sha256, i), chunks[i], retain=True)
                for i in batch
            )
        )
    await session.publish(topics.staging_meta(meta.sha256), encode(meta), retain=True)
    return meta


@dataclass(frozen=True)
class VariantFile:
    """One build of the model to roll out, and its golden self-test vectors."""

    label: str
    model: bytes
    golden: bytes | None = None


def describe_candidate(
    name: str,
    files: Sequence[VariantFile],
    profiles: Mapping[str, ClassProfile],
    classes: Sequence[str],
) -> Candidate:
    """The candidate entry of a spec, read from the models themselves, checked the way
    the coordinator will check it before anything is published (blocking).

    It names the variants that fit some of ``classes``; the others are left out, with a
    warning that says which and why (``coordinator.variants``).

    Raises:
        ValueError: a model does not load.
        PolicyError: PROFILE_MISMATCH when a golden set fails on its own model, a class
            is unknown, or no variant fits one of the classes.
    """
    unknown = [c for c in classes if c not in profiles]
    if unknown:
        raise PolicyError(Reason.PROFILE_MISMATCH, f"unknown classes {unknown}")
    built = []
    problems = []
    for file in files:
        facts = ModelFacts(file.model)
        variant = Variant(
            label=file.label,
            artifact=_ref(file.model),
            golden=None if file.golden is None else _ref(file.golden),
            inputs=facts.inputs,
            outputs=facts.outputs,
        )
        if file.golden is not None:
            problems += [
                f"variant {file.label}: {p}" for p in golden_problems(facts, variant, file.golden)
            ]
        built.append(Built(variant, facts))
    ranking = rank_variants(built, profiles, classes)
    problems += ranking.problems
    if problems:
        raise PolicyError(Reason.PROFILE_MISMATCH, "; ".join(problems))
    for line in ranking.ignored:
        log.warning("%s: left out: %s", name, line)
    return Candidate(name=name, variants=tuple(b.variant for b in ranking.used))


def _ref(data: bytes) -> ArtifactRef:
    return ArtifactRef(sha256=hashlib.sha256(data).hexdigest(), size=len(data))


async def upload_candidate(
    session: Transport, candidate: Candidate, files: Sequence[VariantFile]
) -> None:
    """Upload the model and golden vectors of every variant ``candidate`` names (see
    ``publish_artifact``); files of variants it left out are not sent.

    Raises:
        TransportError, PublishRefused: the broker refused or could not be reached.
    """
    named = {v.artifact.sha256 for v in candidate.variants}
    for file in files:
        if _ref(file.model).sha256 not in named:
            continue
        await publish_artifact(session, file.model, name=f"{candidate.name}.{file.label}")
        if file.golden is not None:
            await publish_artifact(
                session, file.golden, name=f"{candidate.name}.{file.label}.golden"
            )


async def check_new_rollout(session: Transport, rollout_id: str) -> None:
    """Make sure no rollout holds ``rollout_id`` yet (call it before uploading).

    Raises:
        RolloutExists: a spec or a status is retained under that id.
        TransportError: the broker could not be asked.
    """
    wanted = (topics.rollout_spec(rollout_id), topics.rollout_status(rollout_id))
    if await _retained(session, *wanted):
        raise RolloutExists(rollout_id)


async def submit_spec(session: Transport, spec: RolloutSpec, key: KeyPair) -> None:
    """Sign and publish a rollout spec (retained: it is desired state).

    Raises:
        RolloutExists: a first generation under an id a rollout already holds.
        TransportError, PublishRefused: the broker refused or could not be reached.
    """
    if spec.generation == 1:
        await check_new_rollout(session, spec.id)
    signed = seal(ROLLOUT_SPEC_KIND, encode(spec), [key])
    await session.publish(topics.rollout_spec(spec.id), signed, retain=True)


async def watch_status(session: Transport, rollout_id: str) -> AsyncGenerator[RolloutStatus, None]:
    """Every status of a rollout as the coordinator publishes it, the retained one first."""
    topic = topics.rollout_status(rollout_id)
    stream = _stream(session)
    await session.subscribe(topic)
    async for message in stream:
        if message.topic == topic and message.payload:
            yield decode(message.payload, RolloutStatus)


async def read_status(session: Transport, rollout_id: str) -> RolloutStatus | None:
    """The retained status of a rollout, or None when the coordinator has none."""
    topic = topics.rollout_status(rollout_id)
    payload = (await _retained(session, topic)).get(topic)
    return None if payload is None else decode(payload, RolloutStatus)


async def list_statuses(session: Transport) -> list[RolloutStatus]:
    """Every rollout's retained status, by id; one that does not decode is left out (and
    logged): only the coordinator can publish there, but a reader never trusts that."""
    stream = _stream(session)
    await session.subscribe(topics.all_rollout_statuses(), qos=0)
    await session.unsubscribe(topics.all_rollout_statuses())
    found: dict[str, RolloutStatus] = {}
    while (message := await _received(stream)) is not None:
        if not message.payload:
            continue
        try:
            parsed = topics.parse(message.topic)
            status = decode(message.payload, RolloutStatus)
        except RejectedError as exc:
            log.warning("skipped %s: %s", bound_text(message.topic), exc)
            continue
        if parsed.kind is TopicKind.ROLLOUT_STATUS and parsed.name == status.id:
            found[status.id] = status
    return [found[rollout_id] for rollout_id in sorted(found)]


@dataclass(frozen=True, kw_only=True)
class DeviceRow:
    """One device as the retained topics show it: what ``edgefleet fleet ls`` prints."""

    device_id: str
    hw_class: str | None = None
    release: str | None = None
    mode: str | None = None
    health: str | None = None
    """The verdict of its last health report on the release it runs, if any."""
    last_seen: float | None = None
    """When its state was last published (the agent's clock)."""
    online: bool = False
    sha256: str | None = None
    """The artifact it runs (``rollout plan``: a device that has it pulls nothing)."""
    degraded_reason: str | None = None
    """Why it is degraded (its model on a fallback provider, storage failing, ...)."""


_FLEET_CHANNELS: Final = (DeviceChannel.PRESENCE, DeviceChannel.STATE, DeviceChannel.HEALTH)


async def read_fleet(session: Transport) -> list[DeviceRow]:
    """Every device that has a retained presence, state or health, by id. A payload that
    does not decode is left out of its row (and logged)."""
    stream = _stream(session)
    filters = [topics.all_devices(channel) for channel in _FLEET_CHANNELS]
    await session.subscribe(*filters, qos=0)
    await session.unsubscribe(*filters)
    seen: dict[str, dict[DeviceChannel, bytes]] = {}
    while (message := await _received(stream)) is not None:
        try:
            parsed = topics.parse(message.topic)
        except RejectedError:
            continue
        if parsed.kind is TopicKind.DEVICE and parsed.name and parsed.channel in _FLEET_CHANNELS:
            seen.setdefault(parsed.name, {})[parsed.channel] = message.payload
    return [_row(device_id, seen[device_id]) for device_id in sorted(seen)]


def _row(device_id: str, payloads: Mapping[DeviceChannel, bytes]) -> DeviceRow:
    state: DeviceState | None = None
    health: HealthReport | None = None
    try:
        if payloads.get(DeviceChannel.STATE):
            state = decode(payloads[DeviceChannel.STATE], DeviceState)
        if payloads.get(DeviceChannel.HEALTH):
            health = decode(payloads[DeviceChannel.HEALTH], HealthReport)
    except RejectedError as exc:
        log.warning("%s: unreadable retained report: %s", device_id, exc)
    online = payloads.get(DeviceChannel.PRESENCE) == ONLINE
    if state is None:
        return DeviceRow(device_id=device_id, online=online)
    verdict = None
    if health is not None and health.release == state.active_release:
        verdict = health.verdict.value
    return DeviceRow(
        device_id=device_id,
        hw_class=state.hw_class,
        release=state.active_release,
        mode=state.mode.value,
        health=verdict,
        last_seen=state.updated_at,
        online=online,
        sha256=state.active_sha256,
        degraded_reason=state.degraded_reason,
    )


async def read_manifests(session: Transport, classes: Sequence[str]) -> dict[str, Manifest]:
    """The retained manifest of each of ``classes`` that has one, by class. Read to show
    what a class runs (``rollout plan``), not to act on: the signature is not checked
    here; a payload that does not decode, or names another class, is left out (and
    logged)."""
    wanted = {topics.class_manifest(name): name for name in classes}
    found: dict[str, Manifest] = {}
    for topic, payload in (await _retained(session, *wanted)).items():
        try:
            manifest = decode(decode(payload, Envelope).body, Manifest)
        except RejectedError as exc:
            log.warning("skipped %s: %s", topic, exc)
            continue
        if manifest.hw_class == wanted[topic]:
            found[manifest.hw_class] = manifest
    return found


async def read_spec(session: Transport, rollout_id: str) -> RolloutSpec | None:
    """The current retained spec (the operator's own, to make its next generation).

    The signature is not checked here: the coordinator checks it; this only reads
    what the operator published last.
    """
    topic = topics.rollout_spec(rollout_id)
    payload = (await _retained(session, topic)).get(topic)
    if payload is None:
        return None
    envelope = decode(payload, Envelope)
    return decode(envelope.body, RolloutSpec)


def next_generation(spec: RolloutSpec, desired: Desired) -> RolloutSpec:
    return spec.model_copy(
        update={"generation": spec.generation + 1, "desired": desired, "issued_at": time.time()}
    )
