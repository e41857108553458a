"""Integration tests against a real Mosquitto started from the repo's mosquitto.conf.

Mosquitto's ACLs do not refuse subscriptions, they filter delivery; so every "cannot read"
test asserts what actually arrives, fenced by a marker message published afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from broker.acl import DeviceGrant
from broker.driver import _OPENING_AT_ONCE
from broker.session import (
    ConnectRefused,
    Endpoint,
    Message,
    PublishRefused,
    Session,
    TransportError,
    Will,
)
from tests.broker.faults import drop, restart
from tests.broker.localfleet import FleetPKI, LocalFleet

T = TypeVar("T")
P = "fleet/v1"
NOT_AUTHORIZED = 0x87


def run(coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


async def collect_until(session: Session, last_topic: str, within: float = 5.0) -> list[Message]:
    """Messages up to and including the first on ``last_topic`` (the fence)."""
    got: list[Message] = []
    async with asyncio.timeout(within):
        async for message in session.messages():
            got.append(message)
            if message.topic == last_topic:
                return got
    return got


def coordinator(fleet: LocalFleet, **kwargs: Any) -> Session:
    kwargs.setdefault("client_id", "coordinator")
    return Session(fleet.service_endpoint("coordinator"), **kwargs)


def device(fleet: LocalFleet, device_id: str, **kwargs: Any) -> Session:
    kwargs.setdefault("client_id", device_id)
    return Session(fleet.device_endpoint(device_id), **kwargs)


def test_broker_starts_with_all_three_listeners(fleet: LocalFleet) -> None:
    # The start-up log first: the probes below close TLS listeners' connections without a
    # handshake, which Mosquitto logs as an OpenSSL error, whenever it gets to it.
    log = fleet.broker.log_text()
    assert "Opening websockets listen socket" in log
    assert "Error" not in log
    ports = fleet.broker.ports
    for port in (ports.devices, ports.services, ports.websockets):
        with socket.create_connection((fleet.broker.host, port), timeout=2):
            pass


def test_device_publishes_own_state_but_not_manifest_or_other_device(fleet: LocalFleet) -> None:
    async def scenario() -> list[Message]:
        async with coordinator(fleet) as coord, device(fleet, "cam-001") as dev:
            await coord.subscribe(f"{P}/#")
            await dev.publish(f"{P}/devices/cam-001/state", b"mine", retain=True)
            forged = [
                f"{P}/classes/jetson-vision-standard/manifest",
                f"{P}/devices/cam-002/state",
                f"{P}/trust",
            ]
            for topic in forged:
                with pytest.raises(PublishRefused) as refused:
                    await dev.publish(topic, b"forged", retain=True)
                assert refused.value.reason_code == NOT_AUTHORIZED
                assert refused.value.topic == topic
            await dev.publish(f"{P}/devices/cam-001/events", b"fence")
            return await collect_until(coord, f"{P}/devices/cam-001/events")

    got = run(scenario())
    assert [(m.topic, m.payload) for m in got] == [
        (f"{P}/devices/cam-001/state", b"mine"),
        (f"{P}/devices/cam-001/events", b"fence"),
    ]


def test_device_reads_trust_and_own_class_manifest_only(fleet: LocalFleet) -> None:
    async def scenario() -> list[Message]:
        async with coordinator(fleet) as coord:
            await coord.publish(f"{P}/trust", b"trust", retain=True)
            await coord.publish(f"{P}/classes/jetson-vision-standard/manifest", b"A", retain=True)
            await coord.publish(f"{P}/classes/factory-gateway-gpu/manifest", b"B", retain=True)
            await coord.publish(f"{P}/devices/gw-001/state", b"other device", retain=True)
            async with device(fleet, "cam-001") as dev:
                await dev.subscribe(
                    f"{P}/trust", f"{P}/classes/+/manifest", f"{P}/devices/#", f"{P}/#"
                )
                await coord.publish(f"{P}/devices/cam-001/events", b"fence")
                return await collect_until(dev, f"{P}/devices/cam-001/events")

    got = run(scenario())
    topics = {m.topic: m.payload for m in got}
    assert topics == {
        f"{P}/trust": b"trust",
        f"{P}/classes/jetson-vision-standard/manifest": b"A",
        f"{P}/devices/cam-001/events": b"fence",
    }


def test_dashboard_over_websockets_reads_status_but_cannot_publish(fleet: LocalFleet) -> None:
    async def scenario() -> list[Message]:
        async with coordinator(fleet) as coord:
            await coord.publish(f"{P}/rollouts/r1/status", b"wave 1", retain=True)
            await coord.publish(f"{P}/rollouts/r1/spec", b"secret spec", retain=True)
            async with Session(fleet.dashboard_endpoint(), client_id="dash") as dash:
                await dash.subscribe(f"{P}/#")
                for topic in (f"{P}/rollouts/r1/spec", f"{P}/rollouts/r1/status"):
                    with pytest.raises(PublishRefused) as refused:
                        await dash.publish(topic, b"x")
                    assert refused.value.reason_code == NOT_AUTHORIZED
                await coord.publish(f"{P}/coordinator/presence", b"online")
                return await collect_until(dash, f"{P}/coordinator/presence")

    got = run(scenario())
    assert [(m.topic, m.payload, m.retain) for m in got] == [
        (f"{P}/rollouts/r1/status", b"wave 1", True),
        (f"{P}/coordinator/presence", b"online", False),
    ]


def test_wrong_password_is_refused_at_connect(fleet: LocalFleet) -> None:
    async def scenario() -> None:
        endpoint = fleet.service_endpoint("coordinator", password="wrong")
        async with Session(endpoint, client_id="intruder"):
            pass

    with pytest.raises(ConnectRefused) as refused:
        run(scenario())
    # Mosquitto 2.0.11 answers a bad password with 0x87 (not authorized), not 0x86.
    assert refused.value.reason_code in (0x86, NOT_AUTHORIZED)


def test_device_cert_from_another_ca_is_refused(fleet: LocalFleet) -> None:
    rogue = FleetPKI.generate("rogue CA")

    async def scenario() -> None:
        endpoint = fleet.device_endpoint("cam-001", pki=rogue)
        async with Session(endpoint, client_id="cam-001", connect_timeout=5):
            pass

    started = time.monotonic()
    with pytest.raises(TransportError) as failed:
        run(scenario())
    assert not isinstance(failed.value, ConnectRefused)
    assert time.monotonic() - started < 4  # fails on the TLS alert, not on a timeout


def test_device_without_certificate_is_refused(fleet: LocalFleet) -> None:
    async def scenario() -> None:
        endpoint = fleet.device_endpoint("cam-001")
        bare = type(endpoint)(host=endpoint.host, port=endpoint.port, ca_file=endpoint.ca_file)
        async with Session(bare, client_id="cam-001", connect_timeout=5):
            pass

    with pytest.raises(TransportError):
        run(scenario())


def test_last_will_fires_on_drop_and_owner_reasserts_on_reconnect(fleet: LocalFleet) -> None:
    presence = f"{P}/devices/cam-001/presence"

    async def scenario() -> list[Message]:
        will = Will(topic=presence, payload=b"offline")
        async with coordinator(fleet) as coord, device(fleet, "cam-001", will=will) as dev:
            await coord.subscribe(presence)
            connections = dev.connections()
            assert await anext(connections) == 1
            await dev.publish(presence, b"online", retain=True)
            drop(dev)
            # The owner's duty on every connect: re-assert its retained topics.
            assert await anext(connections) == 2
            await dev.publish(presence, b"online", retain=True)
            got: list[Message] = []
            async with asyncio.timeout(5):
                async for message in coord.messages():
                    got.append(message)
                    if len(got) == 3:
                        break
            return got

    got = run(scenario())
    assert [m.payload for m in got] == [b"online", b"offline", b"online"]


def test_clean_disconnect_does_not_fire_will(fleet: LocalFleet) -> None:
    presence = f"{P}/devices/cam-001/presence"

    async def scenario() -> list[Message]:
        async with coordinator(fleet) as coord:
            await coord.subscribe(presence)
            will = Will(topic=presence, payload=b"offline")
            async with device(fleet, "cam-001", will=will) as dev:
                await dev.publish(presence, b"online", retain=True)
            await coord.subscribe(f"{P}/coordinator/presence")
            await coord.publish(f"{P}/coordinator/presence", b"fence")
            return await collect_until(coord, f"{P}/coordinator/presence")

    assert [m.payload for m in run(scenario())] == [b"online", b"fence"]


def test_persistent_session_receives_qos1_published_while_offline(fleet: LocalFleet) -> None:
    telemetry = f"{P}/devices/cam-001/telemetry"

    async def scenario() -> list[bytes]:
        persistent = {"clean_start": False, "session_expiry": 300}
        async with coordinator(fleet, **persistent) as coord:
            await coord.subscribe(f"{P}/devices/+/telemetry")
        async with device(fleet, "cam-001") as dev:
            for i in range(5):
                await dev.publish(telemetry, b"w%d" % i)
        # No subscribe here: the broker kept the subscription and queued the messages.
        async with coordinator(fleet, **persistent) as coord:
            got: list[bytes] = []
            async with asyncio.timeout(5):
                async for message in coord.messages():
                    got.append(message.payload)
                    if len(got) == 5:
                        return got
        return got

    assert run(scenario()) == [b"w0", b"w1", b"w2", b"w3", b"w4"]


def test_a_burst_is_taken_at_once_in_order_and_acknowledged(fleet: LocalFleet) -> None:
    """Messages queued for a persistent session come in faster than one per wake-up:
    ``take_waiting`` hands them over as batches, in order; each is acknowledged as taken
    (with a Receive Maximum of 20 the broker sends no more until it is), and none comes
    again on the next connection."""
    telemetry = f"{P}/devices/cam-001/telemetry"
    count = 300

    async def scenario() -> tuple[list[bytes], int, bytes]:
        persistent = {"clean_start": False, "session_expiry": 300}
        async with coordinator(fleet, **persistent) as coord:
            await coord.subscribe(f"{P}/devices/+/telemetry")
        async with device(fleet, "cam-001") as dev:
            for i in range(count):
                await dev.publish(telemetry, b"w%d" % i)
        got: list[bytes] = []
        largest = 0
        async with coordinator(fleet, incoming_limit=20, **persistent) as coord:
            messages = coord.messages()
            while len(got) < count:
                got.append((await anext(messages)).payload)
                burst = coord.take_waiting(count)
                largest = max(largest, 1 + len(burst))
                got += [m.payload for m in burst]
        async with coordinator(fleet, **persistent) as coord, device(fleet, "cam-001") as dev:
            await dev.publish(telemetry, b"after")
            first = (await anext(coord.messages())).payload
        return got, largest, first

    got, largest, first = run(scenario())
    assert got == [b"w%d" % i for i in range(count)]
    assert largest > 1
    assert first == b"after"  # nothing taken in a batch was left unacknowledged


def test_publish_during_broker_restart_completes_and_subscriptions_return(
    fleet: LocalFleet,
) -> None:
    events = f"{P}/devices/cam-001/events"

    async def scenario() -> list[Message]:
        async with coordinator(fleet) as coord, device(fleet, "cam-001") as dev:
            await coord.subscribe(events)
            coord_connections = coord.connections()
            assert await anext(coord_connections) == 1
            await asyncio.to_thread(fleet.broker.stop)
            pending = asyncio.create_task(dev.publish(events, b"while down", timeout=15))
            await asyncio.sleep(0.3)
            assert not pending.done()
            assert not dev.connected
            await asyncio.to_thread(fleet.broker.start)
            await pending  # queued by paho, sent and acknowledged after the reconnect
            assert await anext(coord_connections) == 2
            await dev.publish(events, b"after restart")
            got: list[Message] = []
            async with asyncio.timeout(5):
                async for message in coord.messages():
                    got.append(message)
                    if message.payload == b"after restart":
                        break
            return got

    got = run(scenario())
    # Only what was published after the subscriber came back is guaranteed for a clean session.
    assert got[-1].payload == b"after restart"


def test_retained_messages_survive_a_restart(fleet: LocalFleet) -> None:
    trust = f"{P}/trust"

    async def publish() -> None:
        async with coordinator(fleet) as coord:
            await coord.publish(trust, b"v1", retain=True)

    async def read() -> list[Message]:
        async with device(fleet, "cam-002") as dev:
            await dev.subscribe(trust)
            return await collect_until(dev, trust)

    run(publish())
    restart(fleet.broker)  # SIGTERM: Mosquitto saves its database on the way out
    assert [m.payload for m in run(read())] == [b"v1"]


def test_reload_enrolls_a_new_device(fleet: LocalFleet) -> None:
    async def scenario() -> None:
        async with device(fleet, "cam-009") as dev:
            await dev.publish(f"{P}/devices/cam-009/state", b"hello")

    with pytest.raises(PublishRefused):
        run(scenario())
    fleet.add_device(DeviceGrant("cam-009", "jetson-vision-standard"))
    time.sleep(0.2)  # SIGHUP is asynchronous; Mosquitto re-reads the ACL on its next loop
    run(scenario())


def test_exit_does_not_hang_when_broker_is_gone(fleet: LocalFleet) -> None:
    async def scenario() -> float:
        async with device(fleet, "cam-001") as dev:
            fleet.broker.kill()
            with pytest.raises(TransportError, match="not acknowledged"):
                await dev.publish(f"{P}/devices/cam-001/state", b"x", timeout=0.5)
            started = time.monotonic()
        return time.monotonic() - started

    assert run(scenario()) < 3


def test_refused_subscriber_gets_nothing_but_subscribe_is_acknowledged(
    fleet: LocalFleet,
) -> None:
    async def scenario() -> list[Message]:
        async with coordinator(fleet) as coord, device(fleet, "cam-002") as dev:
            await dev.subscribe(f"{P}/devices/cam-001/#")  # not refused: ACLs filter delivery
            await dev.subscribe(f"{P}/devices/cam-002/events")
            await coord.publish(f"{P}/devices/cam-001/events", b"not for you")
            await coord.publish(f"{P}/devices/cam-002/events", b"fence")
            return await collect_until(dev, f"{P}/devices/cam-002/events")

    assert [m.payload for m in run(scenario())] == [b"fence"]


def test_every_session_socket_sends_without_nagle_delay(fleet: LocalFleet) -> None:
    async def scenario() -> list[int]:
        device_id = fleet.devices[0].device_id
        async with coordinator(fleet) as coord, device(fleet, device_id) as dev:
            # The socket paho holds (private: the session exposes no socket by design).
            socks = [s._driver.socket() for s in (coord, dev)]
            return [
                s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                for s in socks
                if isinstance(s, socket.socket)  # an ssl.SSLSocket is one
            ]

    assert run(scenario()) == [1, 1]


def test_sessions_share_no_thread_and_work_on_descriptors_past_1024(fleet: LocalFleet) -> None:
    """paho's select() failed silently for descriptors >= 1024 and each session had a thread:
    one process held ~168 agents. Now the event loop watches every socket."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    pool = _OPENING_AT_ONCE  # threads opening connections at once, for all sessions
    events = f"{P}/devices/cam-001/events"

    async def scenario() -> tuple[int, list[int], list[bytes]]:
        before = threading.active_count()
        async with contextlib.AsyncExitStack() as stack:
            enter = stack.enter_async_context
            coord = await enter(coordinator(fleet))
            dash = await enter(Session(fleet.dashboard_endpoint(), client_id="dash"))
            # Enrolled or not, a device with a certificate of the CA connects.
            idle = [await enter(device(fleet, f"idle-{i}")) for i in range(pool + 4)]
            for watcher in (coord, dash):
                await watcher.subscribe(events)
            async with device(fleet, "cam-001") as dev:
                await dev.publish(events, b"hello")
            got = [await anext(aiter(w.messages())) for w in (coord, dash)]
            socks = [s._driver.socket() for s in (coord, dash, *idle)]
            fds = [s.fileno() for s in socks if s is not None]
            assert all(s.connected for s in idle)
            return threading.active_count() - before, fds, [m.payload for m in got]

    try:
        extra_threads, fds, got = run(scenario())
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(fds) == pool + 6
    assert min(fds) >= 1024
    assert got == [b"hello", b"hello"]
    assert extra_threads <= pool  # none per session; connects run a bounded few at once


class _Seen(logging.Handler):
    """Wakes a coroutine waiting for a log line that contains ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


def test_a_reconnect_that_fails_is_logged_with_its_cause_then_succeeds(
    fleet: LocalFleet, caplog: pytest.LogCaptureFixture
) -> None:
    seen = _Seen("reconnect failed")

    async def scenario() -> int:
        async with device(fleet, "cam-001") as dev:
            connections = dev.connections()
            assert await anext(connections) == 1
            await asyncio.to_thread(fleet.broker.kill)
            async with asyncio.timeout(5):
                await seen.event.wait()
            await asyncio.to_thread(fleet.broker.start)
            return await anext(connections)

    logger = logging.getLogger("broker.session")
    logger.addHandler(seen)
    try:
        with caplog.at_level(logging.WARNING, logger="broker.session"):
            assert run(scenario()) == 2
    finally:
        logger.removeHandler(seen)
    lost, failed = (
        [r for r in caplog.records if "connection lost" in r.getMessage()],
        [r for r in caplog.records if "reconnect failed" in r.getMessage()],
    )
    assert len(lost) == 1
    assert failed
    assert all(r.levelno == logging.WARNING for r in lost + failed)
    assert "refused" in failed[0].getMessage().lower()  # the cause, not just "failed"


def test_a_handshake_that_never_ends_neither_stalls_the_loop_nor_outlives_the_timeout(
    fleet: LocalFleet,
) -> None:
    """A listener that accepts TCP and never answers the TLS hello: the handshake blocks a
    pool thread, not the event loop, and the connect fails within ``connect_timeout``."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        endpoint = Endpoint(host="127.0.0.1", port=port, ca_file=fleet.broker.ca_file)

        async def scenario() -> tuple[int, float]:
            ticks = 0

            async def tick() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.05)
                    ticks += 1

            ticker = asyncio.create_task(tick())
            started = time.monotonic()
            try:
                with pytest.raises(TransportError, match="within"):
                    async with Session(endpoint, client_id="cam-001", connect_timeout=1):
                        pass
                return ticks, time.monotonic() - started
            finally:
                ticker.cancel()

        ticks, took = run(scenario())
    assert took < 1.8
    assert ticks >= 10  # the loop ran on while the handshake hung


def test_an_idle_session_keeps_its_connection_with_pings(fleet: LocalFleet) -> None:
    """No thread pings for us any more: the session's own ticks must. The broker cuts a
    client silent for 1.5 keepalives, checking every few seconds (5.5 s is the shortest
    wait that fails without the pings)."""

    async def scenario() -> tuple[bool, int]:
        async with device(fleet, "cam-001", keepalive=1) as dev:
            await asyncio.sleep(5.5)
            return dev.connected, dev.generation

    assert run(scenario()) == (True, 1)
