"""sd_notify against a real Unix datagram socket, as systemd listens on one."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sdnotify import Notifier, keep_systemd_posted


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(30)
    try:
        yield sock, path
    finally:
        sock.close()


def test_not_under_systemd_there_is_no_notifier() -> None:
    assert Notifier.from_env({}) is None
    assert Notifier.from_env({"NOTIFY_SOCKET": "relative/path"}) is None


def test_the_watchdog_interval_comes_from_watchdog_usec() -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "30000000"})
    assert notifier is not None
    assert notifier.watchdog_s == 30.0
    bad = Notifier.from_env({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "-1"})
    assert bad is not None
    assert bad.watchdog_s is None


def test_ready_after_the_agent_is_then_watchdog_pings_then_stopping(
    listener: tuple[socket.socket, str],
) -> None:
    sock, path = listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"})
    assert notifier is not None
    ready = asyncio.Event()

    async def scenario() -> list[bytes]:
        task = asyncio.create_task(keep_systemd_posted(notifier, ready.wait, status="cam"))
        await asyncio.sleep(0)
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recv(100)  # nothing before the agent is ready
        sock.setblocking(True)
        ready.set()
        got = [await asyncio.to_thread(sock.recv, 100) for _ in range(3)]
        task.cancel()
        await asyncio.wait({task})
        while (last := await asyncio.to_thread(sock.recv, 100)) == b"WATCHDOG=1":
            pass
        return [*got, last]

    got = asyncio.run(scenario())
    assert got == [b"READY=1\nSTATUS=cam", b"WATCHDOG=1", b"WATCHDOG=1", b"STOPPING=1"]


def test_an_abstract_socket_name_is_reached(tmp_path: Path) -> None:
    name = f"edgefleet-test-{tmp_path.name}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(30)
        notifier = Notifier(f"@{name}", None)
        assert notifier.send("READY=1")
        assert sock.recv(100) == b"READY=1"


def test_a_gone_socket_is_logged_and_never_raised(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "nobody"), None)
    assert not notifier.send("WATCHDOG=1")
