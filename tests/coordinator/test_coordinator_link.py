"""The coordinator's link loop (``coordinator.link``) over a scripted transport: a link
lost inside the connection's task group, or a broker unreachable at start, is retried;
refused credentials end the run. No broker."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest

from broker.backoff import Backoff
from broker.transport import ConnectRefused, Transport, TransportError, Will
from coordinator import Coordinator, CoordinatorConfig
from schemas import (
    OFFLINE,
    KeyPair,
    topics,
)
from tests.coordinator.conftest import T0
from tests.coordinator.kit import ScriptedTransport, make_config

FAST = Backoff(initial=0.01, maximum=0.01)


class _Broker:
    """Opens links as scripted: each entry an error to raise, or whether the link's
    messages fail."""

    def __init__(self, *script: BaseException | bool) -> None:
        self._script = list(script)
        self.links: list[ScriptedTransport] = []
        self.opened = asyncio.Event()

    def connect(self, will: Will) -> AbstractAsyncContextManager[Transport]:
        assert will.payload == OFFLINE
        return self._open()

    @asynccontextmanager
    async def _open(self) -> AsyncIterator[Transport]:
        step = self._script.pop(0) if self._script else False
        if isinstance(step, BaseException):
            raise step
        link = ScriptedTransport(fail=step)
        self.links.append(link)
        if not self._script:
            self.opened.set()
        yield link


def _config(tmp_path: Path) -> CoordinatorConfig:
    return make_config(tmp_path, KeyPair.generate(), reconnect=FAST, probe_s=0.05)


async def _run_until_scripted(coordinator: Coordinator, broker: _Broker) -> None:
    task = asyncio.create_task(coordinator.run())
    async with asyncio.timeout(5.0):
        await broker.opened.wait()
    await asyncio.sleep(0.05)
    assert not task.done(), task
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_a_link_lost_inside_the_task_group_is_reconnected_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = _Broker(True, False)
    coordinator = Coordinator(_config(tmp_path), clock=lambda: T0, connect=broker.connect)
    with caplog.at_level(logging.WARNING):
        asyncio.run(_run_until_scripted(coordinator, broker))
    assert len(broker.links) == 2
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("the session gave up on the link" in m for m in warned), warned
    # The clean stop said offline on the link it held.
    assert (topics.coordinator_presence(), OFFLINE) in broker.links[-1].published


def test_a_broker_unreachable_at_start_is_retried_with_its_cause_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = _Broker(TransportError("connection refused by host"), False)
    coordinator = Coordinator(_config(tmp_path), clock=lambda: T0, connect=broker.connect)
    with caplog.at_level(logging.WARNING):
        asyncio.run(_run_until_scripted(coordinator, broker))
    assert len(broker.links) == 1
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("unreachable (connection refused by host)" in m for m in warned), warned


def test_refused_credentials_end_the_run(tmp_path: Path) -> None:
    broker = _Broker(ConnectRefused(0x86, "bad user name or password"))
    coordinator = Coordinator(_config(tmp_path), clock=lambda: T0, connect=broker.connect)
    with pytest.raises(ConnectRefused):
        asyncio.run(coordinator.run())
