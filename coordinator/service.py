"""The coordinator: turns signed rollout specs into per-class manifests, wave by wave.

Theory of operation. The coordinator's store is the source of truth (seq numbers,
stable releases, rollout records); retained topics are a cache it re-asserts on every
connect. It keeps a persistent MQTT session so health and telemetry published while
it is down wait for it. Each tick it asks :func:`coordinator.rollout.decide` what to
do with every live rollout given the fleet's counts, stores the new record *before*
publishing, and then derives each class's manifest from the store: a restart resumes
every rollout without skipping or repeating a wave.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.session import Endpoint, Message, Session, TransportError, Will
from coordinator.fleet import FleetView
from coordinator.profiles import ClassProfile
from coordinator.rollout import Action, RolloutRecord, apply, cutoff_bp, decide
from coordinator.store import ClassRecord, CoordinatorStore
from coordinator.validate import ModelFacts, problems_for_class
from schemas import (
    MANIFEST_KIND,
    OFFLINE,
    ONLINE,
    ArtifactMeta,
    DeviceState,
    HealthReport,
    KeyPair,
    Manifest,
    Phase,
    RejectedError,
    Release,
    RolloutCohort,
    RolloutSpec,
    RolloutStatus,
    TelemetrySummary,
    TrustedState,
    WaveCounts,
    decode,
    encode,
    seal,
    topics,
)
from schemas.artifact import check_chunk, check_whole
from schemas.topics import DeviceChannel, TopicKind

__all__ = ["Coordinator", "CoordinatorConfig"]

log = logging.getLogger(__name__)

CLIENT_ID = "coordinator"

_R = TypeVar("_R")


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
    settle_s: float = 2.0
    """After connecting, how long before the fleet view counts as complete."""
    artifact_timeout_s: float = 60.0
    session_expiry_s: int = 7 * 24 * 3600


@dataclass
class _Fetch:
    queue: asyncio.Queue[Message] = field(default_factory=asyncio.Queue)


class Coordinator:
    def __init__(self, config: CoordinatorConfig, *, clock: Callable[[], float] = time.time):
        self._config = config
        self._clock = clock
        self._trusted = TrustedState(config.root_keys)
        self._store = CoordinatorStore(config.data_dir / "coordinator.json")
        self._classes: dict[str, ClassRecord] = {}
        self._rollouts: dict[str, RolloutRecord] = {}
        self._fleet = FleetView()
        self._session: Session | None = None
        self._fetches: dict[str, _Fetch] = {}
        self._validating: set[str] = set()
        self._changed = asyncio.Event()
        self._linked_at: float | None = None
        self._sync_lock = asyncio.Lock()
        """One manifest sync at a time: each takes its seq from what the last one stored."""
        self._store_lock = asyncio.Lock()
        """The store rewrites its whole file on every write: one writing thread at a time."""

    @property
    def fleet(self) -> FleetView:
        return self._fleet

    @property
    def rollouts(self) -> dict[str, RolloutRecord]:
        return dict(self._rollouts)

    async def run(self) -> None:
        """Coordinate until cancelled.

        Raises:
            RejectedError: the configured TrustDoc does not verify against the root keys.
            TransportError: the broker refused the coordinator's credentials.
        """
        self._trusted.update_trust(self._config.trust, now=self._clock())
        self._classes = await asyncio.to_thread(self._store.classes)
        self._rollouts = await asyncio.to_thread(self._store.rollouts)
        will = Will(topic=topics.coordinator_presence(), payload=OFFLINE, retain=True)
        try:
            async with (
                Session(
                    self._config.endpoint,
                    client_id=CLIENT_ID,
                    clean_start=False,
                    session_expiry=self._config.session_expiry_s,
                    will=will,
                ) as session,
                asyncio.TaskGroup() as tg,
            ):
                self._session = session
                await session.subscribe(
                    topics.all_rollout_specs(),
                    *(topics.all_devices(c) for c in DeviceChannel),
                )
                self._linked_at = time.monotonic()
                tg.create_task(self._reassert_on_connect(session))
                tg.create_task(self._dispatch(session, tg))
                tg.create_task(self._tick_loop())
        finally:
            self._session = None
            await asyncio.to_thread(self._store.close)

    # -- publishing ----------------------------------------------------------------

    async def _publish(self, topic: str, payload: bytes, *, retain: bool = True) -> None:
        session = self._session
        if session is None:
            return
        try:
            await session.publish(topic, payload, retain=retain)
        except TransportError as exc:
            log.warning("coordinator: %s not published (re-asserted on reconnect): %s", topic, exc)

    async def _reassert_on_connect(self, session: Session) -> None:
        async for _ in session.connections():
            await self._publish(topics.coordinator_presence(), ONLINE)
            await self._publish(topics.trust(), self._config.trust)
            for record in self._classes.values():
                if record.manifest is not None:
                    await self._publish(topics.class_manifest(record.name), record.manifest)
            for rollout in self._rollouts.values():
                await self._publish_status(rollout)
            await self._sync_manifests()

    async def _publish_status(self, record: RolloutRecord) -> None:
        status = RolloutStatus(
            id=record.id,
            generation=record.generation,
            phase=record.phase,
            wave=record.wave,
            waves_percent=record.waves_percent,
            counts=record.counts,
            classes=record.classes,
            release=record.release_id if record.candidates else None,
            reason=record.reason,
            updated_at=record.updated_at,
        )
        await self._publish(topics.rollout_status(record.id), encode(status))

    def _desired_content(self, name: str) -> tuple[Release | None, RolloutCohort | None]:
        stable = self._classes.get(name, ClassRecord(name=name)).stable
        for record in self._rollouts.values():
            if record.phase in (Phase.WAVE, Phase.PAUSED) and name in record.classes:
                cohort = RolloutCohort(
                    id=record.id,
                    candidate=record.candidates[name],
                    salt=record.id,
                    cutoff_bp=cutoff_bp(record),
                    canaries=record.canaries,
                )
                return stable, cohort
        return stable, None

    async def _sync_manifests(self) -> None:
        """Publish a new manifest for every class whose content changed or whose
        manifest nears expiry; the seq is stored before the manifest is published.

        Callers (ticks, new specs, re-asserts on connect) run concurrently: unserialised,
        two of them would both take ``seq + 1`` and publish different manifests under it.
        """
        async with self._sync_lock:
            await self._sync_manifests_locked()

    async def _sync_manifests_locked(self) -> None:
        now = self._clock()
        for name, profile in self._config.profiles.items():
            stable, cohort = self._desired_content(name)
            if stable is None and cohort is None:
                continue
            content = Manifest(
                hw_class=name, seq=1, issued_at=0, expires_at=0, stable=stable, rollout=cohort
            ).model_dump_json(include={"stable", "rollout"})
            current = self._classes.get(name, ClassRecord(name=name))
            fresh = now < current.expires_at - profile.manifest_ttl_s / 2
            if content == current.content and fresh:
                continue
            manifest = Manifest(
                hw_class=name,
                seq=current.seq + 1,
                issued_at=now,
                expires_at=now + profile.manifest_ttl_s,
                stable=stable,
                rollout=cohort,
            )
            signed = seal(MANIFEST_KIND, encode(manifest), [self._config.manifest_key])
            record = current.model_copy(
                update={
                    "seq": manifest.seq,
                    "manifest": signed,
                    "expires_at": manifest.expires_at,
                    "content": content,
                }
            )
            await self._write(self._store.put_class, record)
            self._classes[name] = record
            log.info("coordinator: %s manifest seq %d", name, manifest.seq)
            await self._publish(topics.class_manifest(name), signed)

    # -- incoming ------------------------------------------------------------------

    async def _dispatch(self, session: Session, tg: asyncio.TaskGroup) -> None:
        async for message in session.messages():
            try:
                self._handle(message, tg)
            except RejectedError as exc:
                log.warning("coordinator: dropped %s: %s", message.topic, exc)

    def _handle(self, message: Message, tg: asyncio.TaskGroup) -> None:
        parsed = topics.parse(message.topic)
        if parsed.kind is TopicKind.ROLLOUT_SPEC and parsed.name is not None:
            if message.payload:
                tg.create_task(self._on_spec(parsed.name, message.payload))
        elif parsed.kind in (TopicKind.ARTIFACT_META, TopicKind.ARTIFACT_CHUNK):
            fetch = self._fetches.get(parsed.name or "")
            if fetch is not None:
                fetch.queue.put_nowait(message)
        elif parsed.kind is TopicKind.DEVICE and parsed.name is not None:
            self._on_device(parsed.name, parsed.channel, message.payload)

    def _on_device(self, device_id: str, channel: DeviceChannel | None, payload: bytes) -> None:
        if channel is DeviceChannel.PRESENCE:
            self._fleet.on_presence(device_id, payload == ONLINE)
        elif channel is DeviceChannel.STATE and payload:
            state = decode(payload, DeviceState)
            if state.device_id == device_id:
                self._fleet.on_state(state)
        elif channel is DeviceChannel.HEALTH and payload:
            report = decode(payload, HealthReport)
            if report.device_id == device_id and self._fleet.on_health(report):
                self._changed.set()
        elif channel is DeviceChannel.TELEMETRY:
            summary = decode(payload, TelemetrySummary)
            if summary.device_id == device_id:
                self._fleet.on_telemetry(summary)

    async def _on_spec(self, rollout_id: str, payload: bytes) -> None:
        now = self._clock()
        try:
            spec = self._trusted.verify_rollout_spec(payload, now=now)
        except RejectedError as exc:
            log.warning("coordinator: rollout spec %s rejected: %s", rollout_id, exc)
            await self._audit("spec_rejected", rollout_id, str(exc))
            return
        if spec.id != rollout_id:
            await self._audit("spec_rejected", rollout_id, f"spec names rollout {spec.id}")
            return
        current = self._rollouts.get(rollout_id)
        if current is not None:
            if spec.generation <= current.generation or current.phase.final:
                return
            record = current.model_copy(
                update={"generation": spec.generation, "desired": spec.desired, "spec": payload}
            )
            await self._save(record, "spec_generation", f"desired {spec.desired.value}")
            self._changed.set()
            return
        if rollout_id in self._validating:
            return
        self._validating.add(rollout_id)
        try:
            record = await self._admit(spec, payload, now)
        finally:
            self._validating.discard(rollout_id)
        await self._save(
            record, "admitted" if record.phase is Phase.WAVE else "rejected", record.reason or ""
        )
        await self._sync_manifests()
        await self._publish_status(record)

    async def _admit(self, spec: RolloutSpec, payload: bytes, now: float) -> RolloutRecord:
        """Validate a new rollout against the class profiles; REJECTED with reasons
        when it cannot go, before any device sees it."""
        problems: list[str] = []
        unknown = [c for c in spec.classes if c not in self._config.profiles]
        if unknown:
            problems.append(f"unknown classes {unknown}")
        busy = [
            r.id
            for r in self._rollouts.values()
            if not r.phase.final and set(r.classes) & set(spec.classes)
        ]
        if busy:
            problems.append(f"classes already in rollout {busy}")
        if not problems:
            try:
                data = await self._fetch_artifact(spec)
                facts = await asyncio.to_thread(ModelFacts, data)
            except (RejectedError, TimeoutError, ValueError) as exc:
                problems.append(f"artifact: {exc or 'not found in time'}")
            else:
                for name in spec.classes:
                    problems += problems_for_class(
                        facts, spec.candidate, self._config.profiles[name]
                    )
        candidates = {}
        if not problems:
            for name in spec.classes:
                profile = self._config.profiles[name]
                candidates[name] = Release(
                    name=spec.candidate.name,
                    artifact=spec.candidate.artifact,
                    runtime=profile.runtime,
                    inputs=spec.candidate.inputs,
                    outputs=spec.candidate.outputs,
                    health=profile.health,
                )
        return RolloutRecord(
            id=spec.id,
            generation=spec.generation,
            spec=payload,
            classes=spec.classes,
            candidates=candidates,
            waves_percent=spec.waves_percent,
            canaries=spec.canaries,
            success_ratio=spec.success_ratio,
            max_failure_ratio=spec.max_failure_ratio,
            wave_timeout_s=spec.wave_timeout_s,
            desired=spec.desired,
            phase=Phase.REJECTED if problems else Phase.WAVE,
            wave=0,
            wave_started_at=now,
            reason="; ".join(problems) if problems else None,
            updated_at=now,
        )

    async def _fetch_artifact(self, spec: RolloutSpec) -> bytes:
        """Fetch the candidate from the retained artifact topics and check it.

        Raises:
            RejectedError: a corrupt chunk or a whole that does not match the spec.
            TimeoutError: the artifact is not (completely) there.
        """
        ref = spec.candidate.artifact
        session = self._session
        if session is None:
            raise TimeoutError
        fetch = _Fetch()
        self._fetches[ref.sha256] = fetch
        try:
            await session.subscribe(topics.artifact_chunks(ref.sha256))
            async with asyncio.timeout(self._config.artifact_timeout_s):
                meta: ArtifactMeta | None = None
                chunks: dict[int, bytes] = {}
                while meta is None or len(chunks) < len(meta.chunks):
                    message = await fetch.queue.get()
                    parsed = topics.parse(message.topic)
                    if parsed.kind is TopicKind.ARTIFACT_META:
                        meta = decode(message.payload, ArtifactMeta)
                    elif parsed.index is not None:
                        chunks[parsed.index] = message.payload
                    if meta is not None and len(chunks) > len(meta.chunks):
                        break
            for index, chunk in chunks.items():
                check_chunk(meta, index, chunk)
            data = b"".join(chunks[i] for i in range(len(meta.chunks)))
            check_whole(meta, data)
            if meta.sha256 != ref.sha256 or meta.size != ref.size:
                msg = "artifact differs from the spec's reference"
                raise ValueError(msg)
            return data
        finally:
            del self._fetches[ref.sha256]
            with contextlib.suppress(TransportError):
                await session.unsubscribe(topics.artifact_chunks(ref.sha256))

    # -- the rollout loop ----------------------------------------------------------

    async def _tick_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._config.tick_s):
                    await self._changed.wait()
            self._changed.clear()
            await self._tick()

    def _fleet_known(self) -> bool:
        """Retained device topics arrive right after subscribing; until they had time
        to, an empty wave may only look empty."""
        linked = self._linked_at
        return linked is not None and time.monotonic() - linked >= self._config.settle_s

    async def _tick(self) -> None:
        now = self._clock()
        for record in list(self._rollouts.values()):
            if record.phase.final:
                continue
            counts = self._fleet.counts(record)
            action, reason = decide(
                record, counts, record.desired, now, fleet_known=self._fleet_known()
            )
            if action is Action.ROLL_BACK and counts.unhealthy:
                reason = f"{reason} ({'; '.join(self._fleet.unhealthy_reasons(record))})"
            if action is Action.WAIT:
                if counts != record.counts:
                    observed = record.model_copy(update={"counts": counts, "updated_at": now})
                    self._rollouts[record.id] = observed
                    await self._publish_status(observed)
                continue
            await self._transition(record, action, reason, counts, now)
        await self._sync_manifests()

    async def _transition(
        self,
        record: RolloutRecord,
        action: Action,
        reason: str | None,
        counts: WaveCounts,
        now: float,
    ) -> None:
        updated = apply(record, action, reason, counts, now)
        if action is Action.COMPLETE:
            # Under the sync lock: a sync in flight would otherwise store its newer seq
            # between our read of the class record and our write of it, and lose it.
            async with self._sync_lock:
                for name, release in updated.candidates.items():
                    current = self._classes.get(name, ClassRecord(name=name))
                    promoted = current.model_copy(update={"stable": release})
                    await self._write(self._store.put_class, promoted)
                    self._classes[name] = promoted
        await self._save(updated, action.value, reason or "")
        log.info("coordinator: rollout %s %s: %s", record.id, action.value, reason)
        await self._sync_manifests()
        await self._publish_status(updated)

    async def _save(self, record: RolloutRecord, what: str, detail: str) -> None:
        await self._write(self._store.put_rollout, record)
        self._rollouts[record.id] = record
        await self._audit(what, record.id, detail)

    async def _audit(self, what: str, rollout_id: str, detail: str) -> None:
        entry = {"at": self._clock(), "event": what, "rollout": rollout_id, "detail": detail}
        await self._write(self._store.audit, entry)

    async def _write(self, fn: Callable[[_R], None], record: _R) -> None:
        async with self._store_lock:
            await asyncio.to_thread(fn, record)
