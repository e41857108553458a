"""Thousands of MQTT sessions in one process, against a real Mosquitto from the repo's config.

Issue 8 asks one process to hold 10,000 connections; before it, each
:class:`broker.session.Session` ran a paho network thread whose ``select()`` failed
silently past descriptor 1024, so a process held about 168 agents. This bench:

* issues ``--devices`` device certificates (EC P-256, like real devices: mutual TLS on the
  devices listener, where the certificate's CN is the username and the client id) and an
  ACL that lists them, and starts Mosquitto from ``mosquitto.conf`` with the process's
  descriptor limit raised to the hard limit (Mosquitto inherits it);
* opens every session at once in ONE process and event loop, and measures the time until
  all are up and how many are (must be all of them);
* counts the process's threads, descriptors and RSS with every session up, and the CPU the
  idle sessions cost (keepalive ticks);
* round trip across sessions: each subscribes to its own state topic and publishes one
  retained message there, which the broker delivers back to it;
* baseline, same run: one session publishing as many QoS 1 messages to a topic it is
  subscribed to and receiving them (the broker's throughput over a single connection).

Human-readable lines come first; the last line is one JSON object with every figure.
Not part of the test suite.

Run: ``.venv/bin/python bench/sessions.py [--devices N]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from broker.acl import Accounts, DeviceGrant, render_acl, render_password_file
from broker.launcher import BrokerMaterial, MosquittoBroker, running_pid
from broker.pki import (
    issue_client_cert,
    issue_server_cert,
    make_ca,
    make_crl,
    write_private,
    write_public,
)
from broker.session import Endpoint, Session
from schemas import topics
from schemas.topics import DeviceChannel

T = TypeVar("T")

HW_CLASS = "bench-class"
COORDINATOR_PASSWORD = "bench-secret"  # noqa: S105 (a throwaway broker of the bench)


def _say(line: str) -> None:
    print(line, flush=True)


def _status(pid: int | str, field: str) -> int:
    """A number from /proc/<pid>/status (``VmRSS`` in kB, ``Threads``)."""
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def _raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _device_ids(n: int) -> list[str]:
    return [f"bench-{i:05d}" for i in range(n)]


def _credentials(folder: Path, ca_key: bytes, ca_cert: bytes, ids: Iterable[str]) -> None:
    for device_id in ids:
        key, cert = issue_client_cert(ca_key, ca_cert, device_id)
        write_private(folder / f"{device_id}.key", key)
        write_public(folder / f"{device_id}.crt", cert)


async def _all(aws: Iterable[Awaitable[T]]) -> tuple[list[T], list[BaseException]]:
    results = await asyncio.gather(*aws, return_exceptions=True)
    good = [r for r in results if not isinstance(r, BaseException)]
    bad = [r for r in results if isinstance(r, BaseException)]
    return good, bad


async def _round_trip(session: Session) -> None:
    topic = topics.device(session.client_id, DeviceChannel.STATE)
    await session.subscribe(topic)
    messages = aiter(session.messages())
    await session.publish(topic, b"bench", retain=True)
    async for message in messages:
        if message.topic == topic:
            return


async def _baseline(endpoint: Endpoint, n: int) -> float:
    """Messages per second through the broker over one session (QoS 1, out and back)."""
    topic = topics.device("bench-baseline", DeviceChannel.EVENTS)
    async with Session(endpoint, client_id="coordinator") as session:
        await session.subscribe(topic)
        received = 0

        async def receive() -> None:
            nonlocal received
            async for _ in session.messages():
                received += 1
                if received == n:
                    return

        started = time.perf_counter()
        reader = asyncio.create_task(receive())
        await asyncio.gather(*(session.publish(topic, b"%d" % i) for i in range(n)))
        await reader
        return n / (time.perf_counter() - started)


def _usage(sessions: int, rss_kb_before: int) -> dict[str, Any]:
    rss_kb = _status("self", "VmRSS")
    return {
        "threads_active_count": threading.active_count(),
        "threads_proc": _status("self", "Threads"),
        "fds": sum(1 for _ in Path("/proc/self/fd").iterdir()),
        "rss_mb": round(rss_kb / 1024, 1),
        "rss_kb_per_session": round((rss_kb - rss_kb_before) / max(sessions, 1), 1),
    }


async def _idle_cpu(seconds: float) -> float:
    """Share of one core the process used while the sessions only kept alive."""
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.sleep(seconds)
    return (time.process_time() - cpu) / (time.perf_counter() - wall)


async def _bench(
    broker: MosquittoBroker, creds: Path, ids: list[str], idle: float
) -> dict[str, Any]:
    ports, host = broker.ports, broker.host
    rss_kb_before = _status("self", "VmRSS")
    started = time.perf_counter()
    sessions = [
        Session(
            Endpoint(
                host=host,
                port=ports.devices,
                ca_file=broker.ca_file,
                cert_file=creds / f"{device_id}.crt",
                key_file=creds / f"{device_id}.key",
            ),
            client_id=device_id,
            keepalive=60,
            connect_timeout=30,
        )
        for device_id in ids
    ]
    built = time.perf_counter() - started
    _say(f"built {len(sessions)} sessions in {built:.1f} s")
    started = time.perf_counter()
    opened, failed = await _all(s.__aenter__() for s in sessions)
    connect_all = time.perf_counter() - started
    connected = sum(s.connected for s in sessions)
    _say(f"connected {connected}/{len(ids)} in {connect_all:.1f} s ({len(failed)} failed)")
    for error in failed[:3]:
        _say(f"  e.g. {error!r}")
    figures: dict[str, Any] = {"connected": connected, "connect_all_s": round(connect_all, 2)}
    figures["connect_rate_per_s"] = round(connected / connect_all, 1)
    figures |= _usage(connected, rss_kb_before)
    pid = running_pid(broker.folder)
    figures["broker_rss_mb"] = round(_status(pid, "VmRSS") / 1024, 1) if pid else None
    _say(f"with every session up: {json.dumps(_usage(connected, rss_kb_before))}")
    figures["idle_cpu_share"] = round(await _idle_cpu(idle), 3)
    _say(f"idle: {figures['idle_cpu_share']:.1%} of a core for {connected} sessions")
    started = time.perf_counter()
    done, lost = await _all(_round_trip(s) for s in opened)
    elapsed = time.perf_counter() - started
    figures["round_trips"] = len(done)
    figures["round_trip_s"] = round(elapsed, 2)
    figures["round_trip_rate_per_s"] = round(len(done) / elapsed, 1)
    _say(f"{len(done)} subscribe + retained publish + delivery round trips in {elapsed:.1f} s")
    started = time.perf_counter()
    await _all(s.__aexit__(None, None, None) for s in opened)
    figures["close_all_s"] = round(time.perf_counter() - started, 2)
    figures["round_trip_failures"] = len(lost)
    figures["connect_failures"] = len(failed)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000, help="sessions to open")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds to sample idle CPU")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    fd_limit = _raise_fd_limit()
    n = args.devices
    ids = _device_ids(n)
    folder = Path(tempfile.mkdtemp(prefix="edgefleet-bench-"))
    try:
        folder.chmod(0o755)  # Mosquitto drops root to its own account: it must get in
        started = time.perf_counter()
        ca_key, ca_cert = make_ca("edgefleet bench CA")
        server_key, server_cert = issue_server_cert(ca_key, ca_cert)
        creds = folder / "clients"
        creds.mkdir(mode=0o700)
        _credentials(creds, ca_key, ca_cert, ids)
        accounts = Accounts()
        material = BrokerMaterial(
            ca_cert=ca_cert,
            server_key=server_key,
            server_cert=server_cert,
            acl=render_acl([DeviceGrant(d, HW_CLASS) for d in ids], accounts),
            passwords=render_password_file({accounts.coordinator: COORDINATOR_PASSWORD}),
            crl=make_crl(ca_key, ca_cert),
        )
        _say(f"issued {n} device certificates in {time.perf_counter() - started:.1f} s")
        with MosquittoBroker(folder=folder / "broker", material=material) as broker:
            figures = asyncio.run(_bench(broker, creds, ids, args.idle))
            service = Endpoint(
                host=broker.host,
                port=broker.ports.services,
                ca_file=broker.ca_file,
                username=accounts.coordinator,
                password=COORDINATOR_PASSWORD,
            )
            baseline = asyncio.run(_baseline(service, n))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    _say(f"baseline: one session, {n} QoS 1 messages out and back: {baseline:.0f}/s")
    figures |= {
        "devices": n,
        "fd_limit": fd_limit,
        "cpus": os.cpu_count(),
        "baseline_one_session_rate_per_s": round(baseline, 1),
        "round_trip_rate_vs_baseline": round(figures["round_trip_rate_per_s"] / baseline, 3),
        "threads_per_session": round(figures["threads_proc"] / max(figures["connected"], 1), 4),
        "all_connected": figures["connected"] == n,
    }
    print(json.dumps(figures, sort_keys=True))
    return 0 if figures["all_connected"] else 1


if __name__ == "__main__":
    sys.exit(main())
