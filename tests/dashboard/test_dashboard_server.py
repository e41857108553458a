"""The dashboard's server against a real Mosquitto: the page and its settings, the
relay to the broker's secure WebSockets listener (TLS checked against the fleet's CA),
the audit trail, and the bounds on what one client can hold open."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

from broker.launcher import free_ports
from coordinator.audit import AuditLog
from dashboard import BrokerTarget, DashboardConfig, DashboardServer
from tests.broker.localfleet import FleetPKI
from tests.dashboard.http import accept_for, connection, get, request, upgrade_headers


@contextlib.asynccontextmanager
async def serving(config: DashboardConfig) -> AsyncIterator[DashboardServer]:
    server = DashboardServer(config)
    task = asyncio.create_task(server.run())
    try:
        async with asyncio.timeout(10):
            await server.serving.wait()
        yield server
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_page_and_settings_are_served_to_the_own_host_only(config: DashboardConfig) -> None:
    async def go() -> None:
        async with serving(config) as server:
            assert server.port is not None
            page = await get(server.port, "/")
            assert page.status == 200
            assert b"<title>edgefleet dashboard</title>" in page.body
            assert "script-src 'self'" in page.headers["content-security-policy"]
            assert page.headers["x-frame-options"] == "DENY"
            settings = await get(server.port, "/config.json")
            assert settings.json() == {
                "username": "dashboard",
                "password": config.password,
                "prefix": "fleet/v1",
                "audit": False,
            }
            assert settings.headers["cache-control"] == "no-store"
            assert (await get(server.port, "/config.json", host="evil.example")).status == 403
            assert (await get(server.port, "/nothing")).status == 404

    asyncio.run(go())


def test_relay_hands_the_page_the_brokers_own_websocket_handshake(
    config: DashboardConfig,
) -> None:
    async def go() -> None:
        async with serving(config) as server:
            assert server.port is not None
            headers = upgrade_headers(server.port)
            async with connection(server.port) as (reader, writer):
                answer = await request(reader, writer, "/mqtt", headers)
                assert answer.status == 101
                # The broker computed it from the page's own key: relayed, not made up.
                assert answer.headers["sec-websocket-accept"] == accept_for(
                    headers["sec-websocket-key"]
                )
                assert answer.headers["sec-websocket-protocol"] == "mqtt"

    asyncio.run(go())


def test_relays_and_connections_are_bounded(config: DashboardConfig) -> None:
    bounded = dataclasses.replace(config, max_relays=1, max_connections=2)

    async def go() -> None:
        async with serving(bounded) as server:
            port = server.port
            assert port is not None
            async with connection(port) as (reader, writer):
                assert (await request(reader, writer, "/mqtt", upgrade_headers(port))).status == 101
                second = await get(port, "/mqtt", **upgrade_headers(port))
                assert second.status == 503
                # The relay holds one connection; one more may wait, the next is refused.
                async with connection(port) as (_, idle_writer):
                    idle_writer.write(b"GET / HT")
                    await idle_writer.drain()
                    refused = await get(port, "/")
                    assert refused.status == 503
            assert (await request_upgrade(port)) == 101  # freed once the first closed

    asyncio.run(go())


async def request_upgrade(port: int) -> int:
    # The freed slots are counted once the server saw the close: retry briefly.
    async with asyncio.timeout(10):
        while True:
            async with connection(port) as (reader, writer):
                status = (await request(reader, writer, "/mqtt", upgrade_headers(port))).status
            if status != 503:
                return status
            await asyncio.sleep(0.05)


def test_relay_refuses_a_broker_the_fleets_ca_did_not_certify(
    config: DashboardConfig, tmp_path: Path
) -> None:
    stranger = FleetPKI.generate("another CA")
    ca_file = tmp_path / "other-ca.crt"
    ca_file.write_bytes(stranger.ca_cert)
    wrong_ca = dataclasses.replace(
        config, broker=dataclasses.replace(config.broker, ca_file=ca_file)
    )
    (closed,) = free_ports(1)
    nowhere = dataclasses.replace(
        config, broker=BrokerTarget(host="127.0.0.1", port=closed, ca_file=config.broker.ca_file)
    )

    async def go() -> None:
        for settings in (wrong_ca, nowhere):
            async with serving(settings) as server:
                assert server.port is not None
                answer = await get(server.port, "/mqtt", **upgrade_headers(server.port))
                assert answer.status == 502
                assert answer.json() == {"error": "the broker cannot be reached"}

    asyncio.run(go())


def test_audit_trail_is_the_newest_entries_of_the_coordinators_log(
    config: DashboardConfig, tmp_path: Path
) -> None:
    path = tmp_path / "audit.sqlite"
    log = AuditLog(path)
    for i in range(500):
        log.append({"at": float(i), "event": "advance", "rollout": f"r{i % 2}", "detail": str(i)})
    log.close()
    with_audit = dataclasses.replace(config, audit_path=path, audit_entries=100)
    missing = dataclasses.replace(config, audit_path=tmp_path / "none.sqlite")

    async def go() -> None:
        async with serving(with_audit) as server:
            assert server.port is not None
            everything = (await get(server.port, "/audit.json")).json()["entries"]
            assert [e["detail"] for e in everything] == [str(i) for i in range(400, 500)]
            one = (await get(server.port, "/audit.json?rollout=r1")).json()["entries"]
            assert [e["detail"] for e in one] == [str(i) for i in range(301, 500, 2)]
            assert (await get(server.port, "/config.json")).json()["audit"] is True
        async with serving(missing) as server:
            assert server.port is not None
            answer = (await get(server.port, "/audit.json")).json()
            assert answer["entries"] == []
            assert "no audit log at" in answer["note"]
        async with serving(config) as server:
            assert server.port is not None
            answer = (await get(server.port, "/audit.json")).json()
            assert answer["entries"] == []
            assert "--data" in answer["note"]

    asyncio.run(go())
