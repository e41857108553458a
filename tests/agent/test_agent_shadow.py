"""Shadow soak: a candidate whose budget asks for it runs beside the serving model,
never answering, and is judged on its agreement too. The engine's decisions in
milliseconds (``now`` made up), and the agreement measure on real model outputs."""

from __future__ import annotations

import numpy as np
import pytest

from agent.engine import UpdateEngine
from agent.events import (
    Command,
    Emit,
    FailedRelease,
    Fetch,
    Fetched,
    Inferred,
    Loaded,
    Persist,
    Report,
    Restored,
    Revert,
    SelfTested,
    Shadow,
    Swap,
    Targeted,
    Tick,
)
from agent.health import HealthCode, SoakStats, judge
from agent.lifecycle import Stage
from agent.runtime import ModelSlot
from agent.shadow import agrees, labels
from models import INPUT_NAME, DemoModel, DigitsSplit
from models.export import LABEL_OUTPUT, PROBABILITIES_OUTPUT
from schemas import EventKind, HealthBudget, Mode, Reason, ShadowBudget, Verdict
from tests.agent.conftest import release_of
from tests.agent.test_agent_engine import (
    BUDGET,
    MODEL,
    V1,
    V3,
    candidate,
    engine,
    of,
    one,
    release,
    serving,
    sha,
)

FLOOR = ShadowBudget(min_agreement=0.9)
SHADOWED = release("v2", min_inferences=10).model_copy(
    update={"health": BUDGET.model_copy(update={"min_inferences": 10, "shadow": FLOOR})}
)


def loaded(e: UpdateEngine, now: float = 0.0) -> int:
    """Target the shadowed candidate and walk its fetch and load; the attempt."""
    fetch = one(e.handle(Targeted(candidate(SHADOWED, 2), now)), Fetch)
    e.handle(Fetched(fetch.attempt, now, model=MODEL))
    e.handle(Loaded(fetch.attempt, now))
    return fetch.attempt


def shadowed(e: UpdateEngine, n: int, agreed: int, now: float) -> list[Command]:
    """``n`` answers of the shadow, ``agreed`` of them agreeing, in one batch."""
    return e.handle(Inferred(sha(SHADOWED), ((1.0, n),), 0, now, n, agreed))


def test_a_shadow_soak_never_swaps_until_healthy_then_swaps_the_candidate_in() -> None:
    e = serving(V1)
    attempt = loaded(e)
    started = e.handle(SelfTested(attempt, 0.0))
    assert one(started, Shadow) == Shadow(SHADOWED, attempt)
    assert not of(started, Swap), "it answers nobody yet"
    kinds = [type(c) for c in started]
    assert kinds.index(Persist) < kinds.index(Shadow), "the crash guard's record first"
    assert one(started, Persist).memory.soaking == candidate(SHADOWED, 2)
    assert (e.active, e.stage, e.mode) == (V1, Stage.SOAKING, Mode.UPDATING)
    # The serving model's own answers are no part of the candidate's soak.
    assert e.handle(Inferred(sha(V1), ((1.0, 50),), 0, 3.0)) == []
    assert shadowed(e, 6, 6, 3.0) == []
    done = shadowed(e, 4, 3, 3.0)
    assert one(done, Swap) == Swap(SHADOWED, None, sha(V1)), "swapped in, at once"
    report = one(done, Report).report
    assert (report.verdict, report.inferences) == (Verdict.HEALTHY, 10)
    assert (report.agreement, report.shadow_inferences) == (0.9, 10)
    assert one(done, Emit).kind is EventKind.UPDATE_APPLIED
    kept = one(done, Persist).memory
    assert (kept.active, kept.soaking) == (SHADOWED, None)
    assert sha(SHADOWED) in kept.known_good
    assert (e.active, e.stage) == (SHADOWED, Stage.SERVING)


def test_agreement_below_the_floor_is_unhealthy_and_the_stable_model_stays() -> None:
    e = serving(V1)
    e.handle(SelfTested(loaded(e), 0.0))
    assert shadowed(e, 9, 5, 1.0) == [], "not before its soak seconds"
    done = shadowed(e, 1, 0, 2.5)
    report = one(done, Report).report
    assert report.verdict is Verdict.UNHEALTHY
    assert report.reasons == ("agreement:0.500<0.900",)
    assert (report.agreement, report.shadow_inferences) == (0.5, 10)
    assert one(done, Revert) == Revert(V1), "the stable model serves alone"
    assert not of(done, Swap)
    event = one(done, Emit)
    assert (event.kind, event.reason) == (EventKind.ROLLBACK, HealthCode.AGREEMENT)
    assert e.memory.failed == (FailedRelease(sha(SHADOWED), rollout_id="r1"),)
    assert (e.active, e.stage, e.memory.soaking) == (V1, Stage.DEGRADED, None)


def test_a_shadow_that_fails_on_the_inputs_is_judged_on_its_errors() -> None:
    e = serving(V1)
    e.handle(SelfTested(loaded(e), 0.0))
    done = e.handle(Inferred(sha(SHADOWED), ((1.0, 5),), 5, 3.0, 5, 5))
    report = one(done, Report).report
    assert report.reasons == ("error_rate:0.500>0.100",)
    assert one(done, Revert) == Revert(V1)


def test_a_shadow_soak_too_slow_to_compare_is_judged_at_its_deadline() -> None:
    e = serving(V1)
    e.handle(SelfTested(loaded(e), 0.0))
    wake = e.wake_at
    assert wake is not None
    done = e.handle(Tick(wake))
    report = one(done, Report).report
    assert report.reasons == ("too_few_inferences:0<10",)
    assert (report.agreement, report.shadow_inferences) == (None, 0)
    assert one(done, Revert) == Revert(V1)


def test_a_fresh_device_soaks_a_shadow_budget_live() -> None:
    """Nothing serves, so there is nothing to stand beside: swapped in and soaked on live
    traffic, its budget judged as ever."""
    e = engine()
    attempt = loaded(e)
    started = e.handle(SelfTested(attempt, 0.0))
    assert one(started, Swap) == Swap(SHADOWED, attempt, None)
    assert not of(started, Shadow)
    assert e.active == SHADOWED
    done = e.handle(Inferred(sha(SHADOWED), ((1.0, 10),), 0, 3.0))
    report = one(done, Report).report
    assert (report.verdict, report.agreement, report.shadow_inferences) == (
        Verdict.HEALTHY,
        None,
        0,
    )


def test_a_candidate_that_took_the_agent_down_in_shadow_fails_at_the_next_start() -> None:
    e = serving(V1)
    e.handle(SelfTested(loaded(e), 0.0))
    again = engine()
    done = again.handle(Restored(e.memory, serving=True, now=9.0))
    assert one(done, Revert) == Revert(V1)
    report = one(done, Report).report
    assert report.reasons == (Reason.CRASHED_DURING_SOAK.value,)
    assert again.memory.failed == (FailedRelease(sha(SHADOWED), rollout_id="r1"),)
    assert again.active == V1


def test_a_newer_target_during_a_shadow_soak_ends_it_and_the_stable_serves_alone() -> None:
    e = serving(V1)
    e.handle(SelfTested(loaded(e), 0.0))
    done = e.handle(Targeted(candidate(V3, 3, rollout="r2"), 1.0))
    assert one(done, Revert) == Revert(V1)
    assert one(done, Persist).memory.soaking is None
    assert e.memory.failed == ()


# -- judging and measuring agreement ------------------------------------------------------


def test_agreement_is_judged_only_against_a_floor_and_only_on_compared_answers() -> None:
    budget = HealthBudget(
        max_error_rate=0.5, p95_latency_ms=10.0, min_inferences=4, soak_seconds=0.0
    )
    low = SoakStats(started=0.0, latencies_ms=[1.0] * 4, compared=4, agreed=1)
    assert judge(low, budget) == (Verdict.HEALTHY, ()), "no floor: not judged on it"
    floored = budget.model_copy(update={"shadow": FLOOR})
    assert judge(low, floored) == (Verdict.UNHEALTHY, ("agreement:0.250<0.900",))
    at_floor = SoakStats(started=0.0, latencies_ms=[1.0] * 10, compared=10, agreed=9)
    assert judge(at_floor, floored) == (Verdict.HEALTHY, ())
    nothing_compared = SoakStats(started=0.0, latencies_ms=[1.0] * 4)
    assert judge(nothing_compared, floored) == (Verdict.HEALTHY, ())


@pytest.fixture(scope="module")
def answers(
    demo_models: dict[str, DemoModel], digits_split: DigitsSplit
) -> dict[str, dict[str, np.ndarray]]:
    """Real answers of digits-v1 and digits-v2 to the same 40 held-out digits."""
    x = np.ascontiguousarray(digits_split.x_holdout[:40], dtype=np.float32)
    found = {}
    for name in ("digits-v1", "digits-v2"):
        slot = ModelSlot(release_of(demo_models[name]), demo_models[name].path)
        found[name] = slot.outputs({INPUT_NAME: x})
    return found


def test_label_agreement_compares_every_row_of_the_label_output(
    answers: dict[str, dict[str, np.ndarray]],
) -> None:
    v1, v2 = answers["digits-v1"], answers["digits-v2"]
    label = ShadowBudget(min_agreement=0.9)
    assert agrees(v1, {k: a.copy() for k, a in v1.items()}, label)
    differ = np.flatnonzero(v1[LABEL_OUTPUT] != v2[LABEL_OUTPUT])
    assert differ.size, "two real models disagree somewhere"
    rows = [int(differ[0])]
    same = [i for i in range(40) if i not in differ][:3]
    assert agrees({k: a[same] for k, a in v1.items()}, {k: a[same] for k, a in v2.items()}, label)
    assert not agrees(
        {k: a[rows] for k, a in v1.items()}, {k: a[rows] for k, a in v2.items()}, label
    )
    # Without an integer output, the argmax of the first float output is the label.
    probs_only = {PROBABILITIES_OUTPUT: v1[PROBABILITIES_OUTPUT]}
    label_rows = labels(probs_only)
    assert label_rows is not None
    assert label_rows.tolist() == v1[LABEL_OUTPUT].tolist()
    assert not agrees(probs_only, {"other": v1[PROBABILITIES_OUTPUT][:, :0]}, label)


def test_distance_agreement_holds_within_its_tolerance_only(
    answers: dict[str, dict[str, np.ndarray]],
) -> None:
    v1 = answers["digits-v1"]
    nudged = {k: a.copy() for k, a in v1.items()}
    nudged[PROBABILITIES_OUTPUT][3, 4] += 0.01
    near = ShadowBudget(min_agreement=0.9, measure="distance", tolerance=0.02)
    tight = near.model_copy(update={"tolerance": 0.001})
    assert agrees(v1, nudged, near)
    assert not agrees(v1, nudged, tight)
    named = tight.model_copy(update={"output": LABEL_OUTPUT})
    assert agrees(v1, nudged, named), "the label output did not move"
    missing = tight.model_copy(update={"output": "nowhere"})
    assert not agrees(v1, v1, missing)
    assert not agrees(v1, {k: a[:3] for k, a in v1.items()}, near), "another shape"
