"""Garbage over the coordinator's retained topics is put right at once (issue 7 rule 5:
"Whatever differs from the store is re-asserted at once: trust, manifests, statuses,
specs and artifacts"), while the coordinator runs and across its restart.

Each example overwrites the retained trust, the class manifest, the rollout's spec and
status and its artifact's meta and first chunk with damaged copies of themselves
(truncated, bit-flipped, emptied, random), on the accounts allowed to write them.
Within a few seconds the broker must hold the genuine bytes again, no service may have
crashed, and the agent must still be serving and inferring.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import strategies as st

from agent.lifecycle import Stage
from broker.session import Session
from edgefleet.fleet import Fleet
from edgefleet.home import COORDINATOR, OPERATOR
from models import DemoModel
from schemas import topics
from tests.fuzz import strategies as fz
from tests.fuzz.harness import (
    Bridge,
    Crashes,
    Publishers,
    Services,
    add_fuzz_accounts,
    drive,
    failure,
    watching,
)
from tests.fuzz.strategies import Sample
from tests.integration.fleetkit import JETSON, MakeFleet, Wire, release_id, roll_out, run

pytestmark = pytest.mark.fuzz

AGENT = "jetson-000"
ROLLOUT = "install-v1"
RESTORE_TIMEOUT_S = 15.0
"""How long the coordinator may take to put a retained topic right (a hang guard)."""


@dataclass
class Watch:
    fleet: Fleet
    services: Services
    publishers: Publishers
    wire: Wire
    crashes: Crashes
    genuine: dict[str, bytes]
    seen: int = 0

    def last(self, topic: str) -> bytes | None:
        """What the broker holds for ``topic``: the last publish on it, in broker order."""
        return next((m.payload for m in reversed(self.wire.raw) if m.topic == topic), None)

    def differing(self) -> list[str]:
        return [t for t, payload in self.genuine.items() if self.last(t) != payload]

    def problems(self) -> list[str]:
        return self.services.dead() + self.crashes.since(self.seen)

    async def after(self, batch: Sequence[Sample]) -> None:
        agent = self.fleet.agents[AGENT]
        served = agent.inferences_total
        problems: list[str] = []
        try:
            await self.wire.until(
                lambda: self.problems() or not self.differing(),
                what="the genuine retained topics",
                timeout=RESTORE_TIMEOUT_S,
            )
            await self.wire.until(
                lambda: self.problems() or agent.inferences_total >= served + 5,
                what="the agent to infer",
            )
        except AssertionError as exc:
            problems.append(f"{exc}; still damaged: {self.differing()}")
        if agent.stage is not Stage.SERVING:
            problems.append(f"agent {AGENT} is {agent.stage.value}")
        problems = [*self.problems(), *problems]
        self.seen = len(self.crashes.records)
        assert not problems, failure("the retained topics were not put right", batch, problems)


async def retained(fleet: Fleet, wanted: Sequence[str]) -> dict[str, bytes]:
    """The broker's retained messages on ``wanted``, read by a fresh subscriber."""
    found: dict[str, bytes] = {}
    session = Session(fleet.home.service_endpoint(OPERATOR), client_id="fuzz-retained-reader")
    async with session:
        await session.subscribe(*wanted)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                async for message in session.messages():
                    if message.retain:
                        found[message.topic] = message.payload
                    if found.keys() >= set(wanted):
                        break
    return found


def damaged(genuine: dict[str, bytes]) -> st.SearchStrategy[list[Sample]]:
    def sample(topic: str) -> st.SearchStrategy[Sample]:
        account = OPERATOR if topic.endswith("/spec") else COORDINATOR
        payloads = fz.hostile(fz.pick([genuine[topic]]), near_limit=False).filter(
            lambda p: p[0] != genuine[topic]
        )
        return fz.samples(account, topic, payloads, retain=True, label="damaged")

    return st.lists(st.one_of(*(sample(t) for t in genuine)), min_size=1, max_size=12)


def test_coordinator_puts_damaged_retained_topics_right(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 1})
    run(_fuzz(fleet, demo_models))


async def _fuzz(fleet: Fleet, demo_models: dict[str, DemoModel]) -> None:
    model = demo_models["digits-v1"]
    services = Services(fleet)
    publishers = Publishers(fleet)
    await add_fuzz_accounts(fleet)
    with watching() as crashes:
        try:
            async with Wire.open(fleet.home, filters=(topics.everything(),)) as wire:
                services.start_coordinator()
                services.start_agent(AGENT)
                operator = await publishers.session(OPERATOR)
                await roll_out(operator, fleet, wire, model, rollout_id=ROLLOUT)
                wanted = [
                    topics.trust(),
                    topics.class_manifest(JETSON),
                    topics.rollout_spec(ROLLOUT),
                    topics.rollout_status(ROLLOUT),
                    topics.artifact_meta(model.sha256),
                    topics.artifact_chunk(model.sha256, 0),
                ]
                genuine = await retained(fleet, wanted)
                assert genuine.keys() == set(wanted), (
                    f"not retained: {set(wanted) - genuine.keys()}"
                )
                watch = Watch(fleet, services, publishers, wire, crashes, genuine)
                await _hypothesis(watch)
                await _across_restart(watch)
                assert await retained(fleet, wanted) == genuine
                v2 = demo_models["digits-v2"]
                operator = await publishers.session(OPERATOR)
                await roll_out(operator, fleet, wire, v2, rollout_id="after-damage")
                active = fleet.agents[AGENT].active_release
                assert active is not None
                assert active.release_id == release_id(v2)
        finally:
            await publishers.close()
            await services.close()


async def _hypothesis(watch: Watch) -> None:
    bridge = Bridge(asyncio.get_running_loop())

    async def one(batch: list[Sample]) -> None:
        await watch.publishers.publish_all(batch)
        await watch.after(batch)

    await asyncio.to_thread(
        drive, damaged(watch.genuine), lambda batch: bridge.call(one(batch)), ci_examples=3
    )


async def _across_restart(watch: Watch) -> None:
    """Damage every topic while the coordinator is down: it starts, and puts them right."""
    await watch.services.stop(COORDINATOR)
    batch = [
        Sample(
            OPERATOR if topic.endswith("/spec") else COORDINATOR,
            topic,
            payload[: len(payload) // 2],
            True,
            "truncated to half while the coordinator was down",
        )
        for topic, payload in watch.genuine.items()
    ]
    await watch.publishers.publish_all(batch)
    watch.services.start_coordinator()
    await watch.after(batch)
