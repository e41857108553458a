"""Building blocks of the integration tests: a live fleet, a recorder of what crosses
the broker, and manifests signed with a home's real keys.

Everything here is real: Mosquitto with the fleet's TLS material and ACL, onnxruntime
in every agent, Ed25519 signatures. Tests assert on what arrives over MQTT and on the
agents' own state; timeouts only guard against hanging, never measure speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, TypeVar

from agent import Agent, AgentConfig
from agent.lifecycle import Stage
from broker.session import ConnectRefused, Message, Session
from coordinator.profiles import ClassProfile
from coordinator.store import CoordinatorStore
from coordinator.validate import ModelFacts
from edgefleet.compose import make_agent, start_rollout
from edgefleet.fleet import Fleet
from edgefleet.home import OPERATOR, Home
from models import DemoModel
from schemas import (
    MANIFEST_KIND,
    ROLLOUT_SPEC_KIND,
    ArtifactMeta,
    ArtifactRef,
    Candidate,
    Desired,
    DeviceState,
    Event,
    HealthReport,
    KeyPair,
    Manifest,
    Phase,
    RejectedError,
    Release,
    Role,
    RolloutSpec,
    RolloutStatus,
    TelemetrySummary,
    TrustedState,
    Variant,
    decode,
    encode,
    seal,
    split_artifact,
    topics,
)
from schemas.artifact import DEFAULT_CHUNK_BYTES
from schemas.envelope import Envelope
from schemas.topics import DeviceChannel, TopicKind

T = TypeVar("T")

JETSON: Final = "jetson-vision-standard"
INTEL: Final = "intel-lowpower-detector"

# The shipped class profiles, with a short soak so a wave takes seconds, not minutes.
# Latency budgets are the real ones: digits-v2 runs in well under 1 ms, the slow build
# in tens of ms.
TEST_PROFILES: Final = """
[classes.jetson-vision-standard]
providers = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
max_model_bytes = 200_000_000
health = { max_error_rate = 0.01, p95_latency_ms = 10.0, min_inferences = 20, soak_seconds = 1.5 }

[classes.intel-lowpower-detector]
providers = ["OpenVINOExecutionProvider", "CPUExecutionProvider"]
max_model_bytes = 20_000_000
health = { max_error_rate = 0.01, p95_latency_ms = 15.0, min_inferences = 20, soak_seconds = 1.5 }
"""

AGENT_CONFIG: Final = AgentConfig(
    data_dir=Path(),
    inference_hz=30.0,
    telemetry_window_s=1.0,
    state_interval_s=1.0,
    reconnect_s=0.5,
    fetch_timeout_s=60.0,
)

WAVES: Final = (10.0, 50.0, 100.0)
WAVE_CUTOFFS: Final = (1000, 5000, 10000)
ROLLOUT_TIMEOUT_S: Final = 90.0
"""A guard against a hang; a rollout of these tests takes a few seconds per wave."""

MakeFleet = Callable[[dict[str, int]], Fleet]

# The broker binds every client id to its account, so two sessions of one account at once
# replace each other. The tests' own sessions therefore get accounts of their own, never
# those of the coordinator or the operator running beside them.
ADMIN_ACCOUNTS: Final = ("it-coordinator", "it-artifact-watcher")
"""Accounts with the coordinator's rights (forged manifests, watching artifacts)."""
WIRE_ACCOUNTS: Final = ("it-wire-1", "it-wire-2", "it-wire-3")
"""Read-everything accounts (operator role) for :class:`Wire`, one per open wire."""
_wires_open: set[tuple[Path, str]] = set()
"""(home, account) of every open wire: a test may hold several at once."""
_PROMOTION = re.compile(r"wave (\d+): (\d+) of (\d+) devices healthy")


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` that re-raises a lone error out of TaskGroup exception groups."""
    try:
        return asyncio.run(main)
    except BaseExceptionGroup as group:
        leaves: list[BaseException] = []
        stack: list[BaseException] = [group]
        while stack:
            exc = stack.pop()
            if isinstance(exc, BaseExceptionGroup):
                stack.extend(exc.exceptions)
            else:
                leaves.append(exc)
        if len(leaves) == 1:
            raise leaves[0] from group
        raise


# -- running a fleet -----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def live(
    fleet: Fleet, *, coordinator: bool = True, agents: Iterable[str] | None = None
) -> AsyncIterator[asyncio.TaskGroup]:
    """The coordinator (optionally) and agents running; all cancelled on exit."""
    async with asyncio.TaskGroup() as tg:
        if coordinator:
            fleet.start_coordinator(tg)
        for device_id in fleet.home.devices() if agents is None else agents:
            fleet.start_agent(tg, device_id)
        try:
            yield tg
        finally:
            for task in [*fleet.agent_tasks.values(), fleet.coordinator_task]:
                if task is not None:
                    task.cancel()


def start_agent_with(fleet: Fleet, tg: asyncio.TaskGroup, device_id: str, **changes: Any) -> Agent:
    """Like ``Fleet.start_agent``, with some agent settings changed for this one."""
    agent = make_agent(
        fleet.home.root / "devices" / device_id,
        replace(fleet.agent_config, data_dir=fleet.workdir / "agents" / device_id, **changes),
        seed=sum(device_id.encode()),
    )
    fleet.agents[device_id] = agent
    fleet.agent_tasks[device_id] = tg.create_task(agent.run())
    return agent


async def stop_agent(fleet: Fleet, device_id: str) -> None:
    """Cancel one agent's task and wait for it: a device switched off mid-run."""
    task = fleet.agent_tasks.pop(device_id)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def restart_idle(
    fleet: Fleet, tg: asyncio.TaskGroup, devices: Iterable[str], **changes: Any
) -> tuple[dict[str, int], dict[str, Agent]]:
    """Stop each of ``devices`` cleanly (its open telemetry window committed) and start
    it again on its data folder, inferring once as it starts and then not for 1,000 s;
    return once each made that one inference. Returns what each made before the stop,
    and the agents started again."""
    made: dict[str, int] = {}
    for device_id in devices:
        agent = fleet.agents[device_id]
        agent.request_stop()
        await fleet.agent_tasks.pop(device_id)
        made[device_id] = agent.inferences_total
    again = {d: start_agent_with(fleet, tg, d, **changes, inference_hz=1e-3) for d in made}

    async def first_inferences() -> bool:
        return all(a.inferences_total >= 1 for a in again.values())

    await eventually(first_inferences, what="each restarted agent's first inference")
    return made, again


def canaries_of(fleet: Fleet) -> tuple[str, ...]:
    """The first device of every class."""
    devices = fleet.home.devices()
    return tuple(next(d for d, c in devices.items() if c == hw_class) for hw_class in fleet.classes)


async def roll_out(
    operator: Session,
    fleet: Fleet,
    wire: Wire,
    model: DemoModel,
    *,
    rollout_id: str,
    waves: tuple[float, ...] = (100.0,),
    canaries: tuple[str, ...] = (),
    expect: Phase = Phase.COMPLETED,
    classes: tuple[str, ...] | None = None,
) -> RolloutStatus:
    """Publish ``model`` and a signed spec for ``classes`` (the fleet's, by default);
    wait for the rollout's final status."""
    await start_rollout(
        operator,
        fleet.home,
        model.path,
        rollout_id=rollout_id,
        name=model.name,
        profiles=profiles(fleet),
        classes=tuple(fleet.classes) if classes is None else classes,
        waves=waves,
        canaries=canaries,
    )
    status = await wire.until(
        lambda: wire.final_status(rollout_id), what=f"rollout {rollout_id} to end"
    )
    assert status.phase is expect, f"{rollout_id}: {status.phase} ({status.reason})"
    return status


def release_id(model: DemoModel, variant: str = "fp32") -> str:
    return f"{model.name}:{variant}@{model.sha256[:12]}"


def audit_log(fleet: Fleet) -> list[dict[str, Any]]:
    """The coordinator's audit log, read from its store (once it stopped)."""
    store = CoordinatorStore(fleet.workdir / "coordinator" / "coordinator.json")
    try:
        return store.audit_log()
    finally:
        store.close()


def outbox_rows(path: Path) -> list[tuple[int, str, bytes]]:
    """``(id, kind, payload)`` of what waits in an agent's outbox (a second reader)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT id, kind, payload FROM outbox ORDER BY id").fetchall()
    finally:
        db.close()
    return [(int(r[0]), str(r[1]), bytes(r[2])) for r in rows]


async def eventually(
    probe: Callable[[], Awaitable[T | None]], *, what: str, timeout: float = ROLLOUT_TIMEOUT_S
) -> T:
    """The first truthy result of an async ``probe`` (for state outside the wire, such
    as an agent's outbox), polled; fails after ``timeout`` (a hang guard only)."""
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            msg = f"timed out after {timeout:g} s waiting for {what}"
            raise AssertionError(msg)
        await asyncio.sleep(0.1)


def settled(stage: Stage) -> bool:
    return stage in (Stage.SERVING, Stage.DEGRADED, Stage.IDLE)


# -- manifests signed by hand ------------------------------------------------------------


def profiles(fleet: Fleet) -> dict[str, ClassProfile]:
    return fleet.class_profiles()


def variant_of(model: DemoModel, label: str = "fp32") -> Variant:
    """``model`` as one variant of a spec, its I/O read from the file."""
    facts = ModelFacts(model.path.read_bytes())
    return Variant(
        label=label,
        artifact=ArtifactRef(sha256=model.sha256, size=model.size),
        inputs=facts.inputs,
        outputs=facts.outputs,
    )


def release_for(model: DemoModel, profile: ClassProfile) -> Release:
    """The release the coordinator would build for ``model`` in ``profile``'s class."""
    return profile.release(model.name, variant_of(model))


def manifest(
    hw_class: str,
    seq: int,
    stable: Release | None,
    *,
    ttl_s: float = 3600.0,
    issued_at: float | None = None,
) -> Manifest:
    now = time.time() if issued_at is None else issued_at
    return Manifest(
        hw_class=hw_class, seq=seq, issued_at=now, expires_at=now + ttl_s, stable=stable
    )


def sign(doc: Manifest, *keys: KeyPair) -> bytes:
    return seal(MANIFEST_KIND, encode(doc), list(keys))


def add_test_accounts(fleet: Fleet) -> None:
    """Give a set-up fleet the tests' accounts and wait until its broker accepts them."""
    for name in ADMIN_ACCOUNTS:
        fleet.home.add_account(name, "admin")
    for name in WIRE_ACCOUNTS:
        fleet.home.add_account(name, "operator")
    material = fleet.home.broker_material()
    fleet.broker.reload(acl=material.acl, passwords=material.passwords, crl=material.crl)
    run(_await_login(fleet.home, WIRE_ACCOUNTS[-1]))


async def _await_login(home: Home, account: str) -> None:
    """SIGHUP is asynchronous: retry until the reloaded password file accepts ``account``."""
    async with asyncio.timeout(10):
        while True:
            try:
                async with Session(home.service_endpoint(account), client_id=account):
                    return
            except ConnectRefused:
                await asyncio.sleep(0.05)


def coordinator_session(home: Home, account: str = ADMIN_ACCOUNTS[0]) -> Session:
    """A session with the coordinator's rights (it may write manifests) on an account of
    its own (one of ``ADMIN_ACCOUNTS``), so the running coordinator keeps its session."""
    assert account in ADMIN_ACCOUNTS, f"{account} is not a test admin account"
    return Session(home.service_endpoint(account), client_id=account)


async def publish_fetchable(
    cloud: Session, data: bytes, *, name: str, chunk_size: int = DEFAULT_CHUNK_BYTES
) -> ArtifactMeta:
    """Publish an artifact where devices fetch it (``artifacts/``), chunks then meta, as
    the coordinator does after admission: for tests that run agents without one.
    ``cloud`` is a :func:`coordinator_session` (operators may only write ``staging/``)."""
    meta, chunks = split_artifact(data, name=name, chunk_size=chunk_size)
    await asyncio.gather(
        *(
            cloud.publish(topics.artifact_chunk(meta.sha256, i), chunk, retain=True)
            for i, chunk in enumerate(chunks)
        )
    )
    await cloud.publish(topics.artifact_meta(meta.sha256), encode(meta), retain=True)
    return meta


async def publish_manifest(session: Session, hw_class: str, payload: bytes) -> None:
    await session.publish(topics.class_manifest(hw_class), payload, retain=True)


def manifest_key(home: Home) -> KeyPair:
    return home.key(Role.MANIFEST)


# -- what crosses the broker --------------------------------------------------------------


DEFAULT_FILTERS: Final = (
    topics.all_rollout_statuses(),
    topics.all_class_manifests(),
    *(topics.all_devices(c) for c in DeviceChannel),
)


@dataclass
class SeenManifest:
    payload: bytes
    verified: Manifest | None
    rejected: RejectedError | None
    at: float = field(default_factory=time.monotonic)
    """When the wire received it (monotonic)."""


@dataclass
class Wire:
    """Follows the broker as a dashboard does, and reads manifests as a device does.

    Retained manifests re-asserted unchanged (identical bytes) are recorded once.
    ``on_status`` hooks run as each rollout status arrives, in arrival order.
    """

    home: Home
    raw: list[Message] = field(default_factory=list)
    undecodable: list[Message] = field(default_factory=list)
    statuses: dict[str, list[RolloutStatus]] = field(default_factory=dict)
    manifests: dict[str, list[SeenManifest]] = field(default_factory=dict)
    states: dict[str, DeviceState] = field(default_factory=dict)
    presence: dict[str, bytes] = field(default_factory=dict)
    health: dict[str, HealthReport] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    telemetry: dict[str, TelemetrySummary] = field(default_factory=dict)
    on_status: list[Callable[[RolloutStatus], None]] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _devices: dict[str, TrustedState] = field(default_factory=dict)
    _applied: dict[str, int] = field(default_factory=dict)

    _task: asyncio.Task[None] | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        home: Home,
        *,
        filters: tuple[str, ...] = DEFAULT_FILTERS,
        persistent: bool = False,
    ) -> AsyncIterator[Wire]:
        """Follow ``filters`` on the first of ``WIRE_ACCOUNTS`` no open wire uses."""
        account = next(a for a in WIRE_ACCOUNTS if (home.root, a) not in _wires_open)
        wire = cls(home)
        session = Session(
            home.service_endpoint(account),
            client_id=account,
            clean_start=not persistent,
            session_expiry=600 if persistent else 0,
        )
        _wires_open.add((home.root, account))
        try:
            async with session:
                await session.subscribe(*filters)
                task = wire._task = asyncio.create_task(wire._follow(session))
                try:
                    yield wire
                finally:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        finally:
            _wires_open.discard((home.root, account))

    async def _follow(self, session: Session) -> None:
        async for message in session.messages():
            self.raw.append(message)
            if message.payload:
                try:
                    self._record(message)
                except RejectedError:
                    self.undecodable.append(message)
            self._changed.set()

    def _record(self, message: Message) -> None:
        parsed = topics.parse(message.topic)
        payload = message.payload
        if parsed.kind is TopicKind.ROLLOUT_STATUS:
            status = decode(payload, RolloutStatus)
            self.statuses.setdefault(status.id, []).append(status)
            for hook in self.on_status:
                hook(status)
        elif parsed.kind is TopicKind.CLASS_MANIFEST and parsed.name is not None:
            self._as_device(parsed.name, payload)
        elif parsed.kind is TopicKind.DEVICE and parsed.name is not None:
            device_id = parsed.name
            match parsed.channel:
                case DeviceChannel.STATE:
                    self.states[device_id] = decode(payload, DeviceState)
                case DeviceChannel.PRESENCE:
                    self.presence[device_id] = payload
                case DeviceChannel.HEALTH:
                    self.health[device_id] = decode(payload, HealthReport)
                case DeviceChannel.EVENTS:
                    self.events.append(decode(payload, Event))
                case DeviceChannel.TELEMETRY:
                    summary = decode(payload, TelemetrySummary)
                    self.telemetry[summary.summary_id] = summary

    def _as_device(self, hw_class: str, payload: bytes) -> None:
        seen = self.manifests.setdefault(hw_class, [])
        if seen and seen[-1].payload == payload:
            return  # a re-assert of the retained manifest
        trusted = self._devices.get(hw_class)
        if trusted is None:
            trusted = TrustedState(self.home.root_public_keys())
            trusted.update_trust(self.home.trust(), now=time.time())
            self._devices[hw_class] = trusted
        try:
            verified = trusted.verify_manifest(
                payload,
                hw_class=hw_class,
                applied_seq=self._applied.get(hw_class, 0),
                now=time.time(),
            )
        except RejectedError as exc:
            seen.append(SeenManifest(payload, None, exc))
        else:
            self._applied[hw_class] = verified.seq
            seen.append(SeenManifest(payload, verified, None))

    # -- waiting --------------------------------------------------------------------------

    async def until(
        self, probe: Callable[[], T | None], *, what: str, timeout: float = ROLLOUT_TIMEOUT_S
    ) -> T:
        """The first truthy result of ``probe``, re-checked on every message and every
        quarter second. Fails the test after ``timeout`` (a hang guard only)."""
        deadline = time.monotonic() + timeout
        while True:
            self._changed.clear()
            if self._task is not None and self._task.done():
                await self._task  # the watcher failed: raise why
                msg = "the watcher's session ended"
                raise AssertionError(msg)
            result = probe()
            if result:
                return result
            left = deadline - time.monotonic()
            if left <= 0:
                msg = f"timed out after {timeout:g} s waiting for {what}"
                raise AssertionError(msg)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(0.25, left)):
                    await self._changed.wait()

    # -- views ------------------------------------------------------------------------

    def final_status(self, rollout_id: str) -> RolloutStatus | None:
        history = self.statuses.get(rollout_id, [])
        if history and history[-1].phase.final:
            return history[-1]
        return None

    def waves_seen(self, rollout_id: str) -> list[int]:
        """Wave indexes of a rollout's statuses in arrival order, repeats collapsed."""
        waves: list[int] = []
        for status in self.statuses.get(rollout_id, []):
            if not waves or waves[-1] != status.wave:
                waves.append(status.wave)
        return waves

    def verified_manifests(self, hw_class: str) -> list[Manifest]:
        """The class's manifests as a device accepted them; fails on any rejected one."""
        out: list[Manifest] = []
        history = self.manifests.get(hw_class, [])
        for seen in history:
            assert seen.rejected is None, (
                f"{hw_class}: a device rejects {seen.rejected}; manifests seen: "
                + "; ".join(_describe(s.payload) for s in history)
            )
            assert seen.verified is not None
            out.append(seen.verified)
        return out


def _describe(payload: bytes) -> str:
    """seq, issue time and content of a manifest, unverified (for failure messages)."""
    try:
        doc = decode(decode(payload, Envelope).body, Manifest)
    except RejectedError as exc:
        return f"<{exc}>"
    cohort = "-" if doc.rollout is None else f"{doc.rollout.id}@{doc.rollout.cutoff_bp}"
    stable = "-" if doc.stable is None else doc.stable.release_id
    return f"seq {doc.seq} at {doc.issued_at:.3f} stable {stable} rollout {cohort}"


# -- checks shared by the rollout tests ----------------------------------------------------


@dataclass
class PromotionCheck:
    """Checks each promotion as its status arrives: the wave index moves by one, and
    every device of the finished wave's cohort already reported healthy on the
    candidate (health reports reach the watcher before the status they caused)."""

    wire: Wire
    rollout_id: str
    release: str
    classes: dict[str, str]
    """device id -> class, of the devices that are online for the whole rollout."""
    violations: list[str] = field(default_factory=list)
    promotions: list[tuple[int, int, int]] = field(default_factory=list)
    """(finished wave index, healthy, targeted) as the coordinator's reason says."""
    _wave: int | None = None

    def __call__(self, status: RolloutStatus) -> None:
        if status.id != self.rollout_id:
            return
        previous, self._wave = self._wave, status.wave
        if previous is None or status.wave == previous:
            return
        if status.wave != previous + 1:
            self.violations.append(f"wave went from {previous} to {status.wave}")
            return
        match = _PROMOTION.search(status.reason or "")
        if match is None:
            self.violations.append(f"promotion to {status.wave} without a reason: {status}")
            return
        number, healthy, targeted = (int(g) for g in match.groups())
        self.promotions.append((number - 1, healthy, targeted))
        if number != previous + 1 or targeted < 1 or healthy < targeted:
            self.violations.append(f"promoted past wave {previous}: {status.reason}")
        for device_id in self.cohort(previous):
            report = self.wire.health.get(device_id)
            if (
                report is None
                or report.rollout_id != self.rollout_id
                or report.release != self.release
                or report.verdict.value != "healthy"
            ):
                self.violations.append(
                    f"wave {previous} promoted before {device_id} reported healthy: {report}"
                )

    def cohort(self, wave: int) -> set[str]:
        """Devices targeted in ``wave``, per the manifests the devices got for it."""
        cutoff = WAVE_CUTOFFS[wave]
        members: set[str] = set()
        for hw_class in set(self.classes.values()):
            wave_manifest = next(
                (
                    s.verified
                    for s in self.wire.manifests.get(hw_class, [])
                    if s.verified is not None
                    and s.verified.rollout is not None
                    and s.verified.rollout.id == self.rollout_id
                    and s.verified.rollout.cutoff_bp == cutoff
                ),
                None,
            )
            if wave_manifest is None:
                self.violations.append(f"{hw_class}: no manifest for wave {wave}")
                continue
            members |= {
                d
                for d, c in self.classes.items()
                if c == hw_class and wave_manifest.target_for(d).rollout_id == self.rollout_id
            }
        return members


def check_wave_manifests(wire: Wire, hw_class: str, rollout_id: str, release: str) -> list[int]:
    """Assert the class's manifests went 1000/5000/10000 for the rollout and then
    promoted the candidate to stable; return the seqs (verified strictly increasing)."""
    manifests = wire.verified_manifests(hw_class)
    seqs = [m.seq for m in manifests]
    assert seqs == sorted(set(seqs)), f"{hw_class}: seq not strictly increasing: {seqs}"
    first = next(
        i for i, m in enumerate(manifests) if m.rollout is not None and m.rollout.id == rollout_id
    )
    cutoffs: list[int] = []
    promoted = None
    for m in manifests[first:]:
        if m.rollout is not None and m.rollout.id == rollout_id:
            assert promoted is None, f"{hw_class}: rollout back in a manifest after promotion"
            assert m.rollout.candidate.release_id == release
            if not cutoffs or cutoffs[-1] != m.rollout.cutoff_bp:
                cutoffs.append(m.rollout.cutoff_bp)
        elif promoted is None:
            promoted = m
    assert cutoffs == list(WAVE_CUTOFFS), f"{hw_class}: cutoffs {cutoffs}"
    assert promoted is not None, f"{hw_class}: candidate never promoted"
    assert promoted.rollout is None
    assert promoted.stable is not None
    assert promoted.stable.release_id == release
    return seqs


# -- coordinator tests: a coordinator with changed settings, specs built by hand -----------


async def stop_coordinator(fleet: Fleet) -> None:
    task = fleet.coordinator_task
    assert task is not None
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def spec_for(
    model: DemoModel,
    *,
    rollout_id: str,
    classes: tuple[str, ...],
    generation: int = 1,
    desired: Desired = Desired.ACTIVE,
    waves: tuple[float, ...] = (100.0,),
    **fields: Any,
) -> RolloutSpec:
    return RolloutSpec(
        id=rollout_id,
        generation=generation,
        desired=desired,
        classes=classes,
        candidate=Candidate(name=model.name, variants=(variant_of(model),)),
        waves_percent=waves,
        issued_at=time.time(),
        operator=OPERATOR,
        **fields,
    )


def signed_spec(home: Home, spec: RolloutSpec) -> bytes:
    return seal(ROLLOUT_SPEC_KIND, encode(spec), [home.key(Role.OPERATOR)])


async def publish_spec(operator: Session, home: Home, spec: RolloutSpec) -> bytes:
    """Sign and publish (retained); returns the exact bytes published."""
    payload = signed_spec(home, spec)
    await operator.publish(topics.rollout_spec(spec.id), payload, retain=True)
    return payload


def wipe_broker(fleet: Fleet) -> None:
    """Kill the broker and start it with no persistence: every retained message and
    every session is gone, as after a crash before its autosave."""
    fleet.broker.kill()
    for path in fleet.broker.folder.rglob("*.db"):
        path.unlink()
    fleet.broker.start()
