"""The update engine alone: events in, commands out, ``now`` made up. No event loop,
no model, no disk, no broker; each path of the lifecycle in milliseconds."""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from agent.engine import UpdateEngine
from agent.events import (
    NOTHING,
    Cancel,
    Command,
    Desired,
    Emit,
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
from agent.health import HealthCode
from agent.lifecycle import Stage
from agent.limits import Limits
from broker.backoff import Backoff, Retry
from schemas import (
    ArtifactRef,
    EventKind,
    HealthBudget,
    Mode,
    Reason,
    Release,
    Runtime,
    TensorSpec,
    Verdict,
)

DEVICE = "jetson-000"
HZ = 10.0
BUDGET = HealthBudget(max_error_rate=0.1, p95_latency_ms=10.0, min_inferences=5, soak_seconds=2.0)
MODEL = Path("/models/m.onnx")


def release(name: str, **budget: float) -> Release:
    return Release(
        name=name,
        artifact=ArtifactRef(sha256=hashlib.sha256(name.encode()).hexdigest(), size=1000),
        runtime=Runtime(providers=("CPUExecutionProvider",)),
        inputs=(TensorSpec(name="x", dtype="float32", shape=("N", 64)),),
        outputs=(TensorSpec(name="y", dtype="float32", shape=("N", 10)),),
        health=BUDGET.model_copy(update=budget),
    )


V1, V2, V3 = release("v1"), release("v2"), release("v3")


def engine(limits: Limits = Limits()) -> UpdateEngine:  # noqa: B008 (frozen)
    ids = (f"report-{n}" for n in itertools.count())
    # No jitter: a retry comes exactly 1 s, then 2 s, ... after a failure.
    retry = Retry(Backoff(initial=1.0, maximum=8.0), rand=lambda: 0.0)
    return UpdateEngine(DEVICE, inference_hz=HZ, retry=retry, limits=limits, new_id=ids.__next__)


C = TypeVar("C")


def of(commands: list[Command], kind: type[C]) -> list[C]:
    return [c for c in commands if isinstance(c, kind)]


def one(commands: list[Command], kind: type[C]) -> C:
    (found,) = of(commands, kind)
    return found


def serving(release: Release | None = None, **memory: Any) -> UpdateEngine:
    """An engine restarted with ``release`` loaded and serving."""
    e = engine()
    kept = Memory(active=release, known_good=() if release is None else (sha(release),))
    e.handle(Restored(replace(kept, **memory), serving=release is not None, now=0))
    return e


# Reading a property again through a function: mypy would keep an earlier assertion's
# narrowing of it, though the engine changed it meanwhile.
def stage_of(e: UpdateEngine) -> Stage:
    return e.stage


def mode_of(e: UpdateEngine) -> Mode:
    return e.mode


def reason_of(e: UpdateEngine) -> str | None:
    return e.degraded_reason


def sha(release: Release) -> str:
    return release.artifact.sha256


def stable(release: Release | None, seq: int) -> Desired:
    return Desired(release, None, seq)


def candidate(release: Release, seq: int, rollout: str = "r1") -> Desired:
    return Desired(release, rollout, seq)


def to_soak(e: UpdateEngine, desired: Desired, now: float = 0.0) -> int:
    """Target ``desired`` and walk its fetch, load and self-test; the attempt."""
    fetch = one(e.handle(Targeted(desired, now)), Fetch)
    assert fetch.release == desired.release
    load = one(e.handle(Fetched(fetch.attempt, now, model=MODEL)), Load)
    assert load.model == MODEL
    test = one(e.handle(Loaded(fetch.attempt, now)), SelfTest)
    assert test.golden is None
    swapped = e.handle(SelfTested(fetch.attempt, now))
    assert one(swapped, Swap).release == desired.release
    assert e.stage is Stage.SOAKING
    return fetch.attempt


def infer(e: UpdateEngine, release: Release, n: int, now: float, ms: float = 1.0) -> list[Command]:
    out: list[Command] = []
    for _ in range(n):
        out += e.handle(Inferred(sha(release), ((ms, 1),), 0, now))
    return out


# -- installs and upgrades ---------------------------------------------------------------


def test_fresh_install_soaks_and_reports_healthy() -> None:
    e = serving()
    assert e.stage is Stage.IDLE
    attempt = to_soak(e, stable(V1, 1), now=100.0)
    assert e.active == V1
    assert e.mode is Mode.UPDATING
    assert infer(e, V1, 10, now=101.0) == [], "not soaked long enough"
    done = infer(e, V1, 1, now=102.0)
    assert stage_of(e) is Stage.SERVING
    report = one(done, Report).report
    assert (report.verdict, report.release, report.manifest_seq) == (
        Verdict.HEALTHY,
        V1.release_id,
        1,
    )
    assert report.inferences == 11
    assert report.soak_seconds == 2.0
    assert report.rollout_id is None
    assert one(done, Emit).kind is EventKind.UPDATE_APPLIED
    memory = one(done, Persist).memory
    assert memory.active == V1
    assert memory.known_good == (sha(V1),)
    assert memory.last_health == report
    # The report goes out before the event: it is what the coordinator waits for.
    kinds = [type(c) for c in done]
    assert kinds.index(Persist) < kinds.index(Report) < kinds.index(Emit)
    assert attempt == 1


def test_upgrade_keeps_the_previous_model_loaded_beside_the_new_one() -> None:
    e = serving(V1)
    fetch = one(e.handle(Targeted(candidate(V2, 2), 0.0)), Fetch)
    e.handle(Fetched(fetch.attempt, 0.0, model=MODEL))
    e.handle(Loaded(fetch.attempt, 0.0))
    swap = one(e.handle(SelfTested(fetch.attempt, 0.0)), Swap)
    assert swap == Swap(V2, fetch.attempt, keep=sha(V1))
    done = infer(e, V2, 5, now=2.0)
    assert one(done, Report).report.rollout_id == "r1"
    assert e.memory.known_good == (sha(V1), sha(V2))
    assert (e.stage, e.active) == (Stage.SERVING, V2)


def test_golden_set_fetched_beside_the_model_is_what_the_self_test_runs() -> None:
    e = serving(V1)
    fetch = one(e.handle(Targeted(candidate(V2, 2), 0.0)), Fetch)
    golden = Path("/goldens/g.msgpack")
    e.handle(Fetched(fetch.attempt, 0.0, model=MODEL, golden=golden))
    assert one(e.handle(Loaded(fetch.attempt, 0.0)), SelfTest) == SelfTest(fetch.attempt, golden)


# -- soaks that fail ---------------------------------------------------------------------


def test_soak_failing_its_budget_puts_the_previous_model_back() -> None:
    e = serving(V1)
    to_soak(e, candidate(V2, 2), now=0.0)
    done = infer(e, V2, 5, now=3.0, ms=50.0)
    assert one(done, Revert) == Revert(V1)
    assert (e.active, e.stage, e.mode) == (V1, Stage.DEGRADED, Mode.DEGRADED)
    report = one(done, Report).report
    assert report.verdict is Verdict.UNHEALTHY
    assert report.reasons == ("p95_latency_ms:50.00>10.00",)
    event = one(done, Emit)
    assert (event.kind, event.reason) == (EventKind.ROLLBACK, HealthCode.P95_LATENCY_MS)
    assert event.detail.endswith(f"back to {V1.release_id}")
    assert e.memory.failed == (FailedRelease(sha(V2), rollout_id="r1"),)
    assert e.memory.active == V1, "the release kept is the one serving"


def test_soak_that_never_gets_enough_inferences_is_judged_at_its_deadline() -> None:
    e = serving(V1)
    to_soak(e, candidate(V2, 2), now=0.0)
    # (2 s soak + 5 inferences at 10 Hz) x 3 + 5 s grace
    assert e.wake_at == pytest.approx(12.5)
    assert e.handle(Tick(12.4)) == []
    done = e.handle(Tick(12.5))
    report = one(done, Report).report
    assert report.reasons == ("too_few_inferences:0<5",)
    assert report.soak_seconds == 12.5
    assert one(done, Revert) == Revert(V1)
    assert e.wake_at is None


def test_inferences_of_another_model_do_not_count_in_the_soak() -> None:
    e = serving(V1)
    to_soak(e, candidate(V2, 2), now=0.0)
    assert infer(e, V1, 50, now=5.0) == []
    assert e.stage is Stage.SOAKING


def test_failed_inferences_count_as_errors_of_the_soak() -> None:
    e = serving(V1)
    to_soak(e, candidate(V2, 2), now=0.0)
    e.handle(Inferred(sha(V2), (), 1, 1.0))
    done = infer(e, V2, 4, now=3.0)
    report = one(done, Report).report
    assert (report.errors, report.reasons) == (1, ("error_rate:0.200>0.100",))


# -- failures before the swap ------------------------------------------------------------


def test_self_test_failure_is_a_verdict_and_the_model_never_serves() -> None:
    e = serving(V1)
    fetch = one(e.handle(Targeted(candidate(V2, 2), 0.0)), Fetch)
    e.handle(Fetched(fetch.attempt, 0.0, model=MODEL))
    e.handle(Loaded(fetch.attempt, 0.0))
    failure = Failure(FailureKind.REJECTED, "case 3 differs", Reason.SELF_TEST_FAILED)
    done = e.handle(SelfTested(fetch.attempt, 1.0, failure=failure))
    assert of(done, Swap) == []
    assert of(done, Revert) == [], "the model under test never served"
    assert (e.active, e.stage) == (V1, Stage.DEGRADED)
    assert one(done, Report).report.reasons == (Reason.SELF_TEST_FAILED.value,)
    assert one(done, Note) == Note(Reason.SELF_TEST_FAILED, "case 3 differs")
    event = one(done, Emit)
    assert (event.kind, event.reason) == (EventKind.ARTIFACT_REJECTED, Reason.SELF_TEST_FAILED)
    assert e.memory.failed == (FailedRelease(sha(V2), rollout_id="r1"),)
    assert e.wake_at is None, "a verdict is not retried"


def test_load_failure_without_a_model_to_fall_back_on_leaves_the_device_idle() -> None:
    e = serving()
    fetch = one(e.handle(Targeted(stable(V1, 1), 0.0)), Fetch)
    e.handle(Fetched(fetch.attempt, 0.0, model=MODEL))
    failure = Failure(FailureKind.REJECTED, "onnxruntime: bad graph", Reason.MODEL_LOAD_FAILED)
    done = e.handle(Loaded(fetch.attempt, 0.0, failure=failure))
    assert e.stage is Stage.IDLE
    assert one(done, Report).report.verdict is Verdict.UNHEALTHY
    assert e.memory.failed == (FailedRelease.of(stable(V1, 1)),)
    assert e.memory.failed[0].release is not None, "a stable scope"


def test_corrupt_fetch_is_retried_after_a_backoff_never_judged() -> None:
    e = serving(V1)
    fetch = one(e.handle(Targeted(candidate(V2, 2), 0.0)), Fetch)
    failure = Failure(
        FailureKind.REFETCH, "chunks 2 of abc fail their sha256", Reason.CHUNK_CORRUPT
    )
    done = e.handle(Fetched(fetch.attempt, 10.0, failure=failure))
    assert of(done, Report) == []
    assert of(done, Persist) == []
    event = one(done, Emit)
    assert (event.kind, event.reason) == (EventKind.ARTIFACT_RETRY, Reason.CHUNK_CORRUPT)
    assert event.detail.endswith("; dropped, fetching again")
    assert e.memory.failed == ()
    assert (e.stage, e.active) == (Stage.DEGRADED, V1)
    assert e.wake_at == 11.0
    assert e.handle(Tick(10.5)) == []
    again = one(e.handle(Tick(11.0)), Fetch)
    assert again.attempt == fetch.attempt + 1
    # A second failure in a row waits twice as long.
    e.handle(Fetched(again.attempt, 20.0, failure=failure))
    assert e.wake_at == 22.0


def test_fetch_timeout_is_told_and_retried() -> None:
    e = serving()
    fetch = one(e.handle(Targeted(stable(V1, 1), 0.0)), Fetch)
    done = e.handle(Fetched(fetch.attempt, 0.0, failure=Failure(FailureKind.TIMEOUT, "not in 5 s")))
    event = one(done, Emit)
    assert (event.kind, event.reason, event.detail) == (
        EventKind.ARTIFACT_REJECTED,
        Reason.FETCH_TIMEOUT,
        "not in 5 s; retrying",
    )
    assert one(done, Note).reason is Reason.FETCH_TIMEOUT
    assert e.stage is Stage.IDLE
    assert e.memory.last_health is None, "a transient failure is no verdict"
    assert of(e.handle(Tick(1.0)), Fetch)


def test_an_error_of_the_agent_itself_is_logged_and_retried() -> None:
    e = serving(V1)
    fetch = one(e.handle(Targeted(candidate(V2, 2), 0.0)), Fetch)
    done = e.handle(Fetched(fetch.attempt, 0.0, failure=Failure(FailureKind.ERROR, "disk full")))
    assert "disk full" in one(done, Log).message
    assert of(done, Emit) == []
    assert e.wake_at == 1.0


def test_failed_release_is_not_retried_in_its_rollout() -> None:
    e = serving(V1)
    to_soak(e, candidate(V2, 2))
    infer(e, V2, 5, now=3.0, ms=50.0)  # rolled back
    assert e.handle(Targeted(candidate(V2, 3), 4.0)) == [], "same rollout: not again"
    assert e.handle(Tick(100.0)) == []
    assert of(e.handle(Targeted(candidate(V2, 4, rollout="r2"), 5.0)), Fetch), "another rollout"


def test_failed_stable_release_is_not_retried_at_a_resign_only_once_the_release_changes() -> None:
    broken = serving()
    fetch = one(broken.handle(Targeted(stable(V1, 1), 0.0)), Fetch)
    failure = Failure(FailureKind.REJECTED, "bad", Reason.MODEL_LOAD_FAILED)
    broken.handle(Fetched(fetch.attempt, 0.0, model=MODEL))
    broken.handle(Loaded(fetch.attempt, 0.0, failure=failure))
    assert broken.handle(Targeted(stable(V1, 2), 1.0)) == [], "a re-sign: not again"
    assert broken.handle(Tick(1000.0)) == []
    assert broken.handle(Targeted(stable(V1, 3), 2.0)) == [], "nor at the next one"
    # The same artifact under a changed release (here its budget) is another release.
    relaxed = V1.model_copy(update={"health": BUDGET.model_copy(update={"p95_latency_ms": 99})})
    assert one(broken.handle(Targeted(stable(relaxed, 4), 3.0)), Fetch).release == relaxed


# -- targets that change -----------------------------------------------------------------


def test_newer_target_during_a_soak_puts_the_previous_model_back_and_starts_over() -> None:
    e = serving(V1)
    attempt = to_soak(e, candidate(V2, 2))
    done = e.handle(Targeted(candidate(V3, 3, rollout="r2"), 1.0))
    assert one(done, Cancel) == Cancel(attempt)
    assert one(done, Revert) == Revert(V1)
    assert one(done, Fetch).release == V3
    kinds = [type(c) for c in done]
    assert kinds.index(Revert) < kinds.index(Fetch)
    assert e.active == V1
    # Results of the superseded work are ignored.
    assert e.handle(SelfTested(attempt, 2.0)) == []
    assert infer(e, V2, 10, now=5.0) == []


def test_newer_target_during_a_fetch_cancels_it_without_a_revert() -> None:
    e = serving(V1)
    fetch = one(e.handle(Targeted(candidate(V2, 2), 0.0)), Fetch)
    done = e.handle(Targeted(candidate(V3, 3, rollout="r2"), 1.0))
    assert of(done, Revert) == []
    assert one(done, Cancel) == Cancel(fetch.attempt)
    assert e.handle(Fetched(fetch.attempt, 2.0, model=MODEL)) == []
    assert e.stage is Stage.FETCHING


def test_resigned_manifest_does_not_disturb_a_soak() -> None:
    e = serving(V1)
    to_soak(e, candidate(V2, 2))
    assert e.handle(Targeted(candidate(V2, 3), 1.0)) == []
    assert e.stage is Stage.SOAKING
    report = one(infer(e, V2, 5, now=2.0), Report).report
    assert report.manifest_seq == 2, "reported for the manifest it began under"


def test_candidate_promoted_during_its_soak_finishes_that_soak() -> None:
    e = serving(V1)
    to_soak(e, candidate(V2, 2))
    # Only the soak's record follows the promotion: a crash now fails the stable release.
    assert e.handle(Targeted(stable(V2, 3), 1.0)) == [Persist(e.memory)]
    assert e.memory.soaking == stable(V2, 3)
    assert one(infer(e, V2, 5, now=2.0), Report).report.rollout_id == "r1"
    assert (e.stage, e.active) == (Stage.SERVING, V2)


def test_a_rollback_to_a_known_good_model_still_loaded_swaps_it_in_at_once() -> None:
    e = serving(V1)
    to_soak(e, candidate(V2, 2))
    infer(e, V2, 5, now=2.0)
    done = e.handle(Targeted(stable(V1, 3), 3.0))
    assert of(done, Fetch) == []
    assert one(done, Swap) == Swap(V1, None, keep=sha(V2))
    assert one(done, Persist).memory.active == V1
    assert (e.stage, e.active) == (Stage.SERVING, V1)


def test_a_target_already_served_asks_nothing_and_clears_a_degraded_stage() -> None:
    e = serving(V1)
    assert e.handle(Targeted(stable(V1, 1), 0.0)) == []
    to_soak(e, candidate(V2, 2))
    infer(e, V2, 5, now=3.0, ms=50.0)
    assert e.stage is Stage.DEGRADED
    assert e.handle(Targeted(stable(V1, 3), 4.0)) == [StateChanged()]
    assert stage_of(e) is Stage.SERVING


def test_a_manifest_without_a_target_leaves_the_model_served() -> None:
    e = serving(V1)
    assert e.handle(Targeted(stable(None, 1), 0.0)) == []
    assert e.active == V1
    assert e.desired != NOTHING


# -- restarts ----------------------------------------------------------------------------


def test_restart_mid_soak_serves_the_last_kept_model_and_starts_the_update_over() -> None:
    """The state file keeps the release last judged healthy, not the one being soaked."""
    e = serving(V1, failed=(FailedRelease(sha(V3), rollout_id="r0"),))
    assert (e.stage, e.active) == (Stage.SERVING, V1)
    assert e.memory.failed == (FailedRelease(sha(V3), rollout_id="r0"),)
    assert one(e.handle(Targeted(candidate(V2, 2), 0.0)), Fetch).release == V2


# -- the crash-loop guard ---------------------------------------------------------------


def test_the_soak_is_recorded_before_the_swap_and_closed_by_its_verdict() -> None:
    e = serving(V1)
    fetch = one(e.handle(Targeted(candidate(V2, 2), 0.0)), Fetch)
    e.handle(Fetched(fetch.attempt, 0.0, model=MODEL))
    e.handle(Loaded(fetch.attempt, 0.0))
    swapped = e.handle(SelfTested(fetch.attempt, 0.0))
    kinds = [type(c) for c in swapped]
    assert kinds.index(Persist) < kinds.index(Swap), "the service swaps once it is written"
    assert one(swapped, Persist).memory.soaking == candidate(V2, 2)
    assert one(infer(e, V2, 5, now=2.0), Persist).memory.soaking is None


@pytest.mark.parametrize("ms", [1.0, 50.0], ids=["healthy", "unhealthy"])
def test_a_soak_judged_either_way_closes_its_record(ms: float) -> None:
    e = serving(V1)
    to_soak(e, candidate(V2, 2))
    assert e.memory.soaking is not None
    assert one(infer(e, V2, 5, now=3.0, ms=ms), Persist).memory.soaking is None


def test_a_superseded_soak_closes_its_record() -> None:
    e = serving(V1)
    to_soak(e, candidate(V2, 2))
    done = e.handle(Targeted(candidate(V3, 3, rollout="r2"), 1.0))
    assert one(done, Persist).memory.soaking is None
    assert e.memory.failed == (), "superseded is no verdict"


def test_an_orderly_stop_closes_the_record_and_the_next_start_soaks_again() -> None:
    e = serving(V1)
    to_soak(e, candidate(V2, 2))
    assert one(e.handle(Stopping()), Persist).memory.soaking is None
    assert e.handle(Stopping()) == [], "nothing open"
    again = serving(V1, soaking=e.memory.soaking)
    assert one(again.handle(Targeted(candidate(V2, 2), 0.0)), Fetch).release == V2


def test_start_with_the_soak_still_open_reverts_reports_and_never_retries_it() -> None:
    e = engine()
    memory = Memory(active=V1, known_good=(sha(V1),), soaking=candidate(V2, 2))
    done = e.handle(Restored(memory, serving=True, now=50.0))
    assert one(done, Revert) == Revert(V1)
    assert (e.active, e.stage, e.mode) == (V1, Stage.DEGRADED, Mode.DEGRADED)
    report = one(done, Report).report
    assert (report.verdict, report.reasons) == (Verdict.UNHEALTHY, ("crashed_during_soak",))
    assert (report.release, report.rollout_id, report.manifest_seq) == (V2.release_id, "r1", 2)
    assert report.at == 50.0
    event = one(done, Emit)
    assert (event.kind, event.reason) == (EventKind.ROLLBACK, Reason.CRASHED_DURING_SOAK)
    assert event.detail.endswith(f"back to {V1.release_id}")
    kept = one(done, Persist).memory
    assert kept.soaking is None, "the guard fires once"
    assert kept.failed == (FailedRelease(sha(V2), rollout_id="r1"),)
    assert kept.last_health == report
    kinds = [type(c) for c in done]
    assert kinds.index(Persist) < kinds.index(Report) < kinds.index(Emit)
    # The retained manifest comes again, and re-signed: never that release again.
    assert e.handle(Targeted(candidate(V2, 2), 51.0)) == []
    assert e.handle(Targeted(candidate(V2, 3), 52.0)) == []
    assert e.handle(Tick(10_000.0)) == []


def test_start_with_the_record_closed_reports_nothing() -> None:
    e = engine()
    done = e.handle(Restored(Memory(active=V1, known_good=(sha(V1),)), serving=True, now=0.0))
    assert done == [StateChanged()]
    assert e.stage is Stage.SERVING


def test_a_stable_release_that_crashed_is_retried_only_once_a_manifest_changes_it() -> None:
    e = engine()
    memory = Memory(active=V1, known_good=(sha(V1),), soaking=stable(V2, 5))
    e.handle(Restored(memory, serving=True, now=0.0))
    assert e.handle(Targeted(stable(V2, 5), 1.0)) == []
    assert e.handle(Targeted(stable(V2, 6), 2.0)) == [], "a re-sign"
    changed = V2.model_copy(update={"runtime": Runtime(providers=("CUDAExecutionProvider",))})
    assert one(e.handle(Targeted(stable(changed, 7), 3.0)), Fetch).release == changed


def test_start_with_the_soak_open_and_no_model_to_go_back_to_is_idle() -> None:
    e = engine()
    done = e.handle(Restored(Memory(soaking=stable(V1, 1)), serving=False, now=0.0))
    assert one(done, Revert) == Revert(None)
    assert e.stage is Stage.IDLE
    assert one(done, Emit).detail.endswith("back to nothing")


def test_restart_whose_model_does_not_load_is_idle_and_fetches_it_again() -> None:
    e = engine()
    e.handle(Restored(Memory(active=V1, known_good=(sha(V1),)), serving=False, now=0.0))
    assert (e.stage, e.active) == (Stage.IDLE, None)
    assert one(e.handle(Targeted(stable(V1, 1), 0.0)), Fetch).release == V1


# -- storage -----------------------------------------------------------------------------


def test_storage_trouble_degrades_until_it_works_again() -> None:
    e = serving(V1)
    first = e.handle(StorageFailed(StoragePart.OUTBOX, "disk I/O error", 10.0))
    assert StateChanged() in first
    assert e.handle(StorageFailed(StoragePart.OUTBOX, "disk I/O error", 11.0)) == []
    assert (e.mode, e.stage) == (Mode.DEGRADED, Stage.SERVING)
    assert e.degraded_reason == "outbox: disk I/O error"
    assert e.trouble == {"outbox": "outbox: disk I/O error"}
    healed = e.handle(StorageOk(StoragePart.OUTBOX, 22.0))
    event = one(healed, Emit)
    assert event.kind is EventKind.STORAGE_RECOVERED
    assert event.detail == "outbox: disk I/O error (for 12 s); works again"
    assert mode_of(e) is Mode.SERVING
    assert reason_of(e) is None
    assert e.handle(StorageOk(StoragePart.OUTBOX, 23.0)) == [], "told once"


def test_artifact_store_that_works_again_resumes_the_update_waiting_for_it() -> None:
    e = serving(V1)
    fetch = one(e.handle(Targeted(candidate(V2, 2), 0.0)), Fetch)
    e.handle(StorageFailed(StoragePart.ARTIFACTS, "No space left on device", 1.0))
    e.handle(Fetched(fetch.attempt, 1.0, failure=Failure(FailureKind.ERROR, "ENOSPC")))
    assert e.wake_at == 2.0
    again = e.handle(StorageOk(StoragePart.ARTIFACTS, 1.5))
    assert one(again, Fetch).attempt == fetch.attempt + 1


# -- bounds ------------------------------------------------------------------------------


def test_remembered_releases_and_texts_are_bounded_by_the_limits() -> None:
    limits = Limits(known_good=2, failed=2, event_detail_chars=100, storage_reason_chars=20)
    e = engine(limits)
    e.handle(Restored(Memory(), serving=False, now=0.0))
    for seq, name in enumerate(("a", "b", "c"), start=1):
        to_soak(e, stable(release(name), seq), now=seq * 10.0)
        infer(e, release(name), 5, now=seq * 10.0 + 2)
    assert e.memory.known_good == (sha(release("b")), sha(release("c")))
    for seq, name in enumerate(("d", "e", "f"), start=4):
        fetch = one(e.handle(Targeted(stable(release(name), seq), 0.0)), Fetch)
        failure = Failure(FailureKind.REJECTED, "x" * 10_000, Reason.MODEL_LOAD_FAILED)
        e.handle(Fetched(fetch.attempt, 0.0, model=MODEL))
        done = e.handle(Loaded(fetch.attempt, 0.0, failure=failure))
        assert len(one(done, Emit).detail) == 100
    assert [f.sha256 for f in e.memory.failed] == [sha(release("e")), sha(release("f"))]
    e.handle(StorageFailed(StoragePart.STATE, "y" * 10_000, 0.0))
    assert e.degraded_reason is not None
    assert len(e.degraded_reason) == 20


@pytest.mark.parametrize(
    "key",
    [
        FailedRelease("ab" * 32, rollout_id="r1"),
        FailedRelease("ab" * 32, release="0123456789abcdef"),
        FailedRelease.of(stable(V1, 3)),
        FailedRelease("ab" * 32, rollout_id="canary:eu"),
    ],
)
def test_failed_release_keys_read_back_as_the_state_file_keeps_them(key: FailedRelease) -> None:
    assert FailedRelease.parse(key.stored()) == key


def test_failed_release_keys_of_earlier_state_files_still_read() -> None:
    sha256 = "cd" * 32
    # A stable key of an earlier agent: its scope, one manifest seq, is over.
    assert FailedRelease.parse(f"seq12:{sha256}") is None
    assert FailedRelease.parse(f"r1:{sha256}") == FailedRelease(sha256, rollout_id="r1")
