"""The fleet view keeps each wave's counts as devices report: any sequence of device
updates gives the same counts as reading every device again (``tests.coordinator.recount``),
whenever the counts are first asked for and however the wave changes meanwhile."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.fleet import FleetView
from coordinator.rollout import RolloutRecord
from schemas import DeviceState, HealthReport, Verdict
from tests.coordinator.records import CLASS, T0, device_state, make_record, make_release
from tests.coordinator.recount import recount

OTHER_CLASS = "medical-cart-cpu"
CANDIDATE_SHA = "ab" * 32
DEVICES = ("cam-canary", *(f"cam-{i:02d}" for i in range(7)))

RECORDS = (
    make_record(),
    make_record(wave=1),
    make_record(wave=2),
    make_record(
        id="rollout-8",
        classes=(CLASS, OTHER_CLASS),
        candidates={CLASS: make_release(), OTHER_CLASS: make_release(sha256="cd" * 32)},
        waves_percent=(60.0, 100.0),
        canaries=(),
    ),
)


@dataclass(frozen=True)
class Presence:
    device_id: str
    online: bool


@dataclass(frozen=True)
class State:
    device_id: str
    hw_class: str
    sha256: str | None


@dataclass(frozen=True)
class Health:
    device_id: str
    rollout_id: str
    release: str
    verdict: Verdict
    reasons: tuple[str, ...]
    at: float
    report_id: str
    shadow: tuple[float | None, int]
    """A shadow soak's agreement and the answers it rests on."""


@dataclass(frozen=True)
class Forget:
    device_id: str


@dataclass(frozen=True)
class Count:
    record: int


@dataclass(frozen=True)
class Tick:
    """Time passes: targeted devices without a verdict may fall silent."""

    seconds: float


devices = st.sampled_from(DEVICES)
updates = st.one_of(
    st.builds(Presence, devices, st.booleans()),
    st.builds(
        State,
        devices,
        st.sampled_from((CLASS, OTHER_CLASS, "gateway-arm")),
        st.sampled_from((CANDIDATE_SHA, "cd" * 32, "ef" * 32, None)),
    ),
    st.builds(
        Health,
        devices,
        st.sampled_from(("rollout-7", "rollout-8", "rollout-9")),
        st.sampled_from((make_release().release_id, "other-release")),
        st.sampled_from(Verdict),
        st.sampled_from(((), ("crashed",), ("chunk_corrupt: 3",), ("fetch_timeout", "slow"))),
        st.sampled_from((T0, T0 + 1.0, T0 + 2.0)),
        st.sampled_from(("r1", "r2", "r3", "r4", "r5", "r6")),
        st.sampled_from(((None, 0), (1.0, 40), (0.25, 200), (0.0, 7))),
    ),
    st.builds(Forget, devices),
    st.builds(Count, st.integers(0, len(RECORDS) - 1)),
    st.builds(Tick, st.sampled_from((1.0, 60.0, 200.0))),
)


def _state(update: State) -> DeviceState:
    return device_state(update.device_id, hw_class=update.hw_class, sha256=update.sha256)


def _report(update: Health) -> HealthReport:
    return HealthReport(
        report_id=f"{update.device_id}-{update.report_id}",
        device_id=update.device_id,
        rollout_id=update.rollout_id,
        manifest_seq=4,
        release=update.release,
        verdict=update.verdict,
        reasons=update.reasons,
        inferences=100,
        errors=0,
        p95_latency_ms=1.0,
        soak_seconds=4.0,
        at=update.at,
        agreement=update.shadow[0],
        shadow_inferences=update.shadow[1],
    )


def _apply(fleet: FleetView, update: object) -> None:
    if isinstance(update, Presence):
        fleet.on_presence(update.device_id, update.online)
    elif isinstance(update, State):
        fleet.on_state(_state(update))
    elif isinstance(update, Health):
        fleet.on_health(_report(update))
    elif isinstance(update, Forget):
        fleet.forget(update.device_id)
    elif isinstance(update, Count):
        _check(fleet, RECORDS[update.record])
    elif isinstance(update, Tick):
        fleet.tick(fleet.now + update.seconds)


def _check(fleet: FleetView, record: RolloutRecord) -> None:
    for name in record.lanes:
        assert fleet.counts(record, name) == recount(fleet, record, name)


@settings(max_examples=300, deadline=None)
@given(st.lists(updates, max_size=60))
def test_counts_kept_as_devices_report_equal_a_full_recount(sequence: list[object]) -> None:
    fleet = FleetView(now=T0)
    for update in sequence:
        _apply(fleet, update)
    for record in RECORDS:
        _check(fleet, record)


@settings(max_examples=100, deadline=None)
@given(st.lists(updates, max_size=40), st.lists(updates, max_size=40))
def test_a_rollout_no_longer_watched_is_counted_afresh(
    first: list[object], then: list[object]
) -> None:
    fleet = FleetView(now=T0)
    record: RolloutRecord = RECORDS[0]
    for update in first:
        _apply(fleet, update)
    _check(fleet, record)
    fleet.watch_only(())
    for update in then:
        _apply(fleet, update)
    _check(fleet, record)
