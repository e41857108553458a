"""Forged, replayed and stale manifests against a live agent, on the real broker.

No coordinator runs (it would re-assert its own manifest): the test publishes the
trust document and the manifests itself, on the coordinator's account, which is
the account allowed to write manifest topics. The agent must reject each attack
with the right reason, say so in an event and in its state, and keep serving.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from agent.lifecycle import Stage
from edgefleet.fleet import Fleet
from models import DemoModel
from schemas import (
    MANIFEST_KIND,
    EventKind,
    KeyPair,
    Reason,
    Release,
    Role,
    encode,
    topics,
)
from schemas.envelope import Envelope
from tests.integration.fleetkit import (
    INTEL,
    JETSON,
    MakeFleet,
    Wire,
    coordinator_session,
    live,
    manifest,
    profiles,
    publish_fetchable,
    publish_manifest,
    release_for,
    run,
    sign,
)

APPLIED = 5


@dataclass(frozen=True)
class Attack:
    name: str
    payload: bytes
    reason: Reason


def _attacks(fleet: Fleet, stable_v1: Release) -> list[Attack]:
    home = fleet.home
    manifest_key = home.key(Role.MANIFEST)
    operator_key = home.key(Role.OPERATOR)
    good_next = manifest(JETSON, APPLIED + 1, stable_v1)
    signed = sign(good_next, manifest_key)
    body = encode(good_next)
    at = signed.index(body) + len(body) // 2
    tampered = signed[:at] + bytes([signed[at] ^ 0x01]) + signed[at + 1 :]
    unsigned = encode(Envelope(kind=MANIFEST_KIND, body=body, sigs=()))
    return [
        Attack("tampered body", tampered, Reason.BAD_SIGNATURE),
        Attack("unsigned", unsigned, Reason.UNSIGNED),
        Attack("signed by the operator key", sign(good_next, operator_key), Reason.UNKNOWN_KEY),
        Attack("signed by a stranger", sign(good_next, KeyPair.generate()), Reason.UNKNOWN_KEY),
        Attack(
            "replayed (lower seq)",
            sign(manifest(JETSON, APPLIED - 2, stable_v1), manifest_key),
            Reason.REPLAYED,
        ),
        Attack(
            "same seq, other content",
            sign(manifest(JETSON, APPLIED, None), manifest_key),
            Reason.REPLAYED,
        ),
        Attack(
            "expired",
            sign(
                manifest(JETSON, APPLIED + 1, stable_v1, issued_at=time.time() - 7200), manifest_key
            ),
            Reason.EXPIRED,
        ),
        Attack(
            "another class",
            sign(manifest(INTEL, APPLIED + 1, stable_v1), manifest_key),
            Reason.WRONG_CLASS,
        ),
        Attack("not msgpack", b"\xc1 not a manifest", Reason.MALFORMED),
    ]


def test_agent_rejects_manifest_attacks_and_keeps_serving(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 1})
    run(_attack(fleet, demo_models["digits-v1"]))


async def _attack(fleet: Fleet, model: DemoModel) -> None:
    (device_id,) = fleet.home.devices()
    v1 = release_for(model, profiles(fleet)[JETSON])
    async with (
        live(fleet, coordinator=False),
        Wire.open(fleet.home) as wire,
        coordinator_session(fleet.home) as cloud,
    ):
        agent = fleet.agents[device_id]
        await publish_fetchable(cloud, model.path.read_bytes(), name=model.name)
        await cloud.publish(topics.trust(), fleet.home.trust(), retain=True)
        key = fleet.home.key(Role.MANIFEST)
        await publish_manifest(cloud, JETSON, sign(manifest(JETSON, APPLIED, v1), key))
        await wire.until(
            lambda: (
                agent.stage is Stage.SERVING
                and agent.active_release == v1
                and (s := wire.states.get(device_id)) is not None
                and s.active_release == v1.release_id
            ),
            what="the first manifest to be applied",
        )
        assert agent.applied_seq == APPLIED

        for attack in _attacks(fleet, v1):
            seen = len(wire.events)
            served = agent.inferences_total
            await publish_manifest(cloud, JETSON, attack.payload)

            event = await wire.until(
                lambda seen=seen: next(  # type: ignore[misc]
                    (e for e in wire.events[seen:] if e.kind is EventKind.MANIFEST_REJECTED),
                    None,
                ),
                what=f"a manifest_rejected event for {attack.name}",
            )
            assert event.device_id == device_id
            assert event.reason == attack.reason.value, attack.name
            state = await wire.until(
                lambda detail=event.detail: (  # type: ignore[misc]
                    s
                    if (s := wire.states.get(device_id)) is not None
                    and s.last_rejection is not None
                    and s.last_rejection.detail == detail
                    else None
                ),
                what=f"the device state to report {attack.name}",
            )
            assert state.last_rejection is not None
            assert state.last_rejection.reason == attack.reason.value, attack.name
            assert state.active_release == v1.release_id
            assert state.applied_seq == APPLIED

            # Still serving the model it had, and inference never stopped.
            await wire.until(
                lambda served=served: agent.inferences_total >= served + 10,  # type: ignore[misc]
                what=f"inference to go on after {attack.name}",
            )
            assert agent.active_release == v1, attack.name
            assert agent.stage is Stage.SERVING, attack.name
            assert agent.applied_seq == APPLIED, attack.name

        # None of it poisoned the agent: the next genuine manifest applies.
        rejected = len(wire.events)
        await publish_manifest(cloud, JETSON, sign(manifest(JETSON, APPLIED + 1, v1), key))
        await wire.until(
            lambda: (s := wire.states.get(device_id)) is not None and s.applied_seq == APPLIED + 1,
            what="the genuine manifest to be applied",
        )
        assert agent.applied_seq == APPLIED + 1
        assert agent.active_release == v1
        assert not [e for e in wire.events[rejected:] if e.kind is EventKind.MANIFEST_REJECTED]
