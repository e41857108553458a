"""Driving hostile batches through a live fleet and telling whether it survived.

A fuzz test runs its fleet on the event loop of ``asyncio.run`` and hypothesis in a
worker thread (``asyncio.to_thread``): each example hands its batch back to the loop
with :meth:`Bridge.call`. Every service runs in a guard task of its own, so one that
dies is seen dead instead of taking the others down. What counts as a crash: a
service's task ended, or a service logged an error (a handler that raised, even when a
catch-all kept it alive; a supervised task that failed): both are what issue 7 forbids.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import traceback
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.strategies import SearchStrategy

from agent import Bundle
from broker.session import ConnectRefused, Endpoint, Session, TransportError
from edgefleet.fleet import Fleet
from edgefleet.home import COORDINATOR, OPERATOR
from tests.fuzz.strategies import Sample
from tests.integration.fleetkit import ADMIN_ACCOUNTS, coordinator_session

__all__ = [
    "FUZZ_OPERATOR",
    "Bridge",
    "Crashes",
    "Publishers",
    "Services",
    "add_fuzz_accounts",
    "device_endpoint",
    "drive",
    "failure",
    "fuzz_settings",
    "watching",
]

T = TypeVar("T")
B = TypeVar("B")

_BIG: Final = 1024 * 1024
"""Payloads above this go out on a session of their own: the broker may drop the
connection that carries one past its packet limit."""
_SERVICE_LOGGERS: Final = ("agent", "coordinator", "edgefleet", "asyncio")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


_CHUNK: Final = 20
"""Examples per hypothesis run: the time budget is checked between runs."""


def fuzz_settings(examples: int) -> settings:
    """Hypothesis settings for a fuzz run: no deadline (a live broker is slow), no
    example database (a fresh clone keeps no ``.hypothesis`` folder), no shrinking: a
    live fleet is not deterministic enough to replay, and each failure names its whole
    batch instead."""
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=(Phase.explicit, Phase.generate),
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )


def drive(batches: SearchStrategy[B], body: Callable[[B], None], *, ci_examples: int) -> int:
    """Call ``body`` on examples of ``batches``: ``EDGEFLEET_FUZZ_EXAMPLES`` of them (else
    ``ci_examples``), or fewer when ``EDGEFLEET_FUZZ_SECONDS`` (unset: no limit) runs
    out first. Returns how many ran. Blocking: call it in a thread."""
    total = _env_int("EDGEFLEET_FUZZ_EXAMPLES", ci_examples)
    budget = _env_int("EDGEFLEET_FUZZ_SECONDS", 0)
    started = time.monotonic()
    done = 0
    while done < total and (budget <= 0 or time.monotonic() - started < budget):
        chunk = min(_CHUNK, total - done)

        @fuzz_settings(chunk)
        @given(batch=batches)
        def run(batch: B) -> None:
            body(batch)

        run()
        done += chunk
    return done


# -- crashes --------------------------------------------------------------------------


class Crashes(logging.Handler):
    """Every error a service logs. Hostile input is refused with a warning; an error
    is a handler that raised (even when a catch-all kept the task alive) or a failing
    task: both are what issue 7 forbids."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.split(".")[0] in _SERVICE_LOGGERS:
            self.records.append(record)

    def since(self, seen: int, *, alarms: Sequence[str] = ()) -> list[str]:
        """The crashes after the first ``seen``: message and the traceback's last lines.
        A record without a traceback that names one of ``alarms`` is a service telling
        the operator about the hostile input itself, not a crash."""
        out = []
        for record in self.records[seen:]:
            message = record.getMessage()
            if record.exc_info is None and any(a in message for a in alarms):
                continue
            lines = [f"{record.name}: {message[:500]}"]
            if record.exc_info is not None and record.exc_info[1] is not None:
                tb = traceback.format_exception(record.exc_info[1])
                lines += "".join(tb).strip().splitlines()[-12:]
            out.append("\n    ".join(lines))
        return out


@contextlib.contextmanager
def watching() -> Iterator[Crashes]:
    handler = Crashes()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


# -- services -------------------------------------------------------------------------


@dataclass
class Services:
    """The fleet's coordinator and agents, each in a guard task of its own."""

    fleet: Fleet
    guards: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    def start_coordinator(self, **changes: Any) -> None:
        self.guards[COORDINATOR] = asyncio.create_task(
            self._guard(lambda tg: self.fleet.start_coordinator(tg, **changes))
        )

    def start_agent(self, device_id: str) -> None:
        self.guards[device_id] = asyncio.create_task(
            self._guard(lambda tg: self.fleet.start_agent(tg, device_id))
        )

    @staticmethod
    async def _guard(start: Callable[[asyncio.TaskGroup], object]) -> None:
        async with asyncio.TaskGroup() as tg:
            start(tg)

    def dead(self) -> list[str]:
        """Services whose task ended, with the traceback's last lines."""
        out = []
        for name, task in self.guards.items():
            if not task.done():
                continue
            if task.cancelled():
                out.append(f"{name}: cancelled")
                continue
            exc = task.exception()
            if exc is None:
                out.append(f"{name}: returned")
                continue
            tail = "".join(traceback.format_exception(exc)).strip().splitlines()[-15:]
            out.append(f"{name}: died\n    " + "\n    ".join(tail))
        return out

    async def stop(self, name: str) -> None:
        task = self.guards.pop(name)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    async def close(self) -> None:
        for name in list(self.guards):
            await self.stop(name)


# -- publishing -----------------------------------------------------------------------


def device_endpoint(fleet: Fleet, device_id: str) -> Endpoint:
    """How an enrolled device reaches the broker, from its real bundle."""
    folder = fleet.home.root / "devices" / device_id
    bundle = Bundle.load(folder)
    return Endpoint(
        host=bundle.broker_host,
        port=bundle.broker_port,
        ca_file=folder / bundle.ca_file,
        cert_file=folder / bundle.cert_file,
        key_file=folder / bundle.key_file,
    )


FUZZ_OPERATOR: Final = "fuzz-operator"
"""An operator-role account of the fuzz's own, for payloads too big to share a session."""


async def add_fuzz_accounts(fleet: Fleet) -> None:
    """Give the fleet :data:`FUZZ_OPERATOR` and wait until its broker accepts it."""
    home = fleet.home
    home.add_account(FUZZ_OPERATOR, "operator")
    material = home.broker_material()
    fleet.broker.reload(acl=material.acl, passwords=material.passwords, crl=material.crl)
    async with asyncio.timeout(10):
        while True:  # SIGHUP is asynchronous: the old password file may still answer
            try:
                async with Session(home.service_endpoint(FUZZ_OPERATOR), client_id=FUZZ_OPERATOR):
                    return
            except ConnectRefused:
                await asyncio.sleep(0.05)


@dataclass
class Publishers:
    """One session per account, opened when first needed and replaced when the broker
    dropped it. A refusal is the broker's answer, not a failure.

    The broker binds each client id to its account, so the coordinator's rights come
    from the tests' own admin account (never the running coordinator's), and a payload
    too big to share a session goes out on a second account of the same role."""

    fleet: Fleet
    sessions: dict[str, Session] = field(default_factory=dict)
    taken: int = 0
    refused: int = 0

    def _new(self, account: str) -> Session:
        if account == COORDINATOR:
            return coordinator_session(self.fleet.home)
        if account == OPERATOR:
            return Session(self.fleet.home.service_endpoint(OPERATOR), client_id=OPERATOR)
        return Session(device_endpoint(self.fleet, account), client_id=account)

    def _throwaway(self, account: str) -> Session:
        """A session for one big payload: paho would resend a packet the broker refused
        on every reconnect, so it must not go out on a session that lives on. (A device
        has one identity: its throwaway replaces its session for a moment.)"""
        if account == COORDINATOR:
            return coordinator_session(self.fleet.home, ADMIN_ACCOUNTS[1])
        if account == OPERATOR:
            endpoint = self.fleet.home.service_endpoint(FUZZ_OPERATOR)
            return Session(endpoint, client_id=FUZZ_OPERATOR)
        return Session(device_endpoint(self.fleet, account), client_id=account)

    async def session(self, account: str) -> Session:
        """The account's session, (re)opened when needed."""
        session = self.sessions.get(account)
        if session is None or not session.connected:
            if session is not None:
                await self._drop(account)
            session = self._new(account)
            await session.__aenter__()
            self.sessions[account] = session
        return session

    async def _drop(self, account: str) -> None:
        session = self.sessions.pop(account)
        with contextlib.suppress(TransportError, RuntimeError):
            await session.__aexit__(None, None, None)

    async def publish(self, sample: Sample) -> bool:
        """Publish one sample; whether the broker took it."""
        if len(sample.payload) > _BIG:
            try:
                async with self._throwaway(sample.account) as session:
                    # Short: past the packet limit no PUBACK comes, the connection ends.
                    await session.publish(
                        sample.topic, sample.payload, retain=sample.retain, timeout=3.0
                    )
            except TransportError:
                self.refused += 1
                return False
            self.taken += 1
            return True
        session = await self.session(sample.account)
        try:
            await session.publish(sample.topic, sample.payload, retain=sample.retain, timeout=10.0)
        except TransportError:
            self.refused += 1
            if not session.connected:
                await self._drop(sample.account)
            return False
        self.taken += 1
        return True

    async def publish_all(self, batch: Sequence[Sample]) -> None:
        for sample in batch:
            await self.publish(sample)

    async def close(self) -> None:
        for account in list(self.sessions):
            await self._drop(account)


# -- hypothesis in a thread, the fleet on the loop ----------------------------------------


@dataclass(frozen=True)
class Bridge:
    """Runs coroutines on the fleet's loop from hypothesis' worker thread."""

    loop: asyncio.AbstractEventLoop

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


def failure(what: str, batch: Sequence[Sample], problems: Sequence[str]) -> str:
    """An assertion message naming the batch (bounded) and what went wrong."""
    shown = "\n  ".join(repr(s) for s in batch[:60])
    more = f"\n  … and {len(batch) - 60} more" if len(batch) > 60 else ""
    return f"{what}:\n" + "\n".join(problems) + f"\nbatch:\n  {shown}{more}"
