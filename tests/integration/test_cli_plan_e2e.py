"""``edgefleet rollout plan`` against a live fleet (real broker, coordinator and agents):
it publishes nothing, and its waves are the fleet's devices by bucket, offline ones named.
And every operator command's ``--json``, parsed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from edgefleet.cli import main
from edgefleet.fleet import Fleet
from edgefleet.viewcli import EXIT_FAILED
from models import DemoModel
from schemas import Phase, RolloutSpec, RolloutStatus, bucket, topics
from schemas.topics import TopicKind
from tests.integration.fleetkit import (
    INTEL,
    JETSON,
    MakeFleet,
    Wire,
    coordinator_session,
    live,
    stop_agent,
)

OFFLINE = ("jetson-001", "intel-002")
"""Reported once, then switched off: listed as converging later."""
NEVER = "jetson-004"
"""Enrolled, never started: no retained state at all."""


@contextlib.contextmanager
def _serving(
    fleet: Fleet, *, offline: tuple[str, ...] = (), never: tuple[str, ...] = ()
) -> Iterator[Wire]:
    """The coordinator and every agent but ``never`` on a loop of their own (the CLI runs
    ``asyncio.run`` in the test's thread, as from a shell); once all have reported, the
    ``offline`` ones are stopped. Yields a wire following every topic, fed meanwhile."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()
    opened: list[Wire] = []
    agents = [d for d in fleet.home.devices() if d not in never]

    async def serve() -> None:
        async with (
            Wire.open(fleet.home, filters=(topics.everything(),)) as wire,
            live(fleet, agents=agents),
        ):
            opened.append(wire)
            await wire.until(lambda: set(agents) <= set(wire.states), what="every state")
            # The coordinator's connect-time trust comes in its own time: in before the
            # test counts what arrives after it.
            await wire.until(
                lambda: any(m.topic == topics.trust() for m in wire.raw) or None,
                what="the trust",
            )
            for device_id in offline:
                await stop_agent(fleet, device_id)
            await wire.until(
                lambda: all(wire.presence.get(d) == b"offline" for d in offline),
                what="the stopped agents offline",
            )
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),))
    thread.start()
    try:
        assert ready.wait(90), "the fleet did not come up"
        yield opened[0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        loop.close()


def _fenced(fleet: Fleet, wire: Wire) -> None:
    """Wait until everything published before now has reached ``wire``: a QoS 1 message
    sent after it (on ``coordinator/fence``, which the coordinator ignores when it is not
    its own) arrives behind it. That it arrives also shows the wire was listening."""

    async def go() -> None:
        async with coordinator_session(fleet.home) as admin:
            await admin.publish(topics.coordinator_fence(), b"plan-test/0")

    asyncio.run(go())
    waiting = threading.Event()
    for _ in range(300):  # a hang guard: the fence comes back within milliseconds
        if any(m.payload == b"plan-test/0" for m in list(wire.raw)):
            return
        waiting.wait(0.1)
    msg = "the fence did not come back"
    raise AssertionError(msg)


def _cli(fleet: Fleet, *args: str) -> int:
    return main(["--home", str(fleet.home.root), *args])


_ROLLOUT_KINDS = frozenset(TopicKind) - {
    TopicKind.DEVICE,
    TopicKind.COORDINATOR_PRESENCE,
    TopicKind.COORDINATOR_FENCE,
}
"""What a rollout's start sets moving: specs, uploads, and then statuses, artifacts and
manifests (with no rollout, the coordinator publishes none of them either)."""


def _rollout_traffic(wire: Wire, since: int) -> list[str]:
    """Topics of the rollout kinds seen after the ``since``-th message."""
    return [m.topic for m in list(wire.raw)[since:] if topics.parse(m.topic).kind in _ROLLOUT_KINDS]


def test_plan_reads_the_live_fleet_publishes_nothing_and_matches_its_buckets(
    make_fleet: MakeFleet,
    demo_models: dict[str, DemoModel],
    capsys: pytest.CaptureFixture[str],
) -> None:
    fleet = make_fleet({JETSON: 5, INTEL: 3})
    v2 = demo_models["digits-v2"]
    states = {d: c for d, c in fleet.home.devices().items() if d != NEVER}
    plan = ["rollout", "plan", "--class", JETSON, "--class", INTEL, "--model", str(v2.path)]
    plan += ["--classes", str(fleet.profiles), "--waves", "1dev,50,100", "--id", "planned"]
    with _serving(fleet, offline=OFFLINE, never=(NEVER,)) as wire:
        before = len(wire.raw)
        assert _cli(fleet, *plan, "--json") == 0
        document = json.loads(capsys.readouterr().out)
        assert _cli(fleet, *plan, "--ids") == 0
        text = capsys.readouterr().out
        _fenced(fleet, wire)
        assert _rollout_traffic(wire, before) == []

    assert document["rollout_id"] == "planned"
    (offer_jetson, offer_intel) = document["offers"]
    assert (offer_jetson["hw_class"], offer_jetson["variant"]) == (JETSON, "fp32")
    assert offer_intel["pull_bytes"] == v2.path.stat().st_size  # one file, no golden set
    assert offer_jetson["gate"] == "no accuracy gate"

    seen: set[str] = set()
    for i, wave in enumerate(document["waves"]):
        for lane in wave["classes"]:
            name = lane["hw_class"]
            ranked = sorted((bucket("planned", d), d) for d, c in states.items() if c == name)
            if i == 0:  # 1dev: the device of the lowest bucket
                expected = {ranked[0][1]}
            else:
                expected = {d for b, d in ranked if b < lane["cutoff_bp"]} - seen
            assert set(lane["new"]) | set(lane["offline"]) == expected, (i, name)
            assert set(lane["offline"]) == expected & set(OFFLINE)
            assert lane["pull_bytes"] == len(lane["new"]) * v2.path.stat().st_size
            seen |= expected
    assert seen == set(states)
    assert document["never_seen"] == {JETSON: [NEVER]}
    assert document["refusals"] == []

    assert "rollout plan planned" in text
    assert "nothing published" in text
    for device_id in OFFLINE:
        assert device_id in text
    assert f"{JETSON}: enrolled, never reported: {NEVER}" in text


def _one_json(out: str) -> Any:
    return json.loads(out)


def _json_lines(out: str) -> list[Any]:
    return [json.loads(line) for line in out.splitlines()]


def test_every_operator_command_prints_json_that_parses(
    make_fleet: MakeFleet,
    demo_models: dict[str, DemoModel],
    capsys: pytest.CaptureFixture[str],
) -> None:
    fleet = make_fleet({JETSON: 2, INTEL: 1})
    v1, v2 = demo_models["digits-v1"].path, demo_models["digits-v2"].path
    start = ["rollout", "start", "--class", JETSON, "--class", INTEL, "--classes"]
    start += [str(fleet.profiles)]
    out: Callable[[], str] = lambda: capsys.readouterr().out  # noqa: E731
    with _serving(fleet):
        assert (
            _cli(fleet, *start, "--model", str(v1), "--waves", "100", "--id", "one", "--json") == 0
        )
        spec = RolloutSpec.model_validate(_one_json(out()))
        assert (spec.id, spec.generation, spec.classes) == ("one", 1, (JETSON, INTEL))

        assert _cli(fleet, "rollout", "status", "one", "--watch", "--json", "--timeout", "60") == 0
        statuses = [RolloutStatus.model_validate(s) for s in _json_lines(out())]
        assert statuses[-1].phase is Phase.COMPLETED
        assert _cli(fleet, "rollout", "status", "one", "--json") == 0
        assert RolloutStatus.model_validate(_one_json(out())).phase is Phase.COMPLETED

        plan = ["rollout", "plan", *start[2:], "--model", str(v2), "--waves", "50,100"]
        assert _cli(fleet, *plan, "--id", "two", "--json") == 0
        assert [w["percent"] for w in _one_json(out())["waves"]] == [50.0, 100.0]

        assert _cli(fleet, *start, "--model", str(v2), "--waves", "50,100", "--id", "two") == 0
        assert out() == "two\n"
        for verb, generation, desired in (
            ("pause", 2, "paused"),
            ("resume", 3, "active"),
            ("abort", 4, "aborted"),
        ):
            assert _cli(fleet, "rollout", verb, "two", "--json") == 0
            changed = RolloutSpec.model_validate(_one_json(out()))
            assert (changed.generation, changed.desired.value) == (generation, desired)
        assert _cli(fleet, "rollout", "status", "two", "--watch", "--json") == EXIT_FAILED
        assert _json_lines(out())[-1]["phase"] == "rolled_back"

        assert _cli(fleet, "rollout", "list", "--json") == 0
        assert [s["id"] for s in _one_json(out())] == ["one", "two"]
        assert _cli(fleet, "fleet", "ls", "--json") == 0
        rows = _one_json(out())
        assert {r["device_id"] for r in rows} == set(fleet.home.devices())
        store = str(fleet.workdir / "coordinator")
        assert _cli(fleet, "audit", "two", "--data", store, "--json") == 0
        assert {e["rollout"] for e in _one_json(out())} == {"two"}
