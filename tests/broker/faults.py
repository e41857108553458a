"""Faults that tests stage on a real link (test-only: no product code needs them).

drop(session)   # as a network failure: no DISCONNECT, so the broker fires the Will
restart(broker) # SIGTERM (Mosquitto saves its database), then start again
"""

from __future__ import annotations

import os
import socket

from broker.launcher import MosquittoBroker
from broker.session import Session

__all__ = ["drop", "restart"]


def drop(session: Session) -> None:
    """Cut the session's connection without DISCONNECT, so the broker fires the Will.

    ``shutdown()`` on a dup of the descriptor ends the connection under paho without
    closing its socket; the event loop then sees the end, and the session reconnects as
    after any network failure.
    """
    sock = session._driver.socket()  # the session exposes no socket by design
    if sock is None:
        return
    dup = socket.socket(fileno=os.dup(sock.fileno()))
    try:
        dup.shutdown(socket.SHUT_RDWR)
    finally:
        dup.close()


def restart(broker: MosquittoBroker) -> None:
    """Stop the broker (SIGTERM: Mosquitto saves its database) and start it again with the
    same folder, ports and persistence.

    Raises:
        BrokerError: the broker did not come back.
    """
    broker.stop()
    broker.start()
