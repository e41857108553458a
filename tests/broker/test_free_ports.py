"""The launcher's port choice: free, distinct, and out of reach of outgoing connections."""

from __future__ import annotations

import socket

from broker.launcher import _ephemeral_range, free_ports


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    low, _ = _ephemeral_range()
    ports = free_ports(8)
    assert len(set(ports)) == 8
    # An outgoing connection's local port is drawn from the ephemeral range, so a port
    # below it stays free between the choice and the broker's bind.
    assert all(0 < port < low for port in ports)
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))
