"""Attacks on the broker itself, against a real Mosquitto from the repo's config: client-id
takeover from every listener, a device's junk and oversized publishes, a Will after an
error exit, and a certificate revoked while the broker runs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest

from broker.acl import Accounts, render_acl
from broker.pki import cert_serial
from broker.session import Endpoint, Message, PublishRefused, Session, TransportError, Will
from tests.broker.conftest import DEVICES
from tests.broker.localfleet import FleetPKI, LocalFleet, broker_tempdir
from tests.broker.test_broker_session import NOT_AUTHORIZED, P, collect_until, run

ACCOUNTS = Accounts(
    operators=("operator",), dashboards=("dashboard",), admins=("watcher", "standby")
)
COORDINATOR_PRESENCE = f"{P}/coordinator/presence"
CAM1_PRESENCE = f"{P}/devices/cam-001/presence"


@pytest.fixture
def guarded(pki: FleetPKI) -> Iterator[LocalFleet]:
    """A broker with two extra admin accounts: ``watcher`` follows everything,
    ``standby`` has the coordinator's rights under another name."""
    with (
        broker_tempdir() as tmp,
        LocalFleet(tmp, devices=DEVICES, accounts=ACCOUNTS, pki=pki) as running,
    ):
        yield running


class Follower:
    """Everything published under fleet/v1, as the ``watcher`` account sees it."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.seen: list[Message] = []
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Follower:
        await self.session.subscribe(f"{P}/#")
        self._task = asyncio.create_task(self._follow())
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _follow(self) -> None:
        async for message in self.session.messages():
            self.seen.append(message)
            # Waiters hold the old event; a fresh one makes each arrival an edge.
            self._arrived.set()
            self._arrived = asyncio.Event()

    async def until(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(5):  # a hang guard
            while not predicate():
                await self._arrived.wait()

    async def fence(self, owner: Session, topic: str) -> None:
        """Publish a marker with ``owner`` and wait until it arrives: what was published
        before it has arrived too."""
        marker = f"fence-{len(self.seen)}".encode()
        await owner.publish(topic, marker)
        await self.until(lambda: any(m.topic == topic and m.payload == marker for m in self.seen))

    def payloads(self, topic: str) -> list[bytes]:
        return [
            m.payload for m in self.seen if m.topic == topic and not m.payload.startswith(b"fence")
        ]


@pytest.mark.parametrize("stolen_id", ["coordinator", "cam-001"])
def test_no_account_or_device_can_take_over_another_client_id(
    guarded: LocalFleet, stolen_id: str
) -> None:
    """The broker binds each client id to its account (or certificate CN): whoever asks for
    the coordinator's or another device's id gets its own, and the owner stays online."""
    intruders: dict[str, Endpoint] = {
        "dashboard over websockets": guarded.dashboard_endpoint("dashboard"),
        "operator on the services listener": guarded.service_endpoint("operator"),
        "admin with the coordinator's rights": guarded.service_endpoint("standby"),
        "another device's certificate": guarded.device_endpoint("cam-002"),
        "a device claiming its own id": guarded.device_endpoint("gw-001"),
    }

    async def scenario() -> tuple[int, int, list[bytes], list[bytes]]:
        async with (
            Session(guarded.service_endpoint("watcher"), client_id="watcher") as watch,
            Follower(watch) as follower,
            Session(
                guarded.service_endpoint("coordinator"),
                client_id="coordinator",
                will=Will(topic=COORDINATOR_PRESENCE, payload=b"offline"),
            ) as coord,
            Session(
                guarded.device_endpoint("cam-001"),
                client_id="cam-001",
                will=Will(topic=CAM1_PRESENCE, payload=b"offline"),
            ) as cam,
        ):
            await coord.publish(COORDINATOR_PRESENCE, b"online", retain=True)
            await cam.publish(CAM1_PRESENCE, b"online", retain=True)
            for what, endpoint in intruders.items():
                async with Session(endpoint, client_id=stolen_id) as intruder:
                    # Stay connected across a round trip of both owners.
                    await intruder.subscribe(f"{P}/trust")
                    await follower.fence(coord, COORDINATOR_PRESENCE)
                    await follower.fence(cam, CAM1_PRESENCE)
                    assert coord.connected, what
                    assert cam.connected, what
            return (
                coord.generation,
                cam.generation,
                follower.payloads(COORDINATOR_PRESENCE),
                follower.payloads(CAM1_PRESENCE),
            )

    coord_gen, cam_gen, coord_presence, cam_presence = run(scenario())
    # Never reconnected: no connection of theirs was taken over, and no Will fired.
    assert (coord_gen, cam_gen) == (1, 1)
    assert coord_presence == [b"online"]
    assert cam_presence == [b"online"]


def test_session_that_exits_by_an_exception_leaves_its_will(guarded: LocalFleet) -> None:
    class CrashError(Exception):
        pass

    async def crash() -> None:
        async with Session(
            guarded.service_endpoint("coordinator"),
            client_id="coordinator",
            will=Will(topic=COORDINATOR_PRESENCE, payload=b"offline"),
        ) as coord:
            await coord.publish(COORDINATOR_PRESENCE, b"online", retain=True)
            raise CrashError

    async def scenario() -> list[bytes]:
        async with (
            Session(guarded.service_endpoint("watcher"), client_id="watcher") as watch,
            Follower(watch) as follower,
        ):
            with pytest.raises(CrashError):
                await crash()
            await follower.until(lambda: b"offline" in follower.payloads(COORDINATOR_PRESENCE))
            return follower.payloads(COORDINATOR_PRESENCE)

    assert run(scenario()) == [b"online", b"offline"]


JUNK = [
    f"{P}/devices/cam-001/junk",
    f"{P}/devices/cam-001/state/deeper",
    f"{P}/devices/cam-001/presence/x/y",
    *(f"{P}/devices/cam-001/junk-{i}" for i in range(20)),
]


def test_device_junk_topics_are_refused_and_nothing_is_retained(guarded: LocalFleet) -> None:
    async def scenario() -> list[Message]:
        async with Session(guarded.device_endpoint("cam-001"), client_id="cam-001") as cam:
            for topic in JUNK:
                with pytest.raises(PublishRefused) as refused:
                    await cam.publish(topic, b"junk" * 100, retain=True)
                assert refused.value.reason_code == NOT_AUTHORIZED, topic
            await cam.publish(f"{P}/devices/cam-001/state", b"real state", retain=True)
        # A newcomer sees only what is retained: the one real channel.
        async with Session(guarded.service_endpoint("watcher"), client_id="watcher") as watch:
            await watch.subscribe(f"{P}/#")
            await watch.publish(f"{P}/coordinator/presence", b"fence")
            return await collect_until(watch, f"{P}/coordinator/presence")

    got = run(scenario())
    assert [(m.topic, m.payload) for m in got] == [
        (f"{P}/devices/cam-001/state", b"real state"),
        (f"{P}/coordinator/presence", b"fence"),
    ]


def test_device_oversized_packet_is_delivered_to_no_one(guarded: LocalFleet) -> None:
    """Above max_packet_size (1 MiB + 4 KiB) the broker drops the sender's connection:
    no live subscriber gets the packet and nothing is retained."""
    state = f"{P}/devices/cam-001/state"

    async def scenario() -> tuple[str, list[Message], list[Message]]:
        async with (
            Session(guarded.service_endpoint("watcher"), client_id="watcher") as watch,
            Follower(watch) as follower,
        ):
            async with Session(guarded.device_endpoint("cam-001"), client_id="cam-001") as cam:
                with pytest.raises(TransportError) as failed:
                    await cam.publish(state, b"x" * (1024 * 1024 + 8192), retain=True, timeout=3)
            # paho would resend the packet on every reconnect (and be cut off again): a new
            # session sends the fence.
            async with Session(guarded.device_endpoint("cam-001"), client_id="cam-001") as cam:
                await follower.fence(cam, f"{P}/devices/cam-001/events")
            live = [m for m in follower.seen if m.topic == state]
        async with Session(guarded.service_endpoint("watcher"), client_id="watcher") as watch:
            await watch.subscribe(f"{P}/#")
            await watch.publish(f"{P}/coordinator/presence", b"fence")
            retained = await collect_until(watch, f"{P}/coordinator/presence")
        return str(failed.value), live, retained

    error, live, retained = run(scenario())
    assert "not acknowledged" in error
    assert live == []
    assert [m.topic for m in retained] == [f"{P}/coordinator/presence"]


def test_coordinator_may_publish_a_full_chunk(guarded: LocalFleet) -> None:
    chunk = f"{P}/artifacts/{'ab' * 32}/0"

    async def scenario() -> None:
        async with Session(guarded.service_endpoint("coordinator"), client_id="c") as coord:
            await coord.publish(chunk, b"\0" * (1024 * 1024), retain=True)

    run(scenario())


def test_revoked_certificate_is_refused_after_a_reload_and_others_stay(
    guarded: LocalFleet,
) -> None:
    async def scenario() -> None:
        endpoint = guarded.device_endpoint("cam-001")
        assert endpoint.cert_file is not None
        serial = cert_serial(endpoint.cert_file.read_bytes())
        async with Session(guarded.device_endpoint("cam-002"), client_id="cam-002") as other:
            async with Session(endpoint, client_id="cam-001"):
                pass
            remaining = [g for g in DEVICES if g.device_id != "cam-001"]
            guarded.broker.reload(
                acl=render_acl(remaining, ACCOUNTS), crl=guarded.pki.crl([serial])
            )
            refused = False
            for _ in range(50):  # SIGHUP is asynchronous
                try:
                    async with Session(endpoint, client_id="cam-001", connect_timeout=2):
                        await asyncio.sleep(0.05)
                except TransportError:
                    refused = True
                    break
            assert refused
            assert other.connected
            assert other.generation == 1
            await other.publish(f"{P}/devices/cam-002/state", b"still here", retain=True)
        async with Session(guarded.device_endpoint("gw-001"), client_id="gw-001") as newcomer:
            await newcomer.publish(f"{P}/devices/gw-001/state", b"new connection")

    run(scenario(), timeout=40)
