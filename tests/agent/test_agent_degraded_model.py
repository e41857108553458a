"""The update engine on models that serve degraded or not at all: a fallback execution
provider, a stored model that no longer loads at a start, a first model that fails to
load. Events in, commands out, ``now`` made up."""

from __future__ import annotations

from agent.engine import UpdateEngine
from agent.events import (
    NOTHING,
    Failure,
    FailureKind,
    Fetch,
    Fetched,
    Loaded,
    Log,
    Memory,
    Restored,
    SelfTested,
    Targeted,
)
from agent.lifecycle import Stage
from schemas import Mode, Reason
from tests.agent.test_agent_engine import (
    MODEL,
    V1,
    V2,
    candidate,
    engine,
    infer,
    mode_of,
    of,
    one,
    reason_of,
    serving,
    sha,
    stable,
    stage_of,
)

FALLBACK = "CUDAExecutionProvider: not in this onnxruntime build; serving on CPUExecutionProvider"


def _load(e: UpdateEngine, attempt: int, *, fallback: str | None) -> None:
    e.handle(Fetched(attempt, 0.0, model=MODEL))
    e.handle(Loaded(attempt, 0.0, fallback=fallback))


def test_a_candidate_on_a_fallback_provider_serves_degraded_saying_why() -> None:
    e = serving(V1)
    fetch = one(e.handle(Targeted(candidate(V2, 2), 0.0)), Fetch)
    _load(e, fetch.attempt, fallback=FALLBACK)
    swapped = e.handle(SelfTested(fetch.attempt, 0.0))
    assert any("degraded" in log.message for log in of(swapped, Log))
    assert e.mode is Mode.DEGRADED
    assert reason_of(e) == f"provider: {FALLBACK}"
    infer(e, V2, 5, now=3.0)
    assert (stage_of(e), e.active) == (Stage.SERVING, V2)
    assert mode_of(e) is Mode.DEGRADED, "healthy, yet not on the class's first provider"


def test_rolling_back_from_a_fallback_candidate_ends_its_degradation() -> None:
    e = serving(V1)
    fetch = one(e.handle(Targeted(candidate(V2, 2), 0.0)), Fetch)
    _load(e, fetch.attempt, fallback=FALLBACK)
    e.handle(SelfTested(fetch.attempt, 0.0))
    infer(e, V2, 5, now=3.0, ms=500.0)  # over the p95 budget: rolled back
    assert e.active == V1
    assert reason_of(e) is None, "V1 serves on its first provider again"


def test_a_start_whose_model_serves_on_a_fallback_is_degraded() -> None:
    e = engine()
    e.handle(
        Restored(Memory(active=V1, known_good=(sha(V1),)), serving=True, now=0, trouble=FALLBACK)
    )
    assert (e.stage, e.mode) == (Stage.SERVING, Mode.DEGRADED)
    assert reason_of(e) == f"provider: {FALLBACK}"


def test_a_start_whose_stored_model_does_not_load_is_degraded_not_idle() -> None:
    e = engine()
    memory = Memory(active=V1, known_good=(sha(V1),))
    e.handle(Restored(memory, serving=False, now=0, trouble="CPUExecutionProvider: bad graph"))
    assert e.stage is Stage.IDLE
    assert e.mode is Mode.DEGRADED
    reason = reason_of(e)
    assert reason is not None
    assert reason.startswith(f"model: {V1.release_id} does not load: CPUExecutionProvider")


def test_a_first_model_that_fails_to_load_leaves_the_device_degraded_until_one_serves() -> None:
    e = serving()
    fetch = one(e.handle(Targeted(stable(V1, 1), 0.0)), Fetch)
    e.handle(Fetched(fetch.attempt, 0.0, model=MODEL))
    failure = Failure(
        FailureKind.REJECTED, "CPUExecutionProvider: bad graph", Reason.MODEL_LOAD_FAILED
    )
    e.handle(Loaded(fetch.attempt, 0.0, failure=failure))
    assert (e.stage, e.mode) == (Stage.IDLE, Mode.DEGRADED)
    reason = reason_of(e)
    assert reason is not None
    assert f"{V1.release_id} model_load_failed" in reason
    # Another release loads: the device serves, its trouble over.
    fetch = one(e.handle(Targeted(stable(V2, 2), 1.0)), Fetch)
    _load(e, fetch.attempt, fallback=None)
    e.handle(SelfTested(fetch.attempt, 1.0))
    infer(e, V2, 5, now=4.0)
    assert (stage_of(e), mode_of(e), reason_of(e)) == (Stage.SERVING, Mode.SERVING, None)


def test_nothing_targeted_means_nothing_should_serve() -> None:
    e = engine()
    memory = Memory(active=V1, known_good=(sha(V1),))
    e.handle(Restored(memory, serving=False, now=0, trouble="CPUExecutionProvider: bad graph"))
    e.handle(Targeted(NOTHING, 1.0))
    assert (e.mode, reason_of(e)) == (Mode.IDLE, None)
