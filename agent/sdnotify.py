"""Telling systemd how the agent is doing (``sd_notify``), with no dependency.

Under a unit of ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a Unix datagram socket,
a path or ``@`` for Linux's abstract namespace) and, with ``WatchdogSec=``,
``WATCHDOG_USEC``. The agent says ``READY=1`` once it serves what it restored, then
``WATCHDOG=1`` at half the watchdog interval from its event loop, so a loop that hangs
is killed and restarted by systemd; ``STOPPING=1`` when it stops. Without
``NOTIFY_SOCKET`` (not under systemd) :meth:`Notifier.from_env` gives None and nothing
is sent.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

__all__ = ["Notifier", "keep_systemd_posted"]

log = logging.getLogger(__name__)

_MAX_ADDRESS: Final = 107
"""``sun_path`` holds 108 bytes with its terminating NUL."""


class Notifier:
    """Sends state lines to systemd's notify socket; a failed send is logged, not raised
    (systemd may be restarting; the agent must serve on)."""

    def __init__(self, address: str, watchdog_s: float | None) -> None:
        """``address`` as in ``NOTIFY_SOCKET``; ``watchdog_s`` from ``WATCHDOG_USEC``.

        Raises:
            ValueError: the address is empty, too long or neither absolute nor abstract.
        """
        if not address or len(address) > _MAX_ADDRESS or address[0] not in "/@":
            msg = "NOTIFY_SOCKET is not an absolute path or an abstract socket name"
            raise ValueError(msg)
        self._address = "\0" + address[1:] if address[0] == "@" else address
        self.watchdog_s = watchdog_s

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Notifier | None:
        """The notifier systemd asked for, or None (not under systemd, or a bad address:
        logged)."""
        address = environ.get("NOTIFY_SOCKET")
        if address is None:
            return None
        watchdog_s: float | None = None
        usec = environ.get("WATCHDOG_USEC", "")
        if usec.isdigit() and 0 < int(usec) <= 10**12:
            watchdog_s = int(usec) / 1e6
        try:
            return cls(address, watchdog_s)
        except ValueError as exc:
            log.error("sd_notify off: %s", exc)
            return None

    def send(self, state: str) -> bool:
        """Send one datagram (e.g. ``READY=1``); whether it was sent."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self._address)
                sock.sendall(state.encode("ascii"))
        except OSError as exc:
            log.warning("sd_notify %s not sent: %s", state.split("=", 1)[0], exc)
            return False
        return True


async def keep_systemd_posted(
    notifier: Notifier, ready: Callable[[], Awaitable[object]], *, status: str = ""
) -> None:
    """``READY=1`` once ``ready()`` returns, then ``WATCHDOG=1`` at half the watchdog
    interval until cancelled, and ``STOPPING=1`` then."""
    try:
        await ready()
        notifier.send("READY=1" + (f"\nSTATUS={status}" if status else ""))
        interval = notifier.watchdog_s
        if interval is None:
            await asyncio.Event().wait()  # nothing more to say until the stop
            return
        while True:
            notifier.send("WATCHDOG=1")
            await asyncio.sleep(interval / 2)
    finally:
        notifier.send("STOPPING=1")
