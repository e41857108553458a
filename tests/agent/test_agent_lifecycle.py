"""The agent's update lifecycle table: every transition reachable, nothing else allowed."""

from __future__ import annotations

import itertools

import pytest

from agent.lifecycle import IN_FLIGHT, TRANSITIONS, Stage, Step, advance
from schemas import Mode, UsageError


def _reachable_from_idle() -> set[tuple[Stage, Step]]:
    """Every (stage, step) pair ``advance`` accepts on some path from a fresh device."""
    seen: set[Stage] = {Stage.IDLE}
    frontier = [Stage.IDLE]
    used: set[tuple[Stage, Step]] = set()
    while frontier:
        stage = frontier.pop()
        for step, has_model in itertools.product(Step, (False, True)):
            try:
                nxt = advance(stage, step, has_model=has_model)
            except UsageError:
                continue
            used.add((stage, step))
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    return used


def test_every_transition_in_the_table_is_reachable_from_a_fresh_device() -> None:
    assert _reachable_from_idle() == set(TRANSITIONS)
    assert set(TRANSITIONS.values()) | {Stage.IDLE} == set(Stage)


RESTING = (Stage.IDLE, Stage.SERVING, Stage.DEGRADED)


@pytest.mark.parametrize(
    ("stage", "step", "lands"),
    [
        *((s, Step.TARGET, Stage.FETCHING) for s in RESTING),
        *((s, Step.SERVED, Stage.SERVING) for s in (*RESTING, Stage.FETCHING)),
        (Stage.FETCHING, Step.FETCHED, Stage.LOADING),
        (Stage.LOADING, Step.LOADED, Stage.SOAKING),
        (Stage.SOAKING, Step.HEALTHY, Stage.SERVING),
        (Stage.SOAKING, Step.UNHEALTHY, Stage.DEGRADED),
        *((s, Step.FAILED, Stage.DEGRADED) for s in IN_FLIGHT),
        *((s, Step.SUPERSEDED, Stage.SERVING) for s in IN_FLIGHT),
    ],
)
def test_a_device_with_a_model_lands_where_the_theory_of_operation_says(
    stage: Stage, step: Step, lands: Stage
) -> None:
    """Each transition of the module's diagram, written out independently of the table:
    a change to the table that the diagram does not describe fails here."""
    assert advance(stage, step, has_model=True) is lands


def test_the_theory_of_operation_names_every_transition() -> None:
    # 3 targets, 4 served, fetched, loaded, healthy, unhealthy, 3 failed, 3 superseded,
    # 3 crashed
    assert len(TRANSITIONS) == 3 + 4 + 4 + 3 + 3 + 3


@pytest.mark.parametrize("stage", [Stage.IDLE, Stage.SERVING])
def test_a_soak_found_open_at_a_start_leaves_the_device_degraded(stage: Stage) -> None:
    assert advance(stage, Step.CRASHED, has_model=True) is Stage.DEGRADED
    assert advance(stage, Step.CRASHED, has_model=False) is Stage.IDLE


def test_update_walk_from_serving_to_soaked() -> None:
    stage = Stage.SERVING
    for step, expected in [
        (Step.TARGET, Stage.FETCHING),
        (Step.FETCHED, Stage.LOADING),
        (Step.LOADED, Stage.SOAKING),
        (Step.UNHEALTHY, Stage.DEGRADED),
        (Step.TARGET, Stage.FETCHING),
        (Step.FETCHED, Stage.LOADING),
        (Step.LOADED, Stage.SOAKING),
        (Step.HEALTHY, Stage.SERVING),
    ]:
        stage = advance(stage, step, has_model=True)
        assert stage is expected


@pytest.mark.parametrize(
    ("stage", "step"),
    [p for p in itertools.product(Stage, Step) if p not in TRANSITIONS],
)
def test_step_not_in_the_table_is_a_usage_error(stage: Stage, step: Step) -> None:
    for has_model in (False, True):
        with pytest.raises(UsageError, match="no transition"):
            advance(stage, step, has_model=has_model)


def test_failure_without_a_model_to_fall_back_on_is_idle_not_degraded() -> None:
    assert advance(Stage.SOAKING, Step.UNHEALTHY, has_model=False) is Stage.IDLE
    assert advance(Stage.FETCHING, Step.FAILED, has_model=False) is Stage.IDLE
    assert advance(Stage.LOADING, Step.FAILED, has_model=False) is Stage.IDLE
    assert advance(Stage.LOADING, Step.FAILED, has_model=True) is Stage.DEGRADED
    assert advance(Stage.LOADING, Step.SUPERSEDED, has_model=False) is Stage.IDLE


def test_stages_publish_their_coarse_mode() -> None:
    assert {s: s.mode for s in Stage} == {
        Stage.IDLE: Mode.IDLE,
        Stage.SERVING: Mode.SERVING,
        Stage.FETCHING: Mode.UPDATING,
        Stage.LOADING: Mode.UPDATING,
        Stage.SOAKING: Mode.UPDATING,
        Stage.DEGRADED: Mode.DEGRADED,
    }
