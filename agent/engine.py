"""The agent's update engine, sans-IO: events in, commands out.

Theory of operation. Like h11's connection object, the engine does no I/O and reads no
clock: the service hands it events (:mod:`agent.events`: a manifest's target, the result
of a fetch, a load, a self-test, each inference, the passing of time, storage trouble)
and carries out the commands it returns, in order. Everything that decides the update
lifecycle lives here, so it is tested in milliseconds with ``now`` made up:

* the stage, by the table of :mod:`agent.lifecycle`; an update in flight is ``_work``,
  present exactly while the stage is in flight (FETCHING, LOADING, SOAKING);
* which target supersedes work in flight (a re-signed manifest or a promotion of the
  candidate being soaked does not), and putting the previous model back whenever an
  update that swapped ends without a healthy verdict (one place: :meth:`_end`);
* the soak: counted from the inferences of the model under test, judged by
  :func:`agent.health.judge` once ready or at its deadline;
* which failures are verdicts (a model that does not load or fails its self-test)
  and which are retried after a backoff (a timeout, bytes that do not match, the
  agent's own trouble); failed releases are not tried again in their scope;
* the crash-loop guard: ``Memory.soaking`` records a soak (written before the swap); a
  start that finds it open fails the release (``crashed_during_soak``) and reverts;
* the ``degraded`` mode: storage trouble (which parts fail, since when), a model that
  serves on a fallback execution provider, or one that does not load with none serving.

Results of work carry their ``attempt``: one of work superseded meanwhile is ignored.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

from agent.events import (
    NOTHING,
    Cancel,
    Command,
    Desired,
    Emit,
    EngineEvent,
    FailedRelease,
    Failure,
    FailureKind,
    Fetch,
    Fetched,
    Inferred,
    Load,
    Loaded,
    Log,
    Memory,
    Note,
    Persist,
    Report,
    Restored,
    Revert,
    SelfTest,
    SelfTested,
    StateChanged,
    Stopping,
    StorageFailed,
    StorageOk,
    StoragePart,
    Swap,
    Targeted,
    Tick,
)
from agent.health import SoakStats, code_of, health_report, judge
from agent.lifecycle import Stage, Step, advance
from agent.limits import Limits
from agent.trouble import ModelTrouble, StorageTrouble
from broker.backoff import Backoff, Retry
from schemas import EventKind, HealthReport, Mode, Reason, Release, Verdict
from schemas.device import MAX_REASON_CHARS
from schemas.errors import bound_text

__all__ = ["UpdateEngine"]


@dataclass
class _Work:
    """An update in flight."""

    attempt: int
    desired: Desired
    previous: Release | None
    """The model served when it began, put back unless it ends healthy."""
    golden: SelfTest | None = None
    fallback: str | None = None
    """Why the loaded model runs on a later provider than its first, if it does."""
    soak: SoakStats | None = None
    """Set once swapped in: from then on the previous model is not serving."""
    deadline: float = 0.0

    @property
    def release(self) -> Release:
        assert self.desired.release is not None
        return self.desired.release


class UpdateEngine:
    """The update lifecycle and storage health of one device (see the module's
    docstring). ``retry`` paces retries of failed updates; ``new_id`` names reports."""

    def __init__(
        self,
        device_id: str,
        *,
        inference_hz: float,
        retry: Retry,
        limits: Limits = Limits(),  # noqa: B008 (frozen)
        new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        self.device_id = device_id
        self._inference_hz = inference_hz
        self._retry = retry
        self._limits = limits
        self._new_id = new_id
        self._stage = Stage.IDLE
        self._active: Release | None = None
        self._models = ModelTrouble()
        self._memory = Memory()
        self._desired = NOTHING
        self._work: _Work | None = None
        self._attempts = 0
        self._retry_at: float | None = None
        self._trouble = StorageTrouble(limits.storage_reason_chars)
        self._handlers: dict[type, Callable[[EngineEvent], list[Command]]] = {
            Restored: self._on_restored,
            Targeted: self._on_targeted,
            Fetched: self._on_fetched,
            Loaded: self._on_loaded,
            SelfTested: self._on_self_tested,
            Inferred: self._on_inferred,
            Tick: self._on_tick,
            StorageFailed: self._on_storage_failed,
            StorageOk: self._on_storage_ok,
            Stopping: self._on_stopping,
        }

    @staticmethod
    def retry_policy(first_s: float, most_s: float) -> Backoff:
        """The backoff between retries of an update that failed for a passing cause."""
        return Backoff(initial=first_s, maximum=max(first_s, most_s), reset_after=most_s)

    # -- views ------------------------------------------------------------------------

    @property
    def stage(self) -> Stage:
        return self._stage

    @property
    def active(self) -> Release | None:
        """The release whose model serves."""
        return self._active

    @property
    def desired(self) -> Desired:
        return self._desired

    @property
    def attempt(self) -> int | None:
        """The attempt of the update in flight, if any."""
        return None if self._work is None else self._work.attempt

    @property
    def memory(self) -> Memory:
        return self._memory

    @property
    def mode(self) -> Mode:
        degraded = self._trouble or self._models.reason(self._active) is not None
        return Mode.DEGRADED if degraded else self._stage.mode

    @property
    def degraded_reason(self) -> str | None:
        """Why the model serves degraded (or none serves), why storage fails; or None."""
        why = [w for w in (self._models.reason(self._active), self._trouble.reason) if w]
        return bound_text("; ".join(why), MAX_REASON_CHARS) if why else None

    @property
    def trouble(self) -> dict[str, str]:
        return self._trouble.by_part()

    @property
    def wake_at(self) -> float | None:
        """When the engine wants a :class:`Tick` at the latest (a soak's deadline, a
        retry), or None."""
        times = [t for t in (self._retry_at, self._soak_deadline()) if t is not None]
        return min(times, default=None)

    def _soak_deadline(self) -> float | None:
        work = self._work
        return None if work is None or work.soak is None else work.deadline

    # -- events -----------------------------------------------------------------------

    def handle(self, event: EngineEvent) -> list[Command]:
        """The commands ``event`` calls for, to be carried out in order."""
        return self._handlers[type(event)](event)

    def _on_restored(self, event: EngineEvent) -> list[Command]:
        assert isinstance(event, Restored)
        self._memory = event.memory
        active = event.memory.active
        if event.serving and active is not None:
            self._active = active
            self._models.holding(active.artifact.sha256, event.trouble)
            self._stage = advance(self._stage, Step.SERVED, has_model=True)
        elif active is not None and event.trouble is not None:
            self._models.unloadable = f"model: {active.release_id} does not load: {event.trouble}"
        soaking = event.memory.soaking
        return [StateChanged()] if soaking is None else self._crashed(soaking, event.now)

    def _crashed(self, soaking: Desired, now: float) -> list[Command]:
        """The soak of ``soaking`` never ended: it took the agent down. The model served
        before it (the one restored) serves; the release fails in its scope."""
        self._memory = replace(self._memory, soaking=None)
        reason = Reason.CRASHED_DURING_SOAK
        report = self._report(soaking, Verdict.UNHEALTHY, (reason.value,), None, now)
        self._remember_failed(soaking)
        back = "nothing" if self._active is None else self._active.release_id
        assert soaking.release is not None
        detail = f"{soaking.release.release_id} {reason} (found at start); back to {back}"
        return [
            Revert(self._active),
            *self._step(Step.CRASHED),
            Persist(self._memory),
            Report(report),
            Emit(EventKind.ROLLBACK, reason, self._detail(detail), soaking),
        ]

    def _on_stopping(self, _event: EngineEvent) -> list[Command]:
        """An orderly stop is no crash: close the soak's record."""
        if self._memory.soaking is None:
            return []
        self._memory = replace(self._memory, soaking=None)
        return [Persist(self._memory)]

    def _on_targeted(self, event: EngineEvent) -> list[Command]:
        """Take a manifest's target. A re-signed manifest (same release and rollout,
        new seq) only updates the bookkeeping: it never supersedes work in flight, but
        it does re-arm a target the device rests without (not a failed release: that
        stays failed in its scope, see :class:`FailedRelease`)."""
        assert isinstance(event, Targeted)
        old, new = self._desired, event.desired
        self._desired = new
        if new.release is None:
            self._models.unloadable = None
        work = self._work
        promoted = (
            old.rollout_id is not None and new.rollout_id is None and new.sha256 == old.sha256
        )
        if work is not None and promoted:
            # The rollout completed while this device still works on its candidate, now
            # the stable release: finish that work rather than start it over (a crash
            # from now on fails the stable release).
            if work.soak is None:
                return []
            self._memory = replace(self._memory, soaking=new)
            return [Persist(self._memory)]
        if new.work == old.work and (work is not None or self._serves(new)):
            return []
        out: list[Command] = []
        if work is not None:
            # The work no longer matters: serve what was served before it.
            out += self._end(work, Step.SUPERSEDED)
            out += [Persist(self._memory)] if work.soak is not None else []
            self._retry.reset()
        return out + self._start()

    def _serves(self, desired: Desired) -> bool:
        active = self._active
        return desired.release is None or (
            active is not None
            and active.artifact.sha256 == desired.sha256
            and self._stage is Stage.SERVING
        )

    def _on_tick(self, event: EngineEvent) -> list[Command]:
        assert isinstance(event, Tick)
        work = self._work
        if work is not None and work.soak is not None and event.now >= work.deadline:
            return self._verdict(work, event.now)
        if work is None and self._retry_at is not None and event.now >= self._retry_at:
            return self._start()
        return []

    def _on_fetched(self, event: EngineEvent) -> list[Command]:
        assert isinstance(event, Fetched)
        work = self._current(event.attempt, Stage.FETCHING)
        if work is None:
            return []
        if event.failure is not None:
            return self._failed(work, event.failure, event.now)
        assert event.model is not None
        work.golden = SelfTest(work.attempt, event.golden)
        return [*self._step(Step.FETCHED), Load(work.attempt, work.release, event.model)]

    def _on_loaded(self, event: EngineEvent) -> list[Command]:
        assert isinstance(event, Loaded)
        work = self._current(event.attempt, Stage.LOADING)
        if work is None:
            return []
        if event.failure is not None:
            return self._failed(work, event.failure, event.now)
        assert work.golden is not None
        work.fallback = event.fallback
        return [work.golden]

    def _on_self_tested(self, event: EngineEvent) -> list[Command]:
        assert isinstance(event, SelfTested)
        work = self._current(event.attempt, Stage.LOADING)
        if work is None:
            return []
        if event.failure is not None:
            return self._failed(work, event.failure, event.now)
        release, previous = work.release, work.previous
        keep = None if previous is None else previous.artifact.sha256
        self._active = release
        self._models.holding(release.artifact.sha256, work.fallback, keep=keep)
        budget = release.health
        # A model too slow to reach min_inferences must still be judged, so the soak
        # has a deadline; judge() then reports too few inferences.
        factor = self._limits.soak_deadline_factor
        length = budget.soak_seconds + budget.min_inferences / self._inference_hz
        work.soak = SoakStats(started=event.now)
        work.deadline = event.now + length * factor + self._limits.soak_grace_s
        # The record first: the service swaps only once it is written.
        self._memory = replace(self._memory, soaking=self._desired)
        out = [Persist(self._memory), Swap(release, work.attempt, keep), *self._step(Step.LOADED)]
        if work.fallback is not None:
            out.append(Log(logging.WARNING, f"{release.release_id} degraded: {work.fallback}"))
        return out

    def _on_inferred(self, event: EngineEvent) -> list[Command]:
        assert isinstance(event, Inferred)
        work = self._work
        if work is None or work.soak is None or event.sha256 != work.desired.sha256:
            return []
        if event.latency_ms is None:
            work.soak.errors += 1
        else:
            work.soak.latencies_ms.append(event.latency_ms)
        if work.soak.ready(work.release.health, event.now):
            return self._verdict(work, event.now)
        return []

    def _on_storage_failed(self, event: EngineEvent) -> list[Command]:
        """Storage failed: the device is degraded, saying why, until a write works."""
        assert isinstance(event, StorageFailed)
        return self._trouble.failed(event.part, event.why, event.now)

    def _on_storage_ok(self, event: EngineEvent) -> list[Command]:
        assert isinstance(event, StorageOk)
        out = self._trouble.ok(event.part, event.now, self._limits.event_detail_chars)
        if out and event.part is StoragePart.ARTIFACTS and self._work is None:
            out += self._start()  # an update waiting for space goes on now
        return out

    # -- the update -------------------------------------------------------------------

    def _current(self, attempt: int, stage: Stage) -> _Work | None:
        """The work in flight if ``attempt`` is it and it waits in ``stage``."""
        work = self._work
        if work is None or work.attempt != attempt or self._stage is not stage:
            return None
        return work

    def _step(self, step: Step) -> list[Command]:
        self._stage = advance(self._stage, step, has_model=self._active is not None)
        return [StateChanged()]

    def _start(self) -> list[Command]:
        """Begin work towards the desired release, unless there is none to do."""
        self._retry_at = None
        desired, release = self._desired, self._desired.release
        if release is None:
            return []
        sha = release.artifact.sha256
        active = self._active
        if active is not None and active.artifact.sha256 == sha:
            return self._step(Step.SERVED) if self._stage is Stage.DEGRADED else []
        if FailedRelease.of(desired) in self._memory.failed:
            return []
        if sha in self._models and sha in self._memory.known_good:
            keep = None if active is None else active.artifact.sha256
            self._active = release
            self._memory = replace(self._memory, active=release)
            self._retry.reset()
            return [Swap(release, None, keep), *self._step(Step.SERVED), Persist(self._memory)]
        self._attempts += 1
        self._work = _Work(self._attempts, desired, previous=active)
        return [*self._step(Step.TARGET), Fetch(self._attempts, release)]

    def _end(self, work: _Work, step: Step) -> list[Command]:
        """End ``work`` by ``step`` without a healthy verdict: the model served before
        it serves again."""
        self._work = None
        out: list[Command] = [Cancel(work.attempt)]
        if work.soak is not None:
            self._active = work.previous
            self._memory = replace(self._memory, soaking=None)
            out.append(Revert(work.previous))
        return out + self._step(step)

    def _failed(self, work: _Work, failure: Failure, now: float) -> list[Command]:
        out = self._end(work, Step.FAILED)
        desired, limits = work.desired, self._limits
        if failure.kind is FailureKind.REJECTED:
            assert failure.reason is not None
            self._retry.reset()
            report = self._report(desired, Verdict.UNHEALTHY, (failure.reason.value,), None, now)
            self._remember_failed(desired)
            if self._active is None:
                why = f"{work.release.release_id} {failure.reason}: {failure.detail}"
                self._models.unloadable = f"model: {why}"
            return [
                *out,
                Persist(self._memory),
                Note(failure.reason, bound_text(failure.detail, limits.rejection_detail_chars)),
                Report(report),
                Emit(
                    EventKind.ARTIFACT_REJECTED,
                    failure.reason,
                    self._detail(failure.detail),
                    desired,
                ),
            ]
        self._retry_at = now + self._retry.next_delay()
        if failure.kind is FailureKind.ERROR:
            text = f"update to {work.release.release_id} failed: {failure.detail}"
            return [*out, Log(logging.ERROR, text)]
        timeout = failure.kind is FailureKind.TIMEOUT
        kind = EventKind.ARTIFACT_REJECTED if timeout else EventKind.ARTIFACT_RETRY
        reason = Reason.FETCH_TIMEOUT if timeout else failure.reason
        then = "retrying" if timeout else "dropped, fetching again"
        assert reason is not None
        detail = bound_text(f"{failure.detail}; {then}", limits.rejection_detail_chars)
        return [*out, Note(reason, detail), Emit(kind, reason, self._detail(detail), desired)]

    def _verdict(self, work: _Work, now: float) -> list[Command]:
        """Judge the soak of ``work``: keep the model, or put the previous one back.
        The report before the event: it is what the coordinator waits for."""
        assert work.soak is not None
        verdict, reasons = judge(work.soak, work.release.health)
        report = self._report(work.desired, verdict, reasons, work.soak, now)
        self._retry.reset()
        release, desired = work.release, work.desired
        if verdict is Verdict.HEALTHY:
            self._work = None
            known_good = (*self._memory.known_good, release.artifact.sha256)
            self._memory = replace(
                self._memory,
                active=release,
                known_good=known_good[-self._limits.known_good :],
                soaking=None,
            )
            applied = f"serving {release.release_id}"
            return [
                *self._step(Step.HEALTHY),
                Persist(self._memory),
                Report(report),
                Emit(EventKind.UPDATE_APPLIED, None, self._detail(applied), desired),
            ]
        out = self._end(work, Step.UNHEALTHY)
        self._remember_failed(desired)
        back = work.previous.release_id if work.previous is not None else "nothing"
        detail = f"{release.release_id} unhealthy ({', '.join(reasons)}); back to {back}"
        return [
            *out,
            Persist(self._memory),
            Report(report),
            Emit(EventKind.ROLLBACK, code_of(reasons[0]), self._detail(detail), desired),
        ]

    def _remember_failed(self, desired: Desired) -> None:
        failed = (*self._memory.failed, FailedRelease.of(desired))
        self._memory = replace(self._memory, failed=failed[-self._limits.failed :])

    def _report(
        self,
        desired: Desired,
        verdict: Verdict,
        reasons: tuple[str, ...],
        stats: SoakStats | None,
        now: float,
    ) -> HealthReport:
        report = health_report(
            desired,
            report_id=self._new_id(),
            device_id=self.device_id,
            judged=(verdict, reasons),
            stats=stats,
            now=now,
        )
        self._memory = replace(self._memory, last_health=report)
        return report

    def _detail(self, text: str) -> str:
        return bound_text(text, self._limits.event_detail_chars)
