"""The operator's side: publish a model artifact and a signed rollout spec, read
rollout status. Used by the ``edgefleet rollout`` commands."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator

from broker.session import Session
from coordinator.validate import ModelFacts
from schemas import (
    ROLLOUT_SPEC_KIND,
    ArtifactMeta,
    ArtifactRef,
    Candidate,
    Desired,
    KeyPair,
    RolloutSpec,
    RolloutStatus,
    decode,
    encode,
    seal,
    split_artifact,
    topics,
)
from schemas.artifact import DEFAULT_CHUNK_BYTES
from schemas.envelope import Envelope

__all__ = [
    "describe_candidate",
    "next_generation",
    "publish_artifact",
    "read_spec",
    "read_status",
    "submit_spec",
    "watch_status",
]

_PUBLISH_WINDOW = 32


async def publish_artifact(
    session: Session, data: bytes, *, name: str, chunk_size: int = DEFAULT_CHUNK_BYTES
) -> ArtifactMeta:
    """Publish chunks (retained) and then the meta, so a meta implies its chunks.

    Raises:
        TransportError, PublishRefused: the broker refused or could not be reached.
    """
    meta, chunks = split_artifact(data, name=name, chunk_size=chunk_size)
    for start in range(0, len(chunks), _PUBLISH_WINDOW):
        batch = range(start, min(start + _PUBLISH_WINDOW, len(chunks)))
        await asyncio.gather(
            *(
                session.publish(topics.artifact_chunk(meta.sha256, i), chunks[i], retain=True)
                for i in batch
            )
        )
    await session.publish(topics.artifact_meta(meta.sha256), encode(meta), retain=True)
    return meta


def describe_candidate(data: bytes, *, name: str) -> Candidate:
    """The candidate entry of a spec, read from the model itself (blocking).

    Raises:
        ValueError: the model does not load.
    """
    facts = ModelFacts(data)
    meta, _ = split_artifact(data, name=name)
    return Candidate(
        name=name,
        artifact=ArtifactRef(sha256=meta.sha256, size=meta.size),
        inputs=facts.inputs,
        outputs=facts.outputs,
    )


async def submit_spec(session: Session, spec: RolloutSpec, key: KeyPair) -> None:
    """Sign and publish a rollout spec (retained: it is desired state)."""
    signed = seal(ROLLOUT_SPEC_KIND, encode(spec), [key])
    await session.publish(topics.rollout_spec(spec.id), signed, retain=True)


async def watch_status(session: Session, rollout_id: str) -> AsyncGenerator[RolloutStatus, None]:
    """Every status of a rollout as the coordinator publishes it, the retained one first.

    Takes the session's one message stream: use a session of its own.
    """
    topic = topics.rollout_status(rollout_id)
    await session.subscribe(topic)
    async for message in session.messages():
        if message.topic == topic and message.payload:
            yield decode(message.payload, RolloutStatus)


async def _first_retained(session: Session, topic: str, timeout: float) -> bytes | None:
    await session.subscribe(topic)
    try:
        async with asyncio.timeout(timeout):
            async for message in session.messages():
                if message.topic == topic:
                    return message.payload or None
    except TimeoutError:
        return None
    return None


async def read_status(
    session: Session, rollout_id: str, *, timeout: float = 3.0
) -> RolloutStatus | None:
    """The retained status of a rollout, or None when the coordinator has none.

    Takes the session's one message stream: use a session of its own.
    """
    payload = await _first_retained(session, topics.rollout_status(rollout_id), timeout)
    return None if payload is None else decode(payload, RolloutStatus)


async def read_spec(
    session: Session, rollout_id: str, *, timeout: float = 3.0
) -> RolloutSpec | None:
    """The current retained spec (the operator's own, to make its next generation).

    The signature is not checked here: the coordinator checks it; this only reads
    what the operator published last. Takes the session's one message stream.
    """
    payload = await _first_retained(session, topics.rollout_spec(rollout_id), timeout)
    if payload is None:
        return None
    envelope = decode(payload, Envelope)
    return decode(envelope.body, RolloutSpec)


def next_generation(spec: RolloutSpec, desired: Desired) -> RolloutSpec:
    return spec.model_copy(
        update={"generation": spec.generation + 1, "desired": desired, "issued_at": time.time()}
    )
