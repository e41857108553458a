"""``coordinator.plan``: a spec's waves over a fleet as it reports, by hand-built devices.

Every expectation is computed here from the targeting rule itself (``schemas.bucket``
against the wave's cutoff, canaries always in), not from the planner's walk."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Final

import pytest

from coordinator.plan import ClassOffer, Plan, make_plan
from schemas import (
    ArtifactRef,
    Candidate,
    MaintenanceWindow,
    RolloutSpec,
    TensorSpec,
    Variant,
    bucket,
)

CAM: Final = "jetson-vision-standard"
GATE: Final = "intel-lowpower-detector"
SHA: Final = hashlib.sha256(b"candidate").hexdigest()
OLD: Final = hashlib.sha256(b"stable").hexdigest()
SIZE: Final = 1000
NOW: Final = 1_700_000_000.0  # 22:13 UTC


@dataclass(frozen=True)
class Device:
    device_id: str
    hw_class: str | None
    online: bool = True
    sha256: str | None = OLD


def _spec(waves: list[dict[str, Any]], **changes: Any) -> RolloutSpec:
    variant = Variant(
        label="fp32",
        artifact=ArtifactRef(sha256=SHA, size=SIZE),
        inputs=(TensorSpec(name="x", dtype="float32", shape=(None, 64)),),
        outputs=(TensorSpec(name="y", dtype="int64", shape=(None,)),),
    )
    fields: dict[str, Any] = {
        "id": "plan-test",
        "generation": 1,
        "classes": (CAM, GATE),
        "candidate": Candidate(name="digits", variants=(variant,)),
        "waves": waves,
        "issued_at": NOW,
        "operator": "operator",
    } | changes
    return RolloutSpec.model_validate(fields)


def _offers(size: int = SIZE) -> dict[str, ClassOffer]:
    return {
        name: ClassOffer(
            hw_class=name, variant="fp32", release="digits:fp32@x", sha256=SHA, pull_bytes=size
        )
        for name in (CAM, GATE)
    }


def _fleet(n: int = 40) -> list[Device]:
    cams = [Device(f"cam-{i:03d}", CAM, online=i % 7 != 3) for i in range(n)]
    gates = [Device(f"gw-{i:03d}", GATE) for i in range(n // 2)]
    return cams + gates


def _reached(plan: Plan, wave: int, name: str) -> set[str]:
    lane = next(c for c in plan.waves[wave].classes if c.hw_class == name)
    return set(lane.new) | set(lane.offline)


def test_percent_waves_reach_the_devices_below_each_cutoff_once_offline_ones_listed() -> None:
    spec = _spec([{"percent": 10}, {"percent": 50}, {"percent": 100}])
    fleet = _fleet()
    plan = make_plan(spec, fleet, _offers(), now=NOW)

    seen: set[str] = set()
    for i, cutoff in enumerate((1000, 5000, 10000)):
        for name in (CAM, GATE):
            below = {
                d.device_id
                for d in fleet
                if d.hw_class == name and bucket(spec.id, d.device_id) < cutoff
            }
            assert _reached(plan, i, name) == below - seen
            lane = next(c for c in plan.waves[i].classes if c.hw_class == name)
            assert lane.cutoff_bp == cutoff
            assert lane.reached == len(below)
            assert set(lane.offline) == {
                d.device_id for d in fleet if d.device_id in lane.offline and not d.online
            }
            assert not any(d.online for d in fleet if d.device_id in lane.offline)
            seen |= below
    assert seen == {d.device_id for d in fleet}
    offline = {d.device_id for d in fleet if not d.online}
    assert {i for w in plan.waves for c in w.classes for i in c.offline} == offline
    assert plan.refusals == ()


def test_a_count_wave_reaches_the_first_devices_of_each_class_by_bucket() -> None:
    spec = _spec([{"count": 2}, {"count": 5}, {"percent": 100}])
    fleet = _fleet()
    plan = make_plan(spec, fleet, _offers(), now=NOW)
    for name in (CAM, GATE):
        ranked = sorted(
            (bucket(spec.id, d.device_id), d.device_id) for d in fleet if d.hw_class == name
        )
        assert _reached(plan, 0, name) == {d for _, d in ranked[:2]}
        assert _reached(plan, 1, name) == {d for _, d in ranked[2:5]}
        assert _reached(plan, 2, name) == {d for _, d in ranked[5:]}


def test_a_wave_never_reaches_fewer_than_the_one_before() -> None:
    """A count wave that covers more than the next percent: that percent adds nobody."""
    spec = _spec([{"count": 30}, {"percent": 1}, {"percent": 100}])
    plan = make_plan(spec, _fleet(), _offers(), now=NOW)
    first, second = plan.waves[0].classes[0], plan.waves[1].classes[0]
    assert second.cutoff_bp == first.cutoff_bp
    assert (second.new, second.offline, second.reached) == ((), (), first.reached)


def test_canaries_come_first_whatever_their_bucket_and_unknown_ones_are_named() -> None:
    fleet = _fleet()
    spec = _spec([{"percent": 1}, {"percent": 100}])
    above = [
        d.device_id for d in fleet if d.hw_class == CAM and bucket(spec.id, d.device_id) >= 100
    ]
    spec = spec.model_copy(update={"canaries": (above[0], "nobody-here")})
    plan = make_plan(spec, fleet, _offers(), now=NOW)
    assert above[0] in _reached(plan, 0, CAM)
    assert above[0] not in _reached(plan, 1, CAM)
    assert plan.canaries == (above[0],)
    assert plan.unknown_canaries == ("nobody-here",)


def test_bytes_count_each_device_once_and_nothing_for_one_that_has_the_artifact() -> None:
    fleet = [
        Device("cam-a", CAM),
        Device("cam-b", CAM, sha256=SHA),  # runs the candidate already
        Device("cam-c", CAM, online=False),
        Device("gw-a", GATE),
    ]
    spec = _spec([{"percent": 100}])
    plan = make_plan(spec, fleet, _offers(size=250), now=NOW)
    (wave,) = plan.waves
    cam, gate = wave.classes
    assert (set(cam.new), cam.offline, cam.already) == ({"cam-a", "cam-b"}, ("cam-c",), 1)
    assert (cam.pull_bytes, cam.later_bytes) == (250, 250)
    assert (gate.pull_bytes, gate.later_bytes) == (250, 0)
    assert wave.pull_bytes == 500
    assert (wave.new, wave.offline) == (3, 1)


def test_a_class_whose_variant_is_not_known_here_has_unknown_bytes() -> None:
    offers = _offers()
    offers[GATE] = ClassOffer(hw_class=GATE, variant=None, gate="not run here: no data set")
    plan = make_plan(_spec([{"percent": 100}]), _fleet(), offers, now=NOW)
    cam, gate = plan.waves[0].classes
    assert cam.pull_bytes is not None
    assert (gate.pull_bytes, gate.later_bytes, plan.waves[0].pull_bytes) == (None, None, None)
    assert plan.refusals == ()


def test_refusals_name_held_classes_and_failed_gates() -> None:
    offers = _offers()
    offers[CAM] = ClassOffer(
        hw_class=CAM, variant=None, refusal=f"{CAM}: no variant passes the accuracy gate (x)"
    )
    plan = make_plan(_spec([{"percent": 100}]), _fleet(), offers, now=NOW, held={GATE: "older"})
    assert plan.refusals == (
        f"{GATE}: in rollout older until it ends",
        f"{CAM}: no variant passes the accuracy gate (x)",
    )


@pytest.mark.parametrize(("rate", "minutes"), [(3, 7), (20, 1), (100, 1)])
def test_a_paced_wave_says_how_many_minutes_it_takes_at_least(rate: int, minutes: int) -> None:
    fleet = [Device(f"cam-{i}", CAM) for i in range(20)]
    plan = make_plan(_spec([{"percent": 100}], rate_per_min=rate), fleet, _offers(), now=NOW)
    cam, gate = plan.waves[0].classes
    assert cam.paced_minutes == minutes
    assert gate.paced_minutes is None  # it adds nobody
    assert any(f"at most {rate} devices" in note for note in plan.notes)


def test_windows_say_whether_they_are_open_now() -> None:
    windows = {
        CAM: MaintenanceWindow(start_minute=22 * 60, end_minute=2 * 60),
        GATE: MaintenanceWindow(start_minute=2 * 60, end_minute=4 * 60),
    }
    plan = make_plan(
        _spec([{"percent": 100}], windows=windows, all_or_nothing=True),
        _fleet(),
        _offers(),
        now=NOW,
    )
    assert f"{CAM}: newly targeted only 22:00-02:00 UTC (open now)" in plan.notes
    assert f"{GATE}: newly targeted only 02:00-04:00 UTC (closed now)" in plan.notes
    assert "all or nothing: one class failing rolls every class back" in plan.notes


def test_devices_without_state_and_enrolled_ones_never_seen_are_named() -> None:
    fleet = [*_fleet(4), Device("mystery", None)]
    enrolled = {d.device_id: str(d.hw_class) for d in fleet if d.hw_class} | {
        "cam-new": CAM,
        "other-1": "medical-cart-cpu",
    }
    plan = make_plan(_spec([{"percent": 100}]), fleet, _offers(), now=NOW, enrolled=enrolled)
    assert plan.unclassified == ("mystery",)
    assert plan.never_seen == {CAM: ("cam-new",)}
    assert all("mystery" not in _reached(plan, 0, name) for name in (CAM, GATE))


def test_the_terms_of_a_wave_are_its_own_else_the_spec_s() -> None:
    waves: list[dict[str, Any]] = [
        {"count": 1, "min_soak_s": 60, "success_ratio": 0.5},
        {"percent": 100},
    ]
    plan = make_plan(_spec(waves, min_soak_s=10, silence_s=30), _fleet(), _offers(), now=NOW)
    first, last = plan.waves[0].terms, plan.waves[1].terms
    assert (first.min_soak_s, first.success_ratio, first.silence_s) == (60, 0.5, 30)
    assert (last.min_soak_s, last.success_ratio, last.timeout_s) == (10, None, None)
    assert (plan.waves[0].reach, plan.waves[1].reach) == (
        "the first 1 of each class",
        "100% of each class",
    )
