"""The coordinator: turns signed rollout specs into per-class manifests, wave by wave.

Theory of operation. The coordinator's store is the source of truth (seq numbers,
stable releases, rollout records, the artifacts manifests name); retained topics are a
cache it re-asserts on every connect: trust, manifests, rollout specs and statuses, and
the artifacts of every release a manifest names. It keeps a persistent MQTT session so
health and telemetry published while it is down wait for it, and retries a broker that
is unreachable at start. Each tick it asks :func:`coordinator.rollout.decide` what to do
with every live rollout given the fleet's counts, stores the new record *before*
publishing, and then derives each class's manifest from the store: a restart resumes
every rollout without skipping or repeating a wave.

Concurrency. Specs are handled in tasks of their own while ticks run. Every
read-modify-write of a rollout record happens under one lock and re-reads the record
inside it. A spec being validated reserves its classes and its id: a newer generation
arriving meanwhile is held and applied once the first is admitted. Specs sharing an
artifact share one fetch.

Time. Wave timeouts count only time the coordinator watched the fleet: it stores a
heartbeat while connected, and on every connection shifts live waves by the gap since.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.session import ConnectRefused, Endpoint, Message, Session, TransportError, Will
from coordinator.admission import Selection, select_releases
from coordinator.artifacts import ArtifactStore
from coordinator.fleet import FleetView
from coordinator.profiles import ClassProfile, rollout_policy
from coordinator.rollout import Action, RolloutRecord, apply, cutoff_bp, decide
from coordinator.store import ClassRecord, CoordinatorStore
from schemas import (
    MANIFEST_KIND,
    OFFLINE,
    ONLINE,
    ArtifactError,
    ArtifactRef,
    Desired,
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
from schemas.artifact import MAX_CHUNK_BYTES, ChunkCollector
from schemas.codec import MAX_MESSAGE_BYTES
from schemas.errors import Reason
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
    reconnect_s: float = 0.5
    """First wait before retrying a broker unreachable at start; doubles up to 10 s."""
    heartbeat_s: float = 2.0
    """How often, at most, the store learns that the coordinator still watches."""
    probe_s: float = 2.0
    """On connect, how long to wait for the broker's retained artifact metas."""
    datasets_dir: Path | None = None
    """Held-out data sets (``<name>.npz``) the classes' accuracy gates name."""


_RECONNECT_MAX_S = 10.0
_PUBLISH_WINDOW = 32


@dataclass
class _Feed:
    """Artifact messages routed to one fetch, bounded in bytes."""

    limit: int
    queue: asyncio.Queue[Message | None] = field(default_factory=asyncio.Queue)
    held: int = 0
    overflow: bool = False

    def offer(self, message: Message) -> None:
        if self.overflow:
            return
        if self.held + len(message.payload) > self.limit:
            self.overflow = True
            self.queue.put_nowait(None)
            return
        self.held += len(message.payload)
        self.queue.put_nowait(message)

    async def get(self) -> Message:
        message = await self.queue.get()
        if message is None:
            raise ArtifactError(Reason.OVERSIZED, "more artifact messages than the artifact")
        self.held -= len(message.payload)
        return message


@dataclass(frozen=True)
class _Claim:
    """A spec being validated: its classes and artifact are spoken for."""

    classes: frozenset[str]
    shas: frozenset[str]


class Coordinator:
    def __init__(self, config: CoordinatorConfig, *, clock: Callable[[], float] = time.time):
        self._config = config
        self._clock = clock
        self._trusted = TrustedState(config.root_keys)
        self._store = CoordinatorStore(config.data_dir / "coordinator.json")
        self._artifacts = ArtifactStore(config.data_dir / "artifacts")
        self._classes: dict[str, ClassRecord] = {}
        self._rollouts: dict[str, RolloutRecord] = {}
        self._fleet = FleetView()
        self._session: Session | None = None
        self._fetches: dict[str, asyncio.Task[bytes]] = {}
        """One fetch per artifact, shared by every spec that names it."""
        self._feeds: dict[str, _Feed] = {}
        self._claims: dict[str, _Claim] = {}
        """Rollout id -> what a spec being validated reserves."""
        self._held: dict[str, tuple[RolloutSpec, bytes]] = {}
        """The newest generation of a spec that arrived while its first was validated."""
        self._deferred: dict[str, bytes] = {}
        """Specs whose validation met a broken connection: retried on the next one."""
        self._changed = asyncio.Event()
        self._linked_at: float | None = None
        self._beat_at = 0.0
        self._rollout_lock = asyncio.Lock()
        """Every read-modify-write of a rollout record, the record re-read inside it."""
        self._sync_lock = asyncio.Lock()
        """One manifest sync at a time: each takes its seq from what the last one stored."""
        self._store_lock = asyncio.Lock()
        """The store rewrites its whole file on every write: one writing thread at a time."""
        self._artifact_lock = asyncio.Lock()
        self._meta_probe: dict[str, bytes] | None = None
        self._linked_gen = 0
        self._republishing: asyncio.Task[None] | None = None
        self._probe_changed = asyncio.Event()
        """Keeping a fetched artifact and pruning unreferenced ones never interleave."""

    @property
    def fleet(self) -> FleetView:
        return self._fleet

    @property
    def rollouts(self) -> dict[str, RolloutRecord]:
        return dict(self._rollouts)

    async def run(self) -> None:
        """Coordinate until cancelled; a broker unreachable at start is retried.

        Raises:
            RejectedError: the configured TrustDoc does not verify against the root keys.
            ConnectRefused: the broker refused the coordinator's credentials.
        """
        self._trusted.update_trust(self._config.trust, now=self._clock())
        self._classes = await asyncio.to_thread(self._store.classes)
        self._rollouts = await asyncio.to_thread(self._store.rollouts)
        will = Will(topic=topics.coordinator_presence(), payload=OFFLINE, retain=True)
        delay = self._config.reconnect_s
        try:
            while True:
                try:
                    async with Session(
                        self._config.endpoint,
                        client_id=CLIENT_ID,
                        clean_start=False,
                        session_expiry=self._config.session_expiry_s,
                        will=will,
                    ) as session:
                        delay = self._config.reconnect_s
                        await self._linked(session)
                except ConnectRefused:
                    raise
                except TransportError as exc:
                    log.warning("coordinator: broker unreachable (%s); retry in %g s", exc, delay)
                finally:
                    self._session = None
                    self._linked_at = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RECONNECT_MAX_S)
        finally:
            for task in list(self._fetches.values()):
                task.cancel()
            await asyncio.to_thread(self._store.close)

    async def _linked(self, session: Session) -> None:
        """Raises: TransportError when the first subscription fails."""
        await session.subscribe(
            topics.all_rollout_specs(),
            *(topics.all_devices(c) for c in DeviceChannel),
        )
        self._session = session
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._reassert_on_connect(session, tg))
            tg.create_task(self._dispatch(session, tg))
            tg.create_task(self._tick_loop(tg))

    # -- publishing ----------------------------------------------------------------

    async def _publish(self, topic: str, payload: bytes, *, retain: bool = True) -> None:
        session = self._session
        if session is None:
            return
        try:
            await session.publish(topic, payload, retain=retain)
        except TransportError as exc:
            log.warning("coordinator: %s not published (re-asserted on reconnect): %s", topic, exc)

    async def _reassert_on_connect(self, session: Session, tg: asyncio.TaskGroup) -> None:
        async for generation in session.connections():
            self._linked_gen = generation
            self._linked_at = time.monotonic()
            await self._resume_clock()
            await self._publish(topics.coordinator_presence(), ONLINE)
            await self._publish(topics.trust(), self._config.trust)
            # Snapshots: specs and ticks change these dicts while we await publishes.
            for name in list(self._classes):
                await self._publish_manifest(name)
            for rollout in list(self._rollouts.values()):
                await self._publish(topics.rollout_spec(rollout.id), rollout.spec)
                await self._publish_status(rollout.id)
            await self._sync_manifests()
            # Artifacts can be large: sent beside this loop, which must be back at
            # connections() for the next reconnect; a newer re-assert replaces an older.
            if self._republishing is not None:
                self._republishing.cancel()
            self._republishing = tg.create_task(self._republish_artifacts())
            self._retry_deferred(tg)

    async def _resume_clock(self) -> None:
        """Shift live waves by the time nobody watched the fleet (coordinator down or
        disconnected), so that time does not count against their timeouts."""
        last = await asyncio.to_thread(self._store.heartbeat)
        now = self._clock()
        await self._beat(now)
        if last is None or now <= last:
            return
        gap = now - last
        async with self._rollout_lock:
            shifted = []
            for record in list(self._rollouts.values()):
                if record.phase is not Phase.WAVE:
                    continue
                later = record.model_copy(update={"wave_started_at": record.wave_started_at + gap})
                await self._write(self._store.put_rollout, later)
                self._rollouts[record.id] = later
                shifted.append(record.id)
        if shifted:
            # One entry for all of them, under no rollout: the rollouts' own audit trails
            # keep to their decisions.
            await self._audit("clock_resumed", "", f"{gap:.1f} s unobserved; shifted {shifted}")

    async def _beat(self, now: float) -> None:
        self._beat_at = now
        await self._write(self._store.put_heartbeat, now)

    async def _publish_status(self, rollout_id: str) -> None:
        """Publish the record as it is now: read and handed to the session in one step,
        so statuses leave in the order of the records they show."""
        record = self._rollouts.get(rollout_id)
        if record is None:
            return
        status = RolloutStatus(
            id=record.id,
            generation=record.generation,
            phase=record.phase,
            wave=record.wave,
            waves_percent=record.waves_percent,
            counts=record.counts,
            classes=record.classes,
            release=record.release_id if record.candidates else None,
            releases={name: r.release_id for name, r in record.candidates.items()},
            reason=record.reason,
            updated_at=record.updated_at,
        )
        await self._publish(topics.rollout_status(record.id), encode(status))

    def _referenced(self) -> set[str]:
        """Artifacts a manifest names or will name: stables, live candidates, and the
        candidates being validated."""
        releases = [c.stable for c in self._classes.values() if c.stable is not None]
        for record in self._rollouts.values():
            if record.phase in (Phase.WAVE, Phase.PAUSED):
                releases += record.candidates.values()
        shas = {r.artifact.sha256 for r in releases}
        shas |= {r.golden.sha256 for r in releases if r.golden is not None}
        for claim in self._claims.values():
            shas |= claim.shas
        return shas | set(self._fetches)

    async def _retained_metas(self, wanted: set[str]) -> dict[str, bytes]:
        """The artifact metas the broker retains, of those ``wanted`` (waits up to
        ``probe_s`` for the ones that do not come)."""
        session = self._session
        if session is None or not wanted:
            return {}
        probe: dict[str, bytes] = {}
        self._meta_probe = probe
        try:
            await session.subscribe(topics.all_artifact_metas())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._config.probe_s):
                    while not wanted <= probe.keys():
                        self._probe_changed.clear()
                        await self._probe_changed.wait()
            await session.unsubscribe(topics.all_artifact_metas())
        except TransportError as exc:
            log.info("coordinator: artifact probe failed, re-asserting all: %s", exc)
        finally:
            self._meta_probe = None
        return probe

    async def _republish_artifacts(self) -> None:
        """Chunks, then the operator's own meta bytes (a meta implies its chunks), for
        every artifact a manifest names that the broker lost: its retained meta is how
        that is told, since a meta is published after its chunks and saved with them.
        Artifacts still there are not sent again (they can be hundreds of megabytes)."""
        referenced = self._referenced()
        retained = await self._retained_metas(referenced)
        for sha256 in sorted(referenced):
            stored = await asyncio.to_thread(self._artifacts.get, sha256)
            if stored is None:
                if sha256 not in self._fetches:
                    log.warning("coordinator: no copy of artifact %s to re-assert", sha256[:12])
                continue
            if retained.get(sha256) == stored.meta_payload:
                continue
            log.info("coordinator: re-asserting artifact %s", sha256[:12])
            chunks = stored.chunks()
            for start in range(0, len(chunks), _PUBLISH_WINDOW):
                batch = range(start, min(start + _PUBLISH_WINDOW, len(chunks)))
                await asyncio.gather(
                    *(self._publish(topics.artifact_chunk(sha256, i), chunks[i]) for i in batch)
                )
            await self._publish(topics.artifact_meta(sha256), stored.meta_payload)
        await self._prune_artifacts()

    async def _prune_artifacts(self) -> None:
        async with self._artifact_lock:
            keep = self._referenced()
            gone = await asyncio.to_thread(self._artifacts.prune, keep)
        for sha256 in gone:
            log.info("coordinator: artifact %s no longer named by a manifest", sha256[:12])

    def _desired_content(self, name: str) -> tuple[Release | None, RolloutCohort | None]:
        stable = self._classes.get(name, ClassRecord(name=name)).stable
        for record in list(self._rollouts.values()):
            if (
                record.phase in (Phase.WAVE, Phase.PAUSED)
                and record.started
                and name in record.classes
            ):
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
            changed = await self._sync_manifests_locked()
        # Published outside the lock: a PUBACK can take its full timeout while the link
        # is down, and an operator's abort must not wait on that.
        for name in changed:
            await self._publish_manifest(name)

    async def _publish_manifest(self, name: str) -> None:
        """Publish the newest manifest of ``name``: read and handed to paho in one step
        (nothing awaits in between), so no caller can queue an older seq after a newer."""
        record = self._classes.get(name)
        if record is not None and record.manifest is not None:
            await self._publish(topics.class_manifest(name), record.manifest)

    async def _sync_manifests_locked(self) -> list[str]:
        """Store a new manifest for every class that needs one; their names."""
        changed: list[str] = []
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
            changed.append(name)
        return changed

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
            if (
                self._meta_probe is not None
                and parsed.kind is TopicKind.ARTIFACT_META
                and parsed.name is not None
            ):
                self._meta_probe[parsed.name] = message.payload
                self._probe_changed.set()
            feed = self._feeds.get(parsed.name or "")
            if feed is not None:
                feed.offer(message)
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
        async with self._rollout_lock:
            current = self._rollouts.get(rollout_id)
            if current is not None:
                stale = await self._new_generation(current, spec, payload)
            elif rollout_id in self._claims:
                held = self._held.get(rollout_id)
                if held is None or spec.generation > held[0].generation:
                    self._held[rollout_id] = (spec, payload)
                return
            elif spec.desired is Desired.ABORTED:
                # Aborted before it was ever admitted: recorded, never validated, no
                # manifest names it.
                await self._save(
                    self._record(
                        spec,
                        payload,
                        now,
                        Phase.ROLLED_BACK,
                        candidates={},
                        problems="aborted by operator",
                    ),
                    "aborted",
                    "before admission",
                )
                stale = None
            else:
                problems = self._claim(spec)
                if problems:
                    record = self._record(
                        spec, payload, now, Phase.REJECTED, candidates={}, problems=problems
                    )
                    await self._save(record, "rejected", record.reason or "")
                stale = None
        if current is None and rollout_id not in self._rollouts:
            await self._admit(spec, payload, now)
        elif stale is not None:
            # The broker's cache held an older generation than we acted on: correct it.
            await self._publish(topics.rollout_spec(rollout_id), stale)
        else:
            self._changed.set()
        await self._publish_status(rollout_id)

    async def _new_generation(
        self, current: RolloutRecord, spec: RolloutSpec, payload: bytes
    ) -> bytes | None:
        """Take a newer generation of a known rollout (under the rollout lock); returns
        the newer spec bytes to re-assert when ``spec`` is older than the record's."""
        if spec.generation < current.generation:
            return current.spec
        if spec.generation == current.generation:
            return None
        record = current.model_copy(
            update={"generation": spec.generation, "desired": spec.desired, "spec": payload}
        )
        detail = f"desired {spec.desired.value}"
        if current.phase.final:
            detail += f" (rollout already {current.phase.value})"
        await self._save(record, "spec_generation", detail)
        return None

    def _claim(self, spec: RolloutSpec) -> list[str]:
        """Why the spec cannot be validated at all; else reserve its classes (under the
        rollout lock), so a concurrent spec for the same class finds them busy."""
        problems: list[str] = []
        unknown = [c for c in spec.classes if c not in self._config.profiles]
        if unknown:
            problems.append(f"unknown classes {unknown}")
        busy = sorted(
            {
                r.id
                for r in self._rollouts.values()
                if not r.phase.final and set(r.classes) & set(spec.classes)
            }
            | {i for i, c in self._claims.items() if c.classes & set(spec.classes)}
        )
        if busy:
            problems.append(f"classes already in rollout {busy}")
        if not problems:
            self._claims[spec.id] = _Claim(frozenset(spec.classes), spec.candidate.artifacts())
        return problems

    def _record(
        self,
        spec: RolloutSpec,
        payload: bytes,
        now: float,
        phase: Phase,
        *,
        candidates: dict[str, Release],
        problems: list[str] | str | None,
    ) -> RolloutRecord:
        policy = rollout_policy(spec, self._config.profiles)
        reason = "; ".join(problems) if isinstance(problems, list) else problems
        return RolloutRecord(
            id=spec.id,
            generation=spec.generation,
            spec=payload,
            classes=spec.classes,
            candidates=candidates,
            waves_percent=spec.waves_percent,
            canaries=spec.canaries,
            success_ratio=policy.success_ratio,
            max_failure_ratio=policy.max_failure_ratio,
            wave_timeout_s=policy.wave_timeout_s,
            desired=spec.desired,
            phase=phase,
            wave=0,
            wave_started_at=now,
            reason=reason or None,
            updated_at=now,
            started=phase is not Phase.PAUSED,
        )

    async def _admit(self, spec: RolloutSpec, payload: bytes, now: float) -> None:
        """Validate a claimed spec's candidate against the class profiles and record
        it: WAVE (or PAUSED, as the spec wishes), or REJECTED with reasons, before any
        device sees it. A generation held meanwhile is applied before any manifest."""
        try:
            selection = await self._validate(spec)
        except TransportError as exc:
            log.warning("coordinator: spec %s deferred to the next connection: %s", spec.id, exc)
            async with self._rollout_lock:
                self._claims.pop(spec.id, None)
                held = self._held.pop(spec.id, None)
                self._deferred[spec.id] = payload if held is None else held[1]
            await self._audit("spec_deferred", spec.id, str(exc))
            return
        problems = list(selection.problems)
        candidates = selection.releases
        for note in selection.notes:
            await self._audit("gate", spec.id, note)
        async with self._rollout_lock:
            self._claims.pop(spec.id, None)
            # A newer generation that came while we validated decides the phase we
            # admit in: an abort or pause is never preceded by a wave-0 manifest.
            held = self._held.pop(spec.id, None)
            newest, newest_payload = (
                held
                if held is not None and held[0].generation > spec.generation
                else (spec, payload)
            )
            phase, reason = Phase.WAVE, None
            if problems:
                phase = Phase.REJECTED
            elif newest.desired is Desired.ABORTED:
                phase, reason = Phase.ROLLED_BACK, "aborted by operator"
            elif newest.desired is Desired.PAUSED:
                phase = Phase.PAUSED
            record = self._record(
                spec, payload, now, phase, candidates=candidates, problems=problems or reason
            ).model_copy(
                update={
                    "generation": newest.generation,
                    "desired": newest.desired,
                    "spec": newest_payload,
                }
            )
            await self._save(
                record, "rejected" if problems else "admitted", record.reason or phase.value
            )
        self._changed.set()
        await self._sync_manifests()
        if problems:
            await self._prune_artifacts()

    async def _validate(self, spec: RolloutSpec) -> Selection:
        """Fetch every artifact the candidate names and each gated class's stable model,
        then select a release per class (``coordinator.admission``).

        Raises: TransportError when the broker could not be asked for an artifact.
        """
        refs = [v.artifact for v in spec.candidate.variants]
        refs += [v.golden for v in spec.candidate.variants if v.golden is not None]
        gated = [
            (name, record.stable)
            for name in spec.classes
            if self._config.profiles[name].gate is not None
            and (record := self._classes.get(name)) is not None
            and record.stable is not None
        ]
        try:
            blobs = {ref.sha256: await self._candidate_bytes(ref) for ref in refs}
            stables = {
                name: (stable, await self._candidate_bytes(stable.artifact))
                for name, stable in gated
            }
        except (RejectedError, TimeoutError) as exc:
            return Selection({}, (f"artifact: {exc or 'not found in time'}",), ())
        return await asyncio.to_thread(
            select_releases,
            spec,
            blobs,
            stables,
            self._config.profiles,
            self._config.datasets_dir,
        )

    async def _candidate_bytes(self, ref: ArtifactRef) -> bytes:
        """The artifact's checked bytes, from our own copy or fetched once for every
        spec that names it."""
        task = self._fetches.get(ref.sha256)
        if task is None:
            task = asyncio.create_task(self._fetch(ref))
            self._fetches[ref.sha256] = task
            task.add_done_callback(lambda done: self._fetch_done(ref.sha256, done))
        data = await asyncio.shield(task)
        if len(data) != ref.size:
            raise ArtifactError(
                Reason.ARTIFACT_MISMATCH, f"artifact {ref.sha256[:12]} is {len(data)} B"
            )
        return data

    def _fetch_done(self, sha256: str, task: asyncio.Task[bytes]) -> None:
        if self._fetches.get(sha256) is task:
            del self._fetches[sha256]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have gone

    async def _fetch(self, ref: ArtifactRef) -> bytes:
        """Fetch and check the artifact from the retained topics, and keep a copy.

        Raises:
            RejectedError: a meta for another artifact, a corrupt chunk, a bad whole.
            TimeoutError: the artifact is not (completely) there in time.
            TransportError: the broker could not be asked.
        """
        stored = await asyncio.to_thread(self._artifacts.get, ref.sha256)
        if stored is not None:
            return stored.data
        session = self._session
        if session is None:
            msg = "not connected"
            raise TransportError(msg)
        feed = _Feed(limit=2 * (ref.size + MAX_CHUNK_BYTES) + MAX_MESSAGE_BYTES)
        self._feeds[ref.sha256] = feed
        chunk_filter = topics.artifact_chunks(ref.sha256)
        timeout = self._config.artifact_timeout_s
        generation = session.generation
        try:
            async with self._link_timeout(session, generation, timeout):
                await session.subscribe(chunk_filter, timeout=timeout)
                collector = ChunkCollector(ref.sha256, ref.size)
                chunks: dict[int, bytes] = {}
                meta_payload = b""
                while not collector.complete:
                    message = await feed.get()
                    if not message.payload:
                        continue
                    parsed = topics.parse(message.topic)
                    if parsed.kind is TopicKind.ARTIFACT_META:
                        if collector.meta is not None:
                            continue
                        accepted = await asyncio.to_thread(collector.add_meta, message.payload)
                        meta_payload = message.payload
                    elif parsed.index is not None:
                        accepted = await asyncio.to_thread(
                            collector.add_chunk, parsed.index, message.payload
                        )
                    else:
                        continue
                    chunks.update(accepted)
            meta = collector.meta
            assert meta is not None  # complete implies a meta
            data = b"".join(chunks[i] for i in range(len(meta.chunks)))
            # put() checks the whole against the meta (sha256 and size, which the
            # collector checked against the spec) before it keeps anything.
            async with self._artifact_lock:
                await asyncio.to_thread(self._artifacts.put, meta_payload, data)
            return data
        finally:
            if self._feeds.get(ref.sha256) is feed:
                del self._feeds[ref.sha256]
            with contextlib.suppress(TransportError, RuntimeError):  # RuntimeError: closed
                await session.unsubscribe(chunk_filter, timeout=5.0)

    @contextlib.asynccontextmanager
    async def _link_timeout(
        self, session: Session, generation: int, timeout: float
    ) -> AsyncIterator[None]:
        """``asyncio.timeout`` that blames the link when it dropped meanwhile: a fetch
        cut short by a disconnect says nothing about the artifact.

        Raises:
            TransportError: timed out after the connection was lost or replaced.
            TimeoutError: timed out on a link that stayed up.
        """
        try:
            async with asyncio.timeout(timeout):
                yield
        except TimeoutError:
            if not session.connected or session.generation != generation:
                msg = "the link to the broker dropped while fetching the artifact"
                raise TransportError(msg) from None
            raise

    # -- the rollout loop ----------------------------------------------------------

    async def _tick_loop(self, tg: asyncio.TaskGroup) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._config.tick_s):
                    await self._changed.wait()
            self._changed.clear()
            if self._deferred and self._fleet_known():
                self._retry_deferred(tg)
            await self._tick()

    def _retry_deferred(self, tg: asyncio.TaskGroup) -> None:
        """Specs whose validation the link cut short: tried again once it is back."""
        deferred, self._deferred = self._deferred, {}
        for rollout_id, payload in deferred.items():
            tg.create_task(self._on_spec(rollout_id, payload))

    def _fleet_known(self) -> bool:
        """Retained device topics arrive right after subscribing; until they had time
        to, the fleet view is partial (and while disconnected, stale)."""
        linked, session = self._linked_at, self._session
        return (
            linked is not None
            and session is not None
            and session.connected
            # A reconnect the re-assert loop has not caught up with yet: not settled.
            and session.generation == self._linked_gen
            and time.monotonic() - linked >= self._config.settle_s
        )

    async def _tick(self) -> None:
        now = self._clock()
        known = self._fleet_known()
        if known and now - self._beat_at >= self._config.heartbeat_s:
            await self._beat(now)
        ended = False
        for rollout_id in list(self._rollouts):
            transition: Action | None = None
            publish = False
            async with self._rollout_lock:
                record = self._rollouts.get(rollout_id)
                if record is None or record.phase.final:
                    continue
                counts = self._fleet.counts(record)
                action, reason = decide(record, counts, record.desired, now, fleet_known=known)
                if action is Action.ROLL_BACK and counts.unhealthy:
                    reason = f"{reason} ({'; '.join(self._fleet.unhealthy_reasons(record))})"
                if action is Action.WAIT:
                    if counts != record.counts:
                        self._rollouts[rollout_id] = record.model_copy(
                            update={"counts": counts, "updated_at": now}
                        )
                        publish = True
                else:
                    await self._transition(record, action, reason, counts, now)
                    transition, publish = action, True
                    ended = ended or self._rollouts[rollout_id].phase.final
            if transition is not None:
                log.info("coordinator: rollout %s %s", rollout_id, transition.value)
                await self._sync_manifests()
            if publish:
                await self._publish_status(rollout_id)
        await self._sync_manifests()
        if ended:
            await self._prune_artifacts()

    async def _transition(
        self,
        record: RolloutRecord,
        action: Action,
        reason: str | None,
        counts: WaveCounts,
        now: float,
    ) -> None:
        """Under the rollout lock."""
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
