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

The broker as a cache. On every connection the coordinator (re)subscribes to what it
writes (trust, manifests, specs, statuses, artifact metas, the chunks of every artifact
it keeps) and waits for its own presence to come back: the broker sends retained
messages before anything published later, so by then it has read the whole cache.
Only then does it publish: a store behind the broker (new, lost) continues above the
retained seq of every class, and finished rollouts whose retained status says so are
recorded as finished, never admitted again. After that, whatever arrives that differs
from the store is put back at once.

Artifacts. Operators upload to ``staging/``; the coordinator fetches a candidate from
there (or from ``artifacts/``, where it publishes), checks it, keeps a copy, and once the
rollout is admitted publishes the checked bytes under ``artifacts/`` and clears the
staged upload. Artifacts no manifest names any longer are cleared from the broker.

Robustness. Every handler of a message runs under a guard: a failure is logged with a
bounded description and the message dropped, never the service. Every text built from
input (reasons, audit details) is bounded where it is built.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from broker.session import ConnectRefused, Endpoint, Message, Session, TransportError, Will
from coordinator.admission import Selection, select_releases
from coordinator.artifacts import ArtifactStore
from coordinator.fleet import FleetView
from coordinator.profiles import ClassProfile, rollout_policy
from coordinator.rollout import Action, RolloutRecord, apply, cutoff_bp, decide
from coordinator.store import ClassRecord, CoordinatorStore, Refusal
from schemas import (
    MANIFEST_KIND,
    MAX_SEQ,
    OFFLINE,
    ONLINE,
    ArtifactError,
    ArtifactMeta,
    ArtifactRef,
    Desired,
    DeviceState,
    HealthReport,
    KeyPair,
    Manifest,
    Phase,
    RejectedError,
    Release,
    Role,
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
from schemas.envelope import open_envelope
from schemas.errors import MAX_DETAIL_CHARS, Reason, bound_text
from schemas.rollout import MAX_REASON_CHARS
from schemas.topics import DeviceChannel, TopicKind

__all__ = ["Coordinator", "CoordinatorConfig", "serve"]

log = logging.getLogger(__name__)

# The broker forces a client id to the account name; asking for it keeps the persistent
# session's id stable when the account is not the default ``coordinator``.
_DEFAULT_CLIENT_ID = "coordinator"

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
    probe_s: float = 10.0
    """On connect, how long at most to wait for the broker's retained topics (they come
    before the echo of the coordinator's presence) before publishing anyway."""
    orphan_grace_s: float = 600.0
    """A staged upload or retained artifact that no spec names is cleared after this
    long: an operator uploads before publishing the spec that names it."""
    datasets_dir: Path | None = None
    """Held-out data sets (``<name>.npz``) the classes' accuracy gates name."""


_RECONNECT_MAX_S = 10.0
_PUBLISH_WINDOW = 32
_NOTED_LIMIT = 10_000
_REFUSALS_KEPT = 256
"""Refused spec ids kept (stored, with a retained ``rejected`` status). Beyond it the
oldest is forgotten and its spec and status are cleared from the broker, so an account
that floods ``rollouts/+/spec`` with junk costs neither the store nor the broker more."""
_STOP_PUBLISH_S = 2.0
"""On a clean stop, how long the ``offline`` presence may take to be acknowledged."""
_ARTIFACT_KINDS = frozenset({TopicKind.ARTIFACT_META, TopicKind.ARTIFACT_CHUNK})


def _describe(exc: BaseException) -> str:
    """An exception in one bounded line (its text may quote hostile input)."""
    return bound_text(f"{type(exc).__name__}: {exc}", MAX_DETAIL_CHARS)


def _digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


async def serve(config: CoordinatorConfig) -> None:
    """Run a coordinator until SIGTERM or SIGINT, then stop it cleanly: its presence
    says ``offline`` and every store write in flight completes. The entry point of
    ``edgefleet coordinator run``.

    Raises:
        StoreDamagedError: the store file is damaged (the message says how to recover).
        RejectedError, ConnectRefused: as :meth:`Coordinator.run`.
    """
    coordinator = Coordinator(config)
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None  # called from a coroutine
    stopping = asyncio.Event()

    def stop(signum: signal.Signals) -> None:
        log.info("coordinator: %s, stopping", signum.name)
        stopping.set()
        task.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop, signum)
    try:
        await coordinator.run()
    except asyncio.CancelledError:
        if not stopping.is_set():
            raise
        task.uncancel()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


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


@dataclass
class _Retained:
    """What the broker retains of one artifact under one prefix (digests only)."""

    first_seen: float
    meta: bytes | None = None
    chunks: dict[int, str] = field(default_factory=dict)
    """Index -> sha256 of the chunk."""


def _release_shas(release: Release) -> set[str]:
    shas = {release.artifact.sha256}
    if release.golden is not None:
        shas.add(release.golden.sha256)
    return shas


@dataclass(frozen=True)
class _Claim:
    """A spec being validated: its classes and artifact are spoken for."""

    classes: frozenset[str]
    shas: frozenset[str]


class Coordinator:
    def __init__(self, config: CoordinatorConfig, *, clock: Callable[[], float] = time.time):
        """Open the store (blocking).

        Raises:
            StoreDamagedError: the store file is damaged; the coordinator refuses to start
                rather than forget what it decided (the message says how to recover).
        """
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
        """Keeping a fetched artifact and pruning unreferenced ones never interleave."""
        self._linked_gen = 0
        self._republishing: asyncio.Task[None] | None = None
        self._trust_bytes = config.trust
        """The TrustDoc published: the configured one, or a newer root-signed one found
        retained on the broker."""
        self._refusals: dict[str, Refusal] = {}
        self._ready = asyncio.Event()
        """Set once this connection's cache was read and re-asserted; specs wait for it."""
        self._echoes: list[asyncio.Future[None]] = []
        """Waiters for the echo of the coordinator's own presence, oldest first."""
        # What the broker's cache holds now, as last seen (retained or live).
        self._retained_trust: bytes | None = None
        self._retained_manifests: dict[str, bytes] = {}
        self._retained_specs: dict[str, str] = {}
        """Rollout id -> sha256 of its retained spec: digests, since an operator account
        may retain any number of specs of up to 1 MiB each."""
        self._retained_statuses: dict[str, bytes] = {}
        self._artifacts_seen: dict[str, _Retained] = {}
        self._since: dict[tuple[bool, str], float] = {}
        """(staged, sha256) -> first sighting, kept while the cache is read again."""
        self._staged_seen: dict[str, _Retained] = {}
        self._copies: dict[str, tuple[ArtifactMeta, bytes]] = {}
        """Kept metas (decoded, and as published) of the artifacts kept."""
        self._repairing: set[str] = set()
        self._repair_again: set[str] = set()
        """Artifacts tampered with again while being re-asserted."""
        self._named: set[str] = set()
        """Artifacts some rollout named: cleared from the broker once none does."""
        self._noted: set[tuple[str, str]] = set()
        """(rollout id, payload digest) of unwanted spec bytes already logged."""
        self._clearing: asyncio.Task[None] | None = None

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
        self._refusals = await asyncio.to_thread(self._store.refusals)
        self._named = {
            sha
            for record in self._rollouts.values()
            for release in record.candidates.values()
            for sha in _release_shas(release)
        }
        if self._store.fresh:
            log.warning(
                "coordinator: no store at %s (a first start, or a lost store): reading the "
                "broker's retained topics before publishing",
                self._store.path,
            )
        will = Will(topic=topics.coordinator_presence(), payload=OFFLINE, retain=True)
        delay = self._config.reconnect_s
        try:
            while True:
                try:
                    async with Session(
                        self._config.endpoint,
                        client_id=self._config.endpoint.username or _DEFAULT_CLIENT_ID,
                        clean_start=False,
                        session_expiry=self._config.session_expiry_s,
                        will=will,
                    ) as session:
                        delay = self._config.reconnect_s
                        try:
                            await self._linked(session)
                        except asyncio.CancelledError:
                            await self._say_offline(session)
                            raise
                except ConnectRefused:
                    raise
                except TransportError as exc:
                    log.warning("coordinator: broker unreachable (%s); retry in %g s", exc, delay)
                finally:
                    self._session = None
                    self._linked_at = None
                    self._ready.clear()
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RECONNECT_MAX_S)
        finally:
            for task in list(self._fetches.values()):
                task.cancel()
            # Under the lock: a write still running in its thread finishes first.
            async with self._store_lock:
                await asyncio.to_thread(self._store.close)

    async def _say_offline(self, session: Session) -> None:
        """A clean stop: a clean DISCONNECT does not fire the Will, so say it ourselves."""
        with contextlib.suppress(TransportError, RuntimeError):
            await session.publish(
                topics.coordinator_presence(), OFFLINE, retain=True, timeout=_STOP_PUBLISH_S
            )

    async def _linked(self, session: Session) -> None:
        """Raises: TransportError when the first subscription fails."""
        await session.subscribe(*(topics.all_devices(c) for c in DeviceChannel))
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
            self._ready.clear()
            self._linked_gen = generation
            self._linked_at = time.monotonic()
            # Guarded: a record that cannot be published is skipped, never a crash loop.
            await self._guarded("re-assert", self._reassert(session))
            self._ready.set()
            # Artifacts can be large: sent beside this loop, which must be back at
            # connections() for the next reconnect; a newer re-assert replaces an older.
            if self._republishing is not None:
                self._republishing.cancel()
            self._republishing = tg.create_task(
                self._guarded("artifact re-assert", self._reassert_artifacts())
            )
            self._retry_deferred(tg)

    async def _reassert(self, session: Session) -> None:
        """Read the broker's cache, recover from it what the store lacks, then put back
        whatever in it differs from the store."""
        await self._read_cache(session)
        await self._recover_from_cache()
        await self._resume_clock()
        # What the broker's cache holds right (as just read) is not sent again.
        if self._retained_trust != self._trust_bytes:
            await self._publish(topics.trust(), self._trust_bytes)
        # Snapshots: specs and ticks change these dicts while we await publishes.
        for name in list(self._classes):
            record = self._classes.get(name)
            if record is not None and self._retained_manifests.get(name) != record.manifest:
                await self._publish_manifest(name)
        for rollout in list(self._rollouts.values()):
            if self._retained_specs.get(rollout.id) != _digest(rollout.spec):
                await self._publish(topics.rollout_spec(rollout.id), rollout.spec)
        for rollout_id in {*self._rollouts, *self._refusals}:
            if self._retained_statuses.get(rollout_id) != self._status_payload(rollout_id):
                await self._publish_status(rollout_id)
        await self._sync_manifests()

    async def _read_cache(self, session: Session) -> None:
        """(Re)subscribe to every retained topic the coordinator writes, and wait until
        the broker has sent them all: retained messages of a subscription come before
        the echo of anything published after its SUBACK."""
        # Orphans' grace runs from their first sighting, across reconnects.
        self._since = {
            (staged, sha): held.first_seen
            for staged, cache in ((False, self._artifacts_seen), (True, self._staged_seen))
            for sha, held in cache.items()
        }
        for cache in (
            self._retained_manifests,
            self._retained_statuses,
            self._retained_specs,
            self._artifacts_seen,
            self._staged_seen,
        ):
            cache.clear()
        self._retained_trust = None
        try:
            await session.subscribe(
                topics.trust(),
                topics.all_class_manifests(),
                topics.all_rollout_specs(),
                topics.all_rollout_statuses(),
                topics.all_artifacts(),
                topics.all_staging(),
                topics.coordinator_presence(),
            )
        except TransportError as exc:
            log.warning("coordinator: could not read the retained topics: %s", exc)
            return
        echo = asyncio.get_running_loop().create_future()
        self._echoes.append(echo)
        try:
            await self._publish(topics.coordinator_presence(), ONLINE)
            async with asyncio.timeout(self._config.probe_s):
                await echo
        except TimeoutError:
            log.warning(
                "coordinator: the retained topics did not all arrive within %g s",
                self._config.probe_s,
            )
        finally:
            with contextlib.suppress(ValueError):
                self._echoes.remove(echo)

    async def _recover_from_cache(self) -> None:
        """Before publishing anything: take a newer retained TrustDoc, and continue
        above the retained seq of every class when the store is behind the broker (a new
        or lost store); such a class also takes the retained manifest's stable release
        when the store has none, so its artifact stays named."""
        if self._retained_trust is not None and self._retained_trust != self._trust_bytes:
            self._adopt_trust(self._retained_trust)
        trust = self._trusted.trust
        if trust is None:
            return
        allowed = trust.keys_for(Role.MANIFEST)
        threshold = trust.roles[Role.MANIFEST].threshold
        async with self._sync_lock:
            for name, payload in list(self._retained_manifests.items()):
                try:
                    body = open_envelope(
                        payload, kind=MANIFEST_KIND, allowed=allowed, threshold=threshold
                    )
                    retained = decode(body, Manifest)
                except RejectedError:
                    continue  # not ours: the re-assert below replaces it
                current = self._classes.get(name, ClassRecord(name=name))
                if retained.hw_class != name or retained.seq <= current.seq:
                    continue
                if retained.seq >= MAX_SEQ:
                    # Signed with the manifest key at the last seq: nothing can follow
                    # it. Devices that took it wait for a rotated manifest key.
                    log.error(
                        "coordinator: the broker holds %s manifest seq %d, the last there is: "
                        "not continuing above it; rotate the manifest key (a new TrustDoc)",
                        name,
                        retained.seq,
                    )
                    continue
                log.warning(
                    "coordinator: the broker holds %s manifest seq %d, the store only seq %d "
                    "(a new or lost store): continuing above it",
                    name,
                    retained.seq,
                    current.seq,
                )
                update: dict[str, object] = {"seq": retained.seq, "content": ""}
                if current.stable is None and retained.stable is not None:
                    update["stable"] = retained.stable
                recovered = current.model_copy(update=update)
                await self._write(self._store.put_class, recovered)
                self._classes[name] = recovered
                await self._audit(
                    "seq_recovered", "", f"{name}: continuing above retained seq {retained.seq}"
                )

    def _adopt_trust(self, payload: bytes) -> bool:
        """Take ``payload`` as the TrustDoc to publish if the root role signed it and it
        is newer than ours (it was rotated since the configuration was written)."""
        candidate = TrustedState(self._config.root_keys)
        now = self._clock()
        try:
            candidate.update_trust(self._trust_bytes, now=now)
            doc = candidate.update_trust(payload, now=now)
        except RejectedError:
            return False
        log.warning(
            "coordinator: the broker holds a newer TrustDoc (version %d): using it", doc.version
        )
        self._trusted = candidate
        self._trust_bytes = payload
        return True

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
        payload = self._status_payload(rollout_id)
        if payload is not None:
            await self._publish(topics.rollout_status(rollout_id), payload)

    def _status_payload(self, rollout_id: str) -> bytes | None:
        """The status of a rollout record, or of a refused spec; None when there is
        none, or it cannot be built (logged: a record is skipped, never a crash loop)."""
        record = self._rollouts.get(rollout_id)
        refusal = self._refusals.get(rollout_id)
        try:
            if record is not None:
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
                    # Bounded again here: a record stored before reasons were bounded.
                    reason=None
                    if record.reason is None
                    else bound_text(record.reason, MAX_REASON_CHARS),
                    updated_at=record.updated_at,
                )
            elif refusal is not None:
                status = RolloutStatus(
                    id=refusal.id,
                    generation=0,
                    phase=Phase.REJECTED,
                    wave=0,
                    waves_percent=(),
                    counts=WaveCounts(),
                    classes=(),
                    reason=bound_text(refusal.reason, MAX_REASON_CHARS),
                    updated_at=refusal.at,
                )
            else:
                return None
        except ValidationError as exc:
            log.error("coordinator: status of %s not published: %s", rollout_id, _describe(exc))
            return None
        return encode(status)

    def _named_refs(self) -> dict[str, ArtifactRef]:
        """The artifacts (models and golden sets) of the stables and live candidates."""
        releases = [c.stable for c in self._classes.values() if c.stable is not None]
        for record in self._rollouts.values():
            if record.phase in (Phase.WAVE, Phase.PAUSED):
                releases += record.candidates.values()
        refs = {r.artifact.sha256: r.artifact for r in releases}
        refs |= {r.golden.sha256: r.golden for r in releases if r.golden is not None}
        return refs

    def _referenced(self) -> set[str]:
        """Artifacts a manifest names or will name: stables, live candidates, and the
        candidates being validated."""
        return set(self._named_refs()) | self._busy()

    # -- the artifacts on the broker --------------------------------------------------

    def _note_artifact(
        self, kind: TopicKind, sha256: str, index: int | None, payload: bytes
    ) -> str | None:
        """Follow what the broker retains under ``artifacts/`` and ``staging/``; the
        digest of a non-empty chunk."""
        staged = kind not in _ARTIFACT_KINDS
        cache = self._staged_seen if staged else self._artifacts_seen
        digest = _digest(payload) if index is not None and payload else None
        held = cache.get(sha256)
        if held is None:
            if not payload:
                return digest
            since = self._since.get((staged, sha256), time.monotonic())
            held = cache[sha256] = _Retained(first_seen=since)
        if index is None:
            held.meta = payload or None
        elif digest is not None:
            held.chunks[index] = digest
        else:
            held.chunks.pop(index, None)
        if held.meta is None and not held.chunks:
            del cache[sha256]
        return digest

    async def _repair_artifact(self, sha256: str) -> None:
        """Make the broker's ``artifacts/{sha256}/`` what the kept copy says: every
        missing or different chunk, then the meta (a meta implies its chunks), and
        chunks beyond the artifact cleared. Again when it was tampered meanwhile."""
        self._repairing.add(sha256)
        try:
            while True:
                self._repair_again.discard(sha256)
                await self._repair_once(sha256)
                if sha256 not in self._repair_again:
                    return
        finally:
            self._repairing.discard(sha256)

    async def _repair_once(self, sha256: str) -> None:
        copy = self._copies.get(sha256)
        if copy is None:
            copy = await asyncio.to_thread(self._artifacts.meta, sha256)
            if copy is None:
                log.warning("coordinator: no copy of artifact %s to re-assert", sha256[:12])
                return
            self._copies[sha256] = copy
        meta, meta_payload = copy
        held = self._artifacts_seen.get(sha256, _Retained(first_seen=0.0))
        wrong = [i for i, digest in enumerate(meta.chunks) if held.chunks.get(i) != digest]
        extra = sorted(i for i in held.chunks if i >= len(meta.chunks))
        if not wrong and not extra and held.meta == meta_payload:
            return
        log.info(
            "coordinator: re-asserting artifact %s (%d of %d chunks)",
            sha256[:12],
            len(wrong),
            len(meta.chunks),
        )
        for start in range(0, len(wrong), _PUBLISH_WINDOW):
            batch = wrong[start : start + _PUBLISH_WINDOW]
            datas = [await asyncio.to_thread(self._artifacts.chunk, meta, i) for i in batch]
            if any(d is None for d in datas):
                log.error("coordinator: the kept copy of %s is damaged", sha256[:12])
                self._copies.pop(sha256, None)
                return
            await asyncio.gather(
                *(
                    self._publish(topics.artifact_chunk(sha256, i), data)
                    for i, data in zip(batch, datas, strict=True)
                    if data is not None
                )
            )
        for index in extra:
            await self._publish(topics.artifact_chunk(sha256, index), b"")
        await self._publish(topics.artifact_meta(sha256), meta_payload)

    async def _reassert_artifacts(self) -> None:
        """Every named artifact the broker lost or holds otherwise, from the kept
        copies; then whatever no manifest names any longer is cleared. A named artifact
        without a copy (a lost data folder) is fetched from the broker and kept first."""
        for sha256, ref in sorted(self._named_refs().items()):
            if sha256 in self._fetches:
                continue
            if await asyncio.to_thread(self._artifacts.meta, sha256) is None:
                try:
                    await self._candidate_bytes(ref)
                except (RejectedError, TimeoutError, TransportError) as exc:
                    log.warning(
                        "coordinator: no copy of artifact %s, and none to fetch: %s",
                        sha256[:12],
                        _describe(exc),
                    )
                    continue
            await self._repair_artifact(sha256)
        await self._prune_artifacts()

    async def _prune_artifacts(self) -> None:
        async with self._artifact_lock:
            keep = self._referenced()
            gone = await asyncio.to_thread(self._artifacts.prune, keep)
        for sha256 in gone:
            log.info("coordinator: artifact %s no longer named by a manifest", sha256[:12])
            self._copies.pop(sha256, None)
            self._named.add(sha256)
        await self._clear_orphans(named=True)

    async def _clear_orphans(self, *, named: bool) -> None:
        """Clear from the broker the artifacts no manifest names: at once for those
        some spec named (``named``: their rollout ended), and any staged upload or
        artifact nobody claimed within ``orphan_grace_s`` of its arrival."""
        now = time.monotonic()
        grace = self._config.orphan_grace_s
        keep = self._referenced()
        for sha256, held in list(self._artifacts_seen.items()):
            if sha256 not in keep and (
                (named and sha256 in self._named) or now - held.first_seen > grace
            ):
                await self._clear(sha256, staged=False)
        for sha256, held in list(self._staged_seen.items()):
            if sha256 not in self._busy() and now - held.first_seen > grace:
                await self._clear(sha256, staged=True)

    def _busy(self) -> set[str]:
        """Artifacts being fetched or validated: their uploads are still needed."""
        shas = set(self._fetches)
        for claim in self._claims.values():
            shas |= claim.shas
        return shas

    async def _clear(self, sha256: str, *, staged: bool) -> None:
        """An empty retained message on every topic the broker holds for ``sha256``
        under ``staging/`` (``staged``) or ``artifacts/``."""
        held = (self._staged_seen if staged else self._artifacts_seen).get(sha256)
        if held is None:
            return
        log.info(
            "coordinator: clearing %s %s (%d chunks)",
            "staged upload" if staged else "artifact",
            sha256[:12],
            len(held.chunks),
        )
        chunk_topic = topics.staging_chunk if staged else topics.artifact_chunk
        meta_topic = topics.staging_meta if staged else topics.artifact_meta
        for index in sorted(held.chunks):
            # Checked before each: a spec may name the artifact meanwhile.
            if sha256 in (self._busy() if staged else self._referenced()):
                return
            await self._publish(chunk_topic(sha256, index), b"")
        if held.meta is not None:
            await self._publish(meta_topic(sha256), b"")

    async def _publish_checked(self, shas: set[str]) -> None:
        """After admission: the checked bytes under ``artifacts/``, then the staged
        uploads cleared (nothing else reads them)."""
        for sha256 in sorted(shas):
            await self._repair_artifact(sha256)
        await self._clear_uploads(shas)

    async def _clear_uploads(self, shas: set[str]) -> None:
        busy = self._busy()
        for sha256 in sorted(shas - busy):
            await self._clear(sha256, staged=True)

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
            try:
                if await self._store_manifest(name, profile, now):
                    changed.append(name)
            except (ValidationError, ValueError, KeyError, RejectedError) as exc:
                # One class's manifest that cannot be built must not stop the others'
                # (nor, at every start, the coordinator).
                log.error("coordinator: %s manifest not built: %s", name, _describe(exc))
        return changed

    async def _store_manifest(self, name: str, profile: ClassProfile, now: float) -> bool:
        """Store a new manifest for ``name`` if it needs one; whether it did."""
        stable, cohort = self._desired_content(name)
        if stable is None and cohort is None:
            return False
        content = Manifest(
            hw_class=name, seq=1, issued_at=0, expires_at=0, stable=stable, rollout=cohort
        ).model_dump_json(include={"stable", "rollout"})
        current = self._classes.get(name, ClassRecord(name=name))
        fresh = now < current.expires_at - profile.manifest_ttl_s / 2
        if content == current.content and fresh:
            return False
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
        return True

    # -- incoming ------------------------------------------------------------------

    async def _dispatch(self, session: Session, tg: asyncio.TaskGroup) -> None:
        async for message in session.messages():
            try:
                self._handle(message, tg)
            except RejectedError as exc:
                log.warning("coordinator: dropped %s: %s", bound_text(message.topic), exc)
            except Exception as exc:  # no message may end the service
                log.error(
                    "coordinator: dropped %s after a failure: %s",
                    bound_text(message.topic),
                    _describe(exc),
                )
                log.debug("coordinator: handling %s failed", message.topic, exc_info=True)

    def _spawn(self, tg: asyncio.TaskGroup, what: str, work: Coroutine[Any, Any, None]) -> None:
        tg.create_task(self._guarded(what, work))

    async def _guarded(self, what: str, work: Coroutine[Any, Any, None]) -> None:
        """Run a handler; its failure is logged and its message dropped, the task group
        (the service) goes on."""
        try:
            await work
        except Exception as exc:  # no message may end the service
            log.error("coordinator: %s failed, dropped: %s", what, _describe(exc))
            log.debug("coordinator: %s failed", what, exc_info=True)

    def _handle(self, message: Message, tg: asyncio.TaskGroup) -> None:
        parsed = topics.parse(message.topic)
        payload = message.payload
        ready = self._ready.is_set()
        match parsed.kind:
            case TopicKind.DEVICE if parsed.name is not None:
                self._on_device(parsed.name, parsed.channel, payload)
            case TopicKind.ROLLOUT_SPEC if parsed.name is not None:
                if payload:
                    self._retained_specs[parsed.name] = _digest(payload)
                else:
                    self._retained_specs.pop(parsed.name, None)
                record = self._rollouts.get(parsed.name)
                if record is not None and payload == record.spec:
                    return  # our own (re-asserted) bytes
                if payload or (ready and record is not None):
                    self._spawn(tg, f"spec {parsed.name}", self._on_spec(parsed.name, payload))
            case TopicKind.ROLLOUT_STATUS if parsed.name is not None:
                self._retained_statuses[parsed.name] = payload
                expected = self._status_payload(parsed.name)
                if ready and expected is not None and payload != expected:
                    self._spawn(tg, "status re-assert", self._publish_status(parsed.name))
            case TopicKind.CLASS_MANIFEST if parsed.name is not None:
                self._retained_manifests[parsed.name] = payload
                current = self._classes.get(parsed.name)
                if (
                    ready
                    and current is not None
                    and current.manifest is not None
                    and payload != current.manifest
                ):
                    self._spawn(tg, "manifest re-assert", self._publish_manifest(parsed.name))
            case TopicKind.TRUST:
                self._retained_trust = payload
                if ready and payload != self._trust_bytes and not self._adopt_trust(payload):
                    self._spawn(
                        tg, "trust re-assert", self._publish(topics.trust(), self._trust_bytes)
                    )
            case TopicKind.COORDINATOR_PRESENCE:
                if not message.retain and payload == ONLINE and self._echoes:
                    echo = self._echoes.pop(0)
                    if not echo.done():
                        echo.set_result(None)
                elif ready and payload != ONLINE:
                    # Someone else's word on our presence (we say offline only after
                    # this dispatch has stopped): dashboards must not read us as gone.
                    self._spawn(
                        tg,
                        "presence re-assert",
                        self._publish(topics.coordinator_presence(), ONLINE),
                    )
            case (
                TopicKind.ARTIFACT_META
                | TopicKind.ARTIFACT_CHUNK
                | TopicKind.STAGING_META
                | TopicKind.STAGING_CHUNK
            ) if parsed.name is not None:
                self._on_artifact_message(message, parsed.kind, parsed.name, parsed.index, tg)

    def _on_artifact_message(
        self,
        message: Message,
        kind: TopicKind,
        sha256: str,
        index: int | None,
        tg: asyncio.TaskGroup,
    ) -> None:
        digest = self._note_artifact(kind, sha256, index, message.payload)
        feed = self._feeds.get(sha256)
        if feed is not None and message.payload:
            feed.offer(message)
        if (
            kind in _ARTIFACT_KINDS
            and self._ready.is_set()
            and self._unlike_copy(sha256, index, message.payload, digest)
        ):
            if sha256 in self._repairing:
                self._repair_again.add(sha256)
            else:
                self._spawn(tg, f"artifact {sha256[:12]} re-assert", self._repair_artifact(sha256))

    def _unlike_copy(
        self, sha256: str, index: int | None, payload: bytes, digest: str | None
    ) -> bool:
        """Whether a message under ``artifacts/`` contradicts the kept copy of a named
        artifact (compared by digest: chunks can be large)."""
        copy = self._copies.get(sha256)
        if copy is None or sha256 not in self._named_refs():
            return False
        meta, meta_payload = copy
        if index is None:
            return payload != meta_payload
        if index >= len(meta.chunks):
            return bool(payload)
        return digest != meta.chunks[index]

    def _on_device(self, device_id: str, channel: DeviceChannel | None, payload: bytes) -> None:
        if channel is DeviceChannel.PRESENCE:
            self._fleet.on_presence(device_id, payload == ONLINE)
        elif channel is DeviceChannel.STATE:
            if not payload:
                self._fleet.forget(device_id)
                return
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
        # Not before this connection's cache was read: a spec whose rollout already
        # finished is told by its retained status.
        await self._ready.wait()
        now = self._clock()
        current = self._rollouts.get(rollout_id)
        if current is not None and payload == current.spec:
            return
        spec: RolloutSpec | None = None
        problem = "the spec was cleared"
        if payload:
            try:
                spec = self._trusted.verify_rollout_spec(payload, now=now)
            except RejectedError as exc:
                problem = str(exc)
            else:
                if spec.id != rollout_id:
                    problem = f"replayed: the signed spec is rollout {spec.id}'s"
                    spec = None
        if spec is None:
            await self._refuse(rollout_id, payload, problem, now)
            return
        if current is None and await self._record_finished(spec, payload, now):
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
                    self._named |= spec.candidate.artifacts()
                stale = None
        if current is None and rollout_id not in self._rollouts:
            await self._admit(spec, payload, now)
        elif stale is not None:
            # The broker's cache held an older generation than we acted on: correct it.
            await self._publish(topics.rollout_spec(rollout_id), stale)
        else:
            self._changed.set()
        await self._publish_status(rollout_id)

    async def _refuse(self, rollout_id: str, payload: bytes, problem: str, now: float) -> None:
        """Spec bytes that cannot be acted on. Over a known rollout they are the
        broker's cache gone wrong: the rollout's spec is put back. Otherwise the refusal
        is stored and published as a ``rejected`` status, once per payload."""
        digest = _digest(payload)
        first = (rollout_id, digest) not in self._noted
        if len(self._noted) >= _NOTED_LIMIT:
            self._noted.clear()
        self._noted.add((rollout_id, digest))
        current = self._rollouts.get(rollout_id)
        if current is not None:
            if first:
                log.warning(
                    "coordinator: the broker's spec of %s is not the one acted on (%s): "
                    "re-asserting it",
                    rollout_id,
                    problem,
                )
            await self._publish(topics.rollout_spec(rollout_id), current.spec)
            return
        known = self._refusals.get(rollout_id)
        reason = bound_text(f"spec refused: {problem}", MAX_REASON_CHARS)
        if (
            not payload
            or (known is not None and digest == known.digest)
            or (known is not None and reason == known.reason)
        ):
            # Nothing to refuse, or refused already: a redelivery, a reconnect, or
            # other bytes failing the same way (the log and store do not grow with them).
            return
        log.warning("coordinator: rollout %s: %s", rollout_id, reason)
        refusal = Refusal(id=rollout_id, digest=digest, reason=reason, at=now)
        await self._write(self._store.put_refusal, refusal)
        self._refusals[rollout_id] = refusal
        await self._audit("spec_rejected", rollout_id, reason)
        await self._publish_status(rollout_id)
        while len(self._refusals) > _REFUSALS_KEPT:
            await self._forget_refusal(min(self._refusals.values(), key=lambda r: r.at).id)

    async def _forget_refusal(self, rollout_id: str) -> None:
        """Drop the oldest refusal, and its junk spec and status from the broker."""
        del self._refusals[rollout_id]
        await self._write(self._store.remove_refusal, rollout_id)
        log.info("coordinator: forgetting refused spec %s (keeping %d)", rollout_id, _REFUSALS_KEPT)
        await self._publish(topics.rollout_status(rollout_id), b"")
        await self._publish(topics.rollout_spec(rollout_id), b"")

    async def _record_finished(self, spec: RolloutSpec, payload: bytes, now: float) -> bool:
        """A spec the store does not know whose retained status says its generation
        already ended (the store is new or was lost): recorded as ended, never admitted
        again. Whether it was."""
        retained = self._retained_statuses.get(spec.id)
        if not retained:
            return False
        try:
            status = decode(retained, RolloutStatus)
        except RejectedError:
            return False
        if not status.phase.final or status.generation < spec.generation:
            return False
        async with self._rollout_lock:
            if spec.id in self._rollouts or spec.id in self._claims:
                return False
            record = self._record(
                spec, payload, now, status.phase, candidates={}, problems=status.reason
            ).model_copy(
                update={
                    "wave": status.wave,
                    "counts": status.counts,
                    "updated_at": status.updated_at,
                }
            )
            await self._save(record, "recovered", f"its retained status says {status.phase.value}")
        log.warning(
            "coordinator: rollout %s recorded as %s from its retained status, not admitted again",
            spec.id,
            status.phase.value,
        )
        return True

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
        # Problems quote the spec (class names, variant labels): bounded where joined.
        reason = None if reason is None else bound_text(reason, MAX_REASON_CHARS)
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
                    "wave": self._retained_wave(newest) if phase is Phase.WAVE else 0,
                }
            )
            await self._save(
                record, "rejected" if problems else "admitted", record.reason or phase.value
            )
        shas = set(spec.candidate.artifacts())
        self._named |= shas
        if record.phase in (Phase.WAVE, Phase.PAUSED):
            # Devices fetch only what the coordinator checked and published itself,
            # before any manifest names it.
            await self._publish_checked(shas)
        else:
            await self._clear_uploads(shas)
        self._changed.set()
        await self._sync_manifests()
        if problems:
            await self._prune_artifacts()

    def _retained_wave(self, spec: RolloutSpec) -> int:
        """The wave a live rollout had reached by its retained status: a store that lost
        the rollout resumes there instead of shrinking the wave back to the first."""
        retained = self._retained_statuses.get(spec.id)
        if not retained:
            return 0
        try:
            status = decode(retained, RolloutStatus)
        except RejectedError:
            return 0
        if status.phase is not Phase.WAVE or status.generation != spec.generation:
            return 0
        wave = min(status.wave, len(spec.waves_percent) - 1)
        log.warning(
            "coordinator: rollout %s resumes at wave %d, its retained status's", spec.id, wave + 1
        )
        return wave

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
            return Selection({}, (f"artifact: {str(exc) or 'not found in time'}",), ())
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
        """Fetch and check the artifact from the operator's staged upload (or from
        ``artifacts/``, where it may already be), and keep a copy.

        A meta or chunk that fails its check is dropped, not fatal: the other source may
        hold the genuine one. Its problem names the failure if the artifact does not
        complete in time.

        Raises:
            ArtifactError: incomplete in time, with a meta or chunk that failed its check.
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
        # Both sources, and the standing subscriptions too, may deliver each message.
        feed = _Feed(limit=4 * (ref.size + MAX_CHUNK_BYTES) + 2 * MAX_MESSAGE_BYTES)
        self._feeds[ref.sha256] = feed
        filters = (topics.staging_chunks(ref.sha256), topics.artifact_chunks(ref.sha256))
        timeout = self._config.artifact_timeout_s
        generation = session.generation
        collector = ChunkCollector(ref.sha256, ref.size)
        chunks: dict[int, bytes] = {}
        early: dict[int, list[bytes]] = {}
        """Chunks before a meta: kept apart, so that one bad chunk never costs the rest."""
        meta_payload = b""
        problem: RejectedError | None = None
        try:
            async with self._link_timeout(session, generation, timeout):
                await session.subscribe(*filters, timeout=timeout)
                while not collector.complete:
                    message = await feed.get()
                    parsed = topics.parse(message.topic)
                    try:
                        if parsed.kind in (TopicKind.ARTIFACT_META, TopicKind.STAGING_META):
                            if collector.meta is not None:
                                continue
                            await asyncio.to_thread(collector.add_meta, message.payload)
                            meta_payload = message.payload
                            offered, early = early, {}
                            for index, datas in sorted(offered.items()):
                                for data in datas:
                                    if index not in chunks:
                                        chunks.update(await self._offer(collector, index, data))
                        elif parsed.index is not None and parsed.index not in chunks:
                            if collector.meta is None:
                                early.setdefault(parsed.index, []).append(message.payload)
                            else:
                                chunks.update(
                                    await self._offer(collector, parsed.index, message.payload)
                                )
                    except RejectedError as exc:
                        log.info("coordinator: dropped %s: %s", bound_text(message.topic), exc)
                        problem = exc
            meta = collector.meta
            assert meta is not None  # complete implies a meta
            data = b"".join(chunks[i] for i in range(len(meta.chunks)))
            # put() checks the whole against the meta (sha256 and size, which the
            # collector checked against the spec) before it keeps anything.
            async with self._artifact_lock:
                await asyncio.to_thread(self._artifacts.put, meta_payload, data)
            self._copies[ref.sha256] = (meta, meta_payload)
            return data
        except TimeoutError:
            if problem is None:
                raise
            raise ArtifactError(
                problem.reason, f"incomplete after {timeout:g} s; {problem.detail}"
            ) from None
        finally:
            if self._feeds.get(ref.sha256) is feed:
                del self._feeds[ref.sha256]
            with contextlib.suppress(TransportError, RuntimeError):  # RuntimeError: closed
                await session.unsubscribe(*filters, timeout=5.0)

    @staticmethod
    async def _offer(collector: ChunkCollector, index: int, data: bytes) -> list[tuple[int, bytes]]:
        """Raises: ArtifactError (CHUNK_CORRUPT) for a chunk that fails its check."""
        return await asyncio.to_thread(collector.add_chunk, index, data)

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
            await self._guarded("tick", self._tick())
            if (
                self._ready.is_set()
                and (self._clearing is None or self._clearing.done())
                and self._orphans_due()
            ):
                self._clearing = tg.create_task(
                    self._guarded("clearing orphans", self._clear_orphans(named=False))
                )

    def _orphans_due(self) -> bool:
        """Whether an upload or artifact has outlived ``orphan_grace_s`` unnamed."""
        oldest = time.monotonic() - self._config.orphan_grace_s
        held = [*self._artifacts_seen.values(), *self._staged_seen.values()]
        return any(h.first_seen < oldest for h in held) and bool(
            (self._artifacts_seen.keys() - self._referenced())
            or (self._staged_seen.keys() - self._busy())
        )

    def _retry_deferred(self, tg: asyncio.TaskGroup) -> None:
        """Specs whose validation the link cut short: tried again once it is back."""
        deferred, self._deferred = self._deferred, {}
        for rollout_id, payload in deferred.items():
            self._spawn(tg, f"spec {rollout_id}", self._on_spec(rollout_id, payload))

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
            try:
                ended = await self._tick_rollout(rollout_id, now, known=known) or ended
            except Exception as exc:  # one rollout must not stop the others
                log.error("coordinator: rollout %s tick failed: %s", rollout_id, _describe(exc))
                log.debug("coordinator: rollout %s tick failed", rollout_id, exc_info=True)
        await self._sync_manifests()
        if ended:
            await self._prune_artifacts()

    async def _tick_rollout(self, rollout_id: str, now: float, *, known: bool) -> bool:
        """Decide on one rollout; whether it ended."""
        transition: Action | None = None
        publish = ended = False
        async with self._rollout_lock:
            record = self._rollouts.get(rollout_id)
            if record is None or record.phase.final:
                return False
            counts = self._fleet.counts(record)
            action, reason = decide(record, counts, record.desired, now, fleet_known=known)
            if action is Action.ROLL_BACK and counts.unhealthy:
                # The devices' own reasons: bounded where the rollback reason is built.
                reason = bound_text(
                    f"{reason} ({'; '.join(self._fleet.unhealthy_reasons(record))})",
                    MAX_REASON_CHARS,
                )
            if action is Action.WAIT:
                if counts != record.counts:
                    self._rollouts[rollout_id] = record.model_copy(
                        update={"counts": counts, "updated_at": now}
                    )
                    publish = True
            else:
                await self._transition(record, action, reason, counts, now)
                transition, publish = action, True
                ended = self._rollouts[rollout_id].phase.final
        if transition is not None:
            log.info("coordinator: rollout %s %s", rollout_id, transition.value)
            await self._sync_manifests()
        if publish:
            await self._publish_status(rollout_id)
        return ended

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
        entry = {
            "at": self._clock(),
            "event": what,
            "rollout": rollout_id,
            "detail": bound_text(detail, MAX_REASON_CHARS),
        }
        await self._write(self._store.audit, entry)

    async def _write(self, fn: Callable[[_R], None], record: _R) -> None:
        async with self._store_lock:
            work = asyncio.ensure_future(asyncio.to_thread(fn, record))
            try:
                await asyncio.shield(work)
            except asyncio.CancelledError:
                # A stop waits for the write in its thread: the lock is not released
                # (nor the store closed) under a write still running.
                await asyncio.wait([work])
                raise
