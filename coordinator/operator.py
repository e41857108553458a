"""The operator's side: publish a model artifact and a signed rollout spec, read
rollout status. Used by the ``edgefleet rollout`` commands."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass

from broker.session import Session
from coordinator.profiles import ClassProfile
from coordinator.validate import ModelFacts, golden_problems
from coordinator.variants import Built, rank_variants
from schemas import (
    ROLLOUT_SPEC_KIND,
    ArtifactMeta,
    ArtifactRef,
    Candidate,
    Desired,
    KeyPair,
    PolicyError,
    Reason,
    RolloutSpec,
    RolloutStatus,
    Variant,
    decode,
    encode,
    seal,
    split_artifact,
    topics,
)
from schemas.artifact import DEFAULT_CHUNK_BYTES
from schemas.envelope import Envelope

__all__ = [
    "VariantFile",
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

    Raises:
        ValueError: a model does not load.
        PolicyError: PROFILE_MISMATCH when a golden set fails on its own model, a class
            is unknown, a variant fits none of the classes or a class none of the variants.
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
    problems += rank_variants(built, profiles, classes).problems
    if problems:
        raise PolicyError(Reason.PROFILE_MISMATCH, "; ".join(problems))
    return Candidate(name=name, variants=tuple(b.variant for b in built))


def _ref(data: bytes) -> ArtifactRef:
    return ArtifactRef(sha256=hashlib.sha256(data).hexdigest(), size=len(data))


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
