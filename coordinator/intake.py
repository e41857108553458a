"""Spec intake carried out: :data:`coordinator.specs.TABLE` decides what spec bytes call
for; this stores, validates (fetching the artifacts), and publishes.

Concurrency. Specs are handled in tasks of their own while ticks run. The verdict is
taken, and the records written, under the rollout lock (re-reading the record inside
it); publishes come after it. A spec being validated reserves its classes and its id: a
newer generation arriving meanwhile is held and applied once the first is admitted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from broker.fetch import FetchFailed
from broker.transport import TransportError
from coordinator import specs
from coordinator.admission import Selection, select_releases
from coordinator.core import Core
from coordinator.fetching import Fetcher
from coordinator.keeper import Keeper
from coordinator.reasons import RolloutReason
from coordinator.signer import Signer
from coordinator.specs import Arrival, Claim, Verdict
from coordinator.store import Refusal
from schemas import Cause, Phase, RejectedError, RolloutSpec, topics

__all__ = ["Intake"]

log = logging.getLogger(__name__)


class Intake:
    def __init__(self, core: Core, fetcher: Fetcher, keeper: Keeper, signer: Signer) -> None:
        self._core = core
        self._fetcher = fetcher
        self._keeper = keeper
        self._signer = signer
        self._held: dict[str, tuple[RolloutSpec, bytes]] = {}
        """The newest generation of a spec that arrived while its first was validated."""
        self._deferred: dict[str, bytes] = {}
        """Specs whose validation met a broken connection: retried on the next one."""
        self._noted: set[tuple[str, str]] = set()
        """(rollout id, payload digest) of unwanted spec bytes already logged."""
        self._recorders: dict[Verdict, Callable[[RolloutSpec, bytes, float], Awaitable[None]]]
        self._recorders = {
            Verdict.NEW_GENERATION: self._new_generation,
            Verdict.HOLD: self._hold,
            Verdict.FINISHED: self._finished,
            Verdict.ABORTED: self._aborted,
            Verdict.REJECT: self._reject,
            Verdict.ADMIT: self._claim,
        }
        """What a verified spec's verdict stores or reserves, under the rollout lock."""

    def retry_deferred(self) -> None:
        """Specs whose validation the link cut short: tried again once it is back."""
        deferred, self._deferred = self._deferred, {}
        for rollout_id, payload in deferred.items():
            self.take(rollout_id, payload)

    def take(self, rollout_id: str, payload: bytes) -> None:
        """Handle a spec beside the caller. It is arriving from now until it is recorded:
        meanwhile no kept artifact is pruned (``Keeper.arrivals``)."""
        arrivals = self._keeper.arrivals
        arrivals.add()
        if self._core.spawn(f"spec {rollout_id}", self._handle(rollout_id, payload)) is None:
            arrivals.done()

    @property
    def deferred(self) -> bool:
        return bool(self._deferred)

    async def on_spec(self, rollout_id: str, payload: bytes) -> None:
        """Handle a spec, as :meth:`take` does, and wait for it."""
        self._keeper.arrivals.add()
        await self._handle(rollout_id, payload)

    async def _handle(self, rollout_id: str, payload: bytes) -> None:
        """Record a spec that arrives (then it no longer does), then act on it."""
        try:
            verdict, arrival, now = await self._arrive(rollout_id, payload)
        finally:
            self._keeper.arrivals.done()
        await self._after(verdict, arrival, now)

    async def _arrive(self, rollout_id: str, payload: bytes) -> tuple[Verdict, Arrival, float]:
        """Read and record a spec: its verdict, what it is, and when."""
        core = self._core
        # Not before this connection's cache was read: a spec whose rollout already
        # finished is told by its retained status.
        await core.ready.wait()
        now = core.clock()
        async with core.rollout_lock:
            record = core.rollouts.get(rollout_id)
            # In a thread: an Ed25519 check and the decoding of up to 1 MiB (a few hundred
            # microseconds to milliseconds) stay off the event loop that ingests the fleet.
            arrival = await asyncio.to_thread(
                specs.read,
                core.trusted,
                rollout_id,
                payload,
                None if record is None else record.spec,
                now,
            )
            verdict = specs.TABLE[(arrival.kind, self._standing(arrival))]
            await self._record(verdict, arrival, now)
        return verdict, arrival, now

    def _standing(self, arrival: Arrival) -> specs.Standing:
        core = self._core
        spec = arrival.spec
        finished = specs.retained_status(core.retained_statuses.get(arrival.rollout_id))
        conflicts = spec is not None and bool(
            specs.claim_problems(spec, core.config.profiles, core.rollouts.values(), core.claims)
        )
        return specs.standing(
            arrival,
            record=core.rollouts.get(arrival.rollout_id),
            refusal=core.refusals.get(arrival.rollout_id),
            validating=arrival.rollout_id in core.claims,
            finished=finished if finished is not None and finished.phase.final else None,
            conflicts=conflicts,
            reason_chars=core.limits.reason_chars,
        )

    async def _record(self, verdict: Verdict, arrival: Arrival, now: float) -> None:
        """The verdict's store writes and reservations, under the rollout lock."""
        if verdict is Verdict.REFUSE:
            await self._refuse(arrival, now)
            return
        step = self._recorders.get(verdict)
        if step is not None and arrival.spec is not None:
            await step(arrival.spec, arrival.payload, now)

    async def _new_generation(self, spec: RolloutSpec, payload: bytes, now: float) -> None:  # noqa: ARG002 (a recorder)
        core = self._core
        record = core.rollouts[spec.id]
        detail = f"desired {spec.desired.value}"
        if record.phase.final:
            detail += f" (rollout already {record.phase.value})"
        await core.save(specs.new_generation(record, spec, payload), "spec_generation", detail)

    async def _hold(self, spec: RolloutSpec, payload: bytes, now: float) -> None:  # noqa: ARG002 (a recorder)
        held = self._held.get(spec.id)
        if held is None or spec.generation > held[0].generation:
            self._held[spec.id] = (spec, payload)

    async def _finished(self, spec: RolloutSpec, payload: bytes, now: float) -> None:
        core = self._core
        status = specs.retained_status(core.retained_statuses.get(spec.id))
        assert status is not None  # the standing said so, under this lock
        finished = specs.finished_record(spec, payload, now, status, core.config.profiles)
        await core.save(finished, "recovered", f"its retained status says {status.phase.value}")
        log.warning(
            "coordinator: rollout %s recorded as %s from its retained status, not admitted again",
            spec.id,
            status.phase.value,
        )

    async def _aborted(self, spec: RolloutSpec, payload: bytes, now: float) -> None:
        """Aborted before it was ever admitted: recorded, never validated, no manifest
        names it."""
        core = self._core
        aborted = specs.new_record(
            spec,
            payload,
            now,
            Phase.ROLLED_BACK,
            profiles=core.config.profiles,
            candidates={},
            reason=RolloutReason(cause=Cause.OPERATOR_ABORT),
        )
        await core.save(aborted, "aborted", "before admission")

    async def _reject(self, spec: RolloutSpec, payload: bytes, now: float) -> None:
        core = self._core
        problems = specs.claim_problems(
            spec, core.config.profiles, core.rollouts.values(), core.claims
        )
        # Problems quote the spec (class names): bounded where rendered.
        why = RolloutReason(
            cause=Cause.CLASSES_UNAVAILABLE,
            problems=tuple(problems),
            chars=core.limits.reason_chars,
        )
        rejected = specs.new_record(
            spec,
            payload,
            now,
            Phase.REJECTED,
            profiles=core.config.profiles,
            candidates={},
            reason=why,
        )
        await core.save(rejected, "rejected", rejected.reason or "")
        core.named |= spec.candidate.artifacts()

    async def _claim(self, spec: RolloutSpec, payload: bytes, now: float) -> None:  # noqa: ARG002 (a recorder)
        """Reserve the classes and artifacts of a spec about to be validated."""
        self._core.claims[spec.id] = Claim(frozenset(spec.classes), spec.candidate.artifacts())

    async def _after(self, verdict: Verdict, arrival: Arrival, now: float) -> None:
        """The verdict's publishes (and the validation), after the rollout lock."""
        core = self._core
        match verdict:
            case Verdict.IGNORE | Verdict.HOLD | Verdict.FINISHED:
                # Finished: its retained status already says so.
                return
            case Verdict.REASSERT:
                await self._reassert_spec(arrival)
                if arrival.spec is None:
                    return
            case Verdict.REFUSE:
                await core.publish_status(arrival.rollout_id)
                await self._forget_refusals()
                return
            case Verdict.ADMIT:
                assert arrival.spec is not None  # a verified spec's verdict
                await self._admit(arrival.spec, arrival.payload, now)
            case _:
                core.changed.set()
        await core.publish_status(arrival.rollout_id)

    async def _reassert_spec(self, arrival: Arrival) -> None:
        """The broker's cache holds other bytes than the rollout acted on: put them back."""
        core = self._core
        record = core.rollouts.get(arrival.rollout_id)
        if record is None:
            return
        noted = (arrival.rollout_id, specs.digest(arrival.payload))
        if noted not in self._noted and arrival.problem is not None:
            log.warning(
                "coordinator: the broker's spec of %s is not the one acted on (%s): "
                "re-asserting it",
                arrival.rollout_id,
                arrival.problem.detail,
            )
        if len(self._noted) >= core.limits.noted_kept:
            self._noted.clear()
        self._noted.add(noted)
        await core.publish(topics.rollout_spec(arrival.rollout_id), record.spec)

    async def _refuse(self, arrival: Arrival, now: float) -> None:
        """Store the refusal, so that it is reported once, not on every redelivery."""
        core = self._core
        assert arrival.problem is not None  # unverified bytes say why
        reason = arrival.problem.text(core.limits.reason_chars)
        log.warning("coordinator: rollout %s: %s", arrival.rollout_id, reason)
        refusal = Refusal(
            id=arrival.rollout_id, digest=specs.digest(arrival.payload), reason=reason, at=now
        )
        await core.write(core.store.put_refusal, refusal)
        core.refusals[refusal.id] = refusal
        await core.audit("spec_rejected", refusal.id, reason)

    async def _forget_refusals(self) -> None:
        """Drop the oldest refusals beyond the limit, and their junk spec and status
        from the broker."""
        core = self._core
        kept = core.limits.refusals_kept
        for rollout_id in specs.refusals_to_forget(core.refusals, kept):
            async with core.rollout_lock:
                if core.refusals.pop(rollout_id, None) is None:
                    continue
                await core.write(core.store.remove_refusal, rollout_id)
            log.info("coordinator: forgetting refused spec %s (keeping %d)", rollout_id, kept)
            await core.publish(topics.rollout_status(rollout_id), b"")
            await core.publish(topics.rollout_spec(rollout_id), b"")

    async def _admit(self, spec: RolloutSpec, payload: bytes, now: float) -> None:
        """Validate a claimed spec's candidate against the class profiles and record
        it: WAVE (or PAUSED, as the spec wishes), or REJECTED with reasons, before any
        device sees it. A generation held meanwhile is applied before any manifest."""
        core = self._core
        try:
            selection = await self._validate(spec)
        except TransportError as exc:
            log.warning("coordinator: spec %s deferred to the next connection: %s", spec.id, exc)
            async with core.rollout_lock:
                core.claims.pop(spec.id, None)
                held = self._held.pop(spec.id, None)
                self._deferred[spec.id] = payload if held is None else held[1]
            await core.audit("spec_deferred", spec.id, str(exc))
            return
        for note in selection.notes:
            await core.audit("gate", spec.id, note)
        async with core.rollout_lock:
            core.claims.pop(spec.id, None)
            held = self._held.pop(spec.id, None)
            newest, newest_payload = (
                held
                if held is not None and held[0].generation > spec.generation
                else (spec, payload)
            )
            refusal = selection.refusal(core.limits.reason_chars)
            phase, reason = specs.admitted_phase(refusal, newest)
            reached: dict[str, int] = {}
            if phase is Phase.WAVE:
                status = specs.retained_status(core.retained_statuses.get(spec.id))
                reached = specs.retained_waves(status, newest)
                if reached:
                    log.warning(
                        "coordinator: rollout %s resumes at its retained status's waves: %s",
                        spec.id,
                        ", ".join(f"{name} {wave + 1}" for name, wave in sorted(reached.items())),
                    )
            record = specs.new_record(
                spec,
                payload,
                now,
                phase,
                profiles=core.config.profiles,
                candidates=selection.releases,
                reason=reason,
                reached=reached,
            ).model_copy(
                update={
                    "generation": newest.generation,
                    "desired": newest.desired,
                    "spec": newest_payload,
                }
            )
            verdict = "admitted" if refusal is None else "rejected"
            await core.save(record, verdict, record.reason or phase.value)
        await self._publish_admitted(spec, record.phase, rejected=refusal is not None)

    async def _publish_admitted(self, spec: RolloutSpec, phase: Phase, *, rejected: bool) -> None:
        core = self._core
        shas = set(spec.candidate.artifacts())
        core.named |= shas
        if phase in (Phase.WAVE, Phase.PAUSED):
            # Devices fetch only what the coordinator checked and published itself,
            # before any manifest names it.
            await self._keeper.publish_checked(shas)
        else:
            await self._keeper.clear_uploads(shas)
        core.changed.set()
        await self._signer.sync()
        if rejected:
            await self._keeper.prune()

    async def _validate(self, spec: RolloutSpec) -> Selection:
        """Fetch every artifact the candidate names and each gated class's stable model,
        then select a release per class (``coordinator.admission``, in a thread).

        Raises: TransportError when the broker could not be asked for an artifact.
        """
        core = self._core
        refs = [v.artifact for v in spec.candidate.variants]
        refs += [v.golden for v in spec.candidate.variants if v.golden is not None]
        gated = [
            (name, record.stable)
            for name in spec.classes
            if core.config.profiles[name].gate is not None
            and (record := core.classes.get(name)) is not None
            and record.stable is not None
        ]
        try:
            blobs = {ref.sha256: await self._fetcher.get(ref) for ref in refs}
            stables = {
                name: (stable, await self._fetcher.get(stable.artifact)) for name, stable in gated
            }
        except (RejectedError, FetchFailed, TimeoutError) as exc:
            problem = f"artifact: {str(exc) or 'not found in time'}"
            return Selection({}, (problem,), (), Cause.ARTIFACT_UNAVAILABLE)
        return await asyncio.to_thread(
            select_releases,
            spec,
            blobs,
            stables,
            core.config.profiles,
            core.config.datasets_dir,
        )
