"""What the coordinator exports for Prometheus, without a broker or HTTP: the fleet view's
census kept as devices change, the families a scrape builds from it and from the rollout
records and counters, read back with prometheus_client's own text parser. The HTTP path
is ``tests/integration/test_metrics_e2e.py``."""

from __future__ import annotations

import random
from collections.abc import Iterable

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from coordinator.config import MetricsConfig
from coordinator.exporter import OTHER, Scrape, families
from coordinator.fleet import Census, FleetView
from coordinator.metrics import FAILED, REFUSALS, WRITE_BUCKETS_S, Counters
from coordinator.rollout import RolloutRecord
from schemas import LanePhase, Mode, Phase, WaveCounts
from tests.coordinator.records import (
    CLASS,
    T0,
    census_by_walk,
    device_state,
    make_record,
    with_lane,
)

OTHER_CLASS = "intel-lowpower-detector"


class _Fixed(Collector):
    def __init__(self, found: list[Metric]) -> None:
        self._found = found

    def collect(self) -> Iterable[Metric]:
        return self._found


def _exposed(scrape: Scrape, config: MetricsConfig | None = None) -> dict[str, Metric]:
    """The scrape's text exposition, parsed back."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(families(scrape, config or MetricsConfig())))
    text = generate_latest(registry).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def _scrape(**changes: object) -> Scrape:
    fields: dict[str, object] = {
        "census": {},
        "rollouts": (),
        "counters": Counters(),
        "view_age_s": None,
        "view_complete": False,
        "connected": True,
    }
    return Scrape(**(fields | changes))  # type: ignore[arg-type]


def _values(family: Metric, *names: str) -> dict[tuple[str, ...], float]:
    return {tuple(s.labels[n] for n in names): s.value for s in family.samples}


def test_the_census_follows_every_change_as_a_full_recount_would() -> None:
    fleet = FleetView()
    rng = random.Random(7)
    ids = [f"cam-{i:03d}" for i in range(40)]
    releases = [None, "digits-v1:fp32@aaaaaaaaaaaa", "digits-v2:fp16@bbbbbbbbbbbb"]
    for step in range(2000):
        device_id = rng.choice(ids)
        match rng.randrange(4):
            case 0:
                fleet.on_presence(device_id, rng.random() < 0.7)
            case 1:
                state = device_state(
                    device_id,
                    hw_class=rng.choice((CLASS, OTHER_CLASS)),
                    active_release=rng.choice(releases),
                    mode=rng.choice(list(Mode)),
                    updated_at=T0 + step,
                )
                fleet.on_state(state)
            case 2:
                fleet.forget(device_id)
            case _:
                fleet.tick(T0 + step)
        assert fleet.census() == census_by_walk(fleet), step


def test_the_view_is_as_old_as_the_first_tick_after_its_last_change() -> None:
    fleet = FleetView()
    fleet.tick(T0)
    assert fleet.changed_at is None
    fleet.on_presence("cam-1", True)
    fleet.tick(T0 + 1)
    fleet.tick(T0 + 2)
    assert fleet.changed_at == T0 + 1
    fleet.on_state(device_state("cam-1"))
    fleet.tick(T0 + 3)
    assert fleet.changed_at == T0 + 3


def test_devices_are_exported_by_class_release_mode_and_online() -> None:
    fleet = FleetView()
    for i in range(5):
        fleet.on_state(device_state(f"cam-{i}", active_release="r1"))
        fleet.on_presence(f"cam-{i}", i < 3)
    fleet.on_presence("fresh", True)  # online, no state yet
    exposed = _exposed(_scrape(census=fleet.census()))
    devices = _values(exposed["edgefleet_devices"], "hw_class", "release", "mode", "online")
    assert devices == {
        (CLASS, "r1", "serving", "true"): 3.0,
        (CLASS, "r1", "serving", "false"): 2.0,
        ("", "", "", "true"): 1.0,
    }


def test_device_series_are_capped_and_long_labels_cut_and_merged() -> None:
    census: dict[Census, int] = {(CLASS, f"release-{i}", "serving", True): i + 1 for i in range(10)}
    long = "x" * 200
    census[OTHER_CLASS, long + "a", "serving", True] = 100
    census[OTHER_CLASS, long + "b", "serving", True] = 50
    exposed = _exposed(_scrape(census=census), MetricsConfig(device_series=3))
    devices = _values(exposed["edgefleet_devices"], "hw_class", "release", "mode", "online")
    assert len(devices) == 4
    cut = next(key for key in devices if key[0] == OTHER_CLASS)
    assert len(cut[1]) == 64
    assert devices[cut] == 150.0  # two releases that read alike once cut: one series
    assert devices[OTHER, OTHER, OTHER, OTHER] == sum(range(1, 9))  # the eight smallest
    assert sum(devices.values()) == sum(census.values())


def _finished(rollout_id: str, at: float, phase: Phase = Phase.COMPLETED) -> RolloutRecord:
    return make_record(id=rollout_id, phase=phase, updated_at=at)


def test_rollouts_export_their_phase_and_wave_per_class_live_and_latest_finished() -> None:
    live = with_lane(
        make_record(classes=(CLASS, OTHER_CLASS), wave=1),
        OTHER_CLASS,
        phase=LanePhase.ROLLED_BACK,
        counts=WaveCounts(members=10, targeted=8, healthy=3, unhealthy=5),
    )
    old = [_finished(f"done-{i}", T0 + i) for i in range(5)]
    rolled = _finished("bad-build", T0 + 10, Phase.ROLLED_BACK)
    scrape = _scrape(rollouts=[*old, live, rolled])
    exposed = _exposed(scrape, MetricsConfig(finished_rollouts=2))
    phase = _values(exposed["edgefleet_rollout_phase"], "rollout", "phase")
    assert {r for r, _ in phase} == {live.id, "bad-build", "done-4"}
    assert phase[live.id, "wave"] == 1.0
    assert phase["bad-build", "rolled_back"] == 1.0
    assert sum(v for (r, _), v in phase.items() if r == "bad-build") == 1.0
    wave = _values(exposed["edgefleet_rollout_wave"], "rollout")
    assert wave[live.id,] == 1.0
    lanes = _values(exposed["edgefleet_rollout_class_phase"], "rollout", "hw_class", "phase")
    assert lanes[live.id, OTHER_CLASS, "rolled_back"] == 1.0
    assert lanes[live.id, CLASS, "wave"] == 1.0
    assert lanes[live.id, CLASS, "rolled_back"] == 0.0
    lane_wave = _values(exposed["edgefleet_rollout_class_wave"], "rollout", "hw_class")
    assert lane_wave[live.id, CLASS] == 1.0
    counts = _values(exposed["edgefleet_rollout_class_devices"], "rollout", "hw_class", "count")
    assert counts[live.id, OTHER_CLASS, "unhealthy"] == 5.0
    assert counts[live.id, OTHER_CLASS, "targeted"] == 8.0


def test_refusals_are_counted_by_a_bounded_set_of_reasons() -> None:
    counters = Counters()
    counters.refuse("malformed")
    counters.refuse("malformed")
    counters.refuse("wrong_device")
    counters.refuse("any text a bug made up")
    counters.messages_ingested = 12
    exposed = _exposed(_scrape(counters=counters))
    refused = _values(exposed["edgefleet_messages_refused"], "reason")
    assert set(refused) == {(r,) for r in REFUSALS}
    assert refused["malformed",] == 2.0
    assert refused["wrong_device",] == 1.0
    assert refused[FAILED,] == 1.0
    assert counters.messages_dropped == 4
    ingested = exposed["edgefleet_messages_ingested"]
    assert [s.value for s in ingested.samples if s.name.endswith("_total")] == [12.0]


def test_every_count_of_the_counters_is_exported_with_its_help() -> None:
    counters = Counters(telemetry_counted=5, acks_failed=2)
    exposed = _exposed(_scrape(counters=counters))
    own = {"messages_ingested", "messages_dropped"}
    for name in counters.snapshot().keys() - own:
        family = exposed[f"edgefleet_coordinator_{name}"]
        assert family.type == "counter"
        assert family.documentation
    assert exposed["edgefleet_coordinator_telemetry_counted"].samples[0].value == 5.0


def test_store_writes_are_a_histogram_per_store() -> None:
    counters = Counters()
    for seconds in (0.0001, 0.003, 0.003, 0.2, 30.0):
        counters.store_writes.observe(seconds)
    counters.telemetry_commit_writes.observe(0.004)
    exposed = _exposed(_scrape(counters=counters))
    samples = exposed["edgefleet_store_write_seconds"].samples
    buckets = [s for s in samples if s.name.endswith("_bucket")]
    coordinator = {s.labels["le"]: s.value for s in buckets if s.labels["store"] == "coordinator"}
    assert len(coordinator) == len(WRITE_BUCKETS_S) + 1
    assert coordinator["0.0005"] == 1.0
    assert coordinator["0.005"] == 3.0
    assert coordinator["0.25"] == 4.0
    assert coordinator["10.0"] == 4.0
    assert coordinator["+Inf"] == 5.0
    count = {s.labels["store"]: s.value for s in samples if s.name.endswith("_count")}
    assert count == {"coordinator": 5.0, "telemetry": 1.0}
    total = {s.labels["store"]: s.value for s in samples if s.name.endswith("_sum")}
    assert total["coordinator"] == pytest.approx(30.2061)


def test_the_view_age_and_link_state_are_gauges() -> None:
    exposed = _exposed(_scrape(view_age_s=2.5, view_complete=True, connected=False))
    assert exposed["edgefleet_fleet_view_age_seconds"].samples[0].value == 2.5
    assert exposed["edgefleet_fleet_view_complete"].samples[0].value == 1.0
    assert exposed["edgefleet_coordinator_connected"].samples[0].value == 0.0
    assert "edgefleet_fleet_view_age_seconds" not in _exposed(_scrape())


@pytest.mark.parametrize(
    ("given", "host", "port"),
    [
        ("9464", "127.0.0.1", 9464),
        ("0.0.0.0:9100", "0.0.0.0", 9100),
        ("[::1]:9100", "::1", 9100),
        ("localhost:0", "localhost", 0),
    ],
)
def test_a_metrics_address_parses(given: str, host: str, port: int) -> None:
    assert MetricsConfig.parse(given) == MetricsConfig(host=host, port=port)


@pytest.mark.parametrize("bad", ["", "host:", "host:port", "a b:80", "1:99999", "h:-1"])
def test_a_bad_metrics_address_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="metrics"):
        MetricsConfig.parse(bad)
