"""The session's bookkeeping without a broker: what used to be testable only on Mosquitto."""

from __future__ import annotations

import pytest

from broker.link import Ack, LinkState, Resubscribe, Settled
from broker.transport import IncomingOverflow, Message

NOT_AUTHORIZED = 0x87


def message(topic: str = "t", qos: int = 1, payload: bytes = b"x") -> Message:
    return Message(topic=topic, payload=payload, retain=False, qos=qos)


def up(link: LinkState, *, session_present: bool = False) -> int | None:
    """Accept a connection; the re-SUBSCRIBEs (if any) get ids 100, 101, ..."""
    batches = link.accepted(session_present=session_present)
    return link.resubscribing(range(100, 100 + len(batches)))


def test_first_connection_is_up_at_the_connack() -> None:
    link = LinkState(incoming_limit=10)
    assert (link.connected, link.generation) == (False, 0)
    assert link.accepted(session_present=False) == []
    assert link.resubscribing([]) == 1
    assert (link.connected, link.generation) == (True, 1)


def test_reconnect_without_session_resubscribes_and_is_up_only_after_every_suback() -> None:
    link = LinkState(incoming_limit=10)
    up(link)
    link.remember(["a/#", "b"], qos=1)
    link.remember(["c"], qos=0)
    link.lost()
    assert not link.connected

    batches = link.accepted(session_present=False)
    assert batches == [Resubscribe(("c",), 0), Resubscribe(("a/#", "b"), 1)]
    assert link.resubscribing([7, 8]) is None
    assert (link.connected, link.alive, link.generation) == (False, True, 1)
    assert link.suback(7, [0]) == (None, None)
    assert not link.connected
    assert link.suback(8, [1, 1]) == (None, 2)
    assert (link.connected, link.generation) == (True, 2)


def test_reconnect_with_session_present_sends_nothing_and_is_up_at_once() -> None:
    link = LinkState(incoming_limit=10)
    up(link)
    link.remember(["a"], qos=1)
    link.lost()
    assert link.accepted(session_present=True) == []
    assert link.resubscribing([]) == 2


def test_a_drop_during_the_resubscriptions_never_reports_that_connection_up() -> None:
    link = LinkState(incoming_limit=10)
    up(link)
    link.remember(["a"], qos=1)
    link.lost()
    link.accepted(session_present=False)
    link.resubscribing([5])
    link.lost()
    assert link.suback(5, [1]) == (None, None)  # a late SUBACK of the dead connection
    assert (link.connected, link.generation) == (False, 1)
    assert up(link) is None
    assert link.suback(100, [1]) == (None, 3)  # the broken connection's counter is skipped


def test_a_resubscription_not_sent_is_not_waited_for() -> None:
    link = LinkState(incoming_limit=10)
    up(link)
    link.remember(["a"], qos=1)
    link.lost()
    link.accepted(session_present=False)
    assert link.resubscribing([None]) == 2


def test_unsubscribed_and_refused_filters_are_not_resubscribed() -> None:
    link = LinkState(incoming_limit=10)
    link.remember(["a", "b", "c"], qos=1)
    link.forget(["b"])
    link.forget(["c", "never"])
    assert link.subscriptions == {"a": 1}
    assert link.accepted(session_present=False) == [Resubscribe(("a",), 1)]


def test_puback_settles_its_publish_with_the_reason_code() -> None:
    link = LinkState(incoming_limit=10)
    up(link)
    link.publishing(3)
    assert link.puback(3, NOT_AUTHORIZED) == Settled(3, (NOT_AUTHORIZED,))
    assert link.pending() == set()


def test_puback_for_an_unknown_or_settled_mid_is_ignored() -> None:
    link = LinkState(incoming_limit=10)
    up(link)
    assert link.puback(9, 0) is None
    link.publishing(3)
    assert link.puback(3, 0) is not None
    assert link.puback(3, 0) is None


def test_an_ack_of_the_wrong_kind_settles_nothing() -> None:
    link = LinkState(incoming_limit=10)
    up(link)
    link.publishing(3)
    link.requesting(4)
    assert link.unsuback(3, [0]) is None
    assert link.puback(4, 0) is None
    assert link.pending() == {3, 4}


def test_a_disconnect_mid_request_requeues_it_and_keeps_publishes_pending() -> None:
    link = LinkState(incoming_limit=10)
    up(link)
    link.publishing(1)
    link.requesting(2)
    link.requesting(3)
    assert link.lost() == [Settled(2, None), Settled(3, None)]
    assert link.pending() == {1}  # paho resends the PUBLISH after the reconnect
    assert link.suback(2, [1]) == (None, None)  # too late: the caller sends it again
    up(link)
    assert link.puback(1, 0) == Settled(1, (0,))


def test_an_abandoned_request_ignores_its_late_ack() -> None:
    link = LinkState(incoming_limit=10)
    up(link)
    link.requesting(2)
    link.abandon(2)
    assert link.unsuback(2, [0]) is None


def test_close_returns_every_pending_id_to_fail() -> None:
    link = LinkState(incoming_limit=10)
    up(link)
    link.publishing(1)
    link.requesting(2)
    assert sorted(link.close()) == [1, 2]
    assert (link.closed, link.connected, link.pending()) == (True, False, set())


def test_qos1_is_acked_when_taken_on_the_connection_it_came_on() -> None:
    link = LinkState(incoming_limit=10)
    up(link)
    assert link.arrived(message(qos=1), 11)
    assert link.take() == (message(qos=1), Ack(11, 1))
    assert link.take() is None


def test_qos0_needs_no_ack() -> None:
    link = LinkState(incoming_limit=10)
    up(link)
    link.arrived(message(qos=0), 0)
    assert link.take() == (message(qos=0), None)


def test_an_ack_from_an_old_connection_is_not_sent() -> None:
    link = LinkState(incoming_limit=10)
    up(link)
    link.arrived(message(payload=b"old"), 11)
    link.lost()
    up(link)
    link.arrived(message(payload=b"new"), 11)  # the same id names another message now
    assert link.take() == (message(payload=b"old"), None)
    assert link.take() == (message(payload=b"new"), Ack(11, 1))


def test_no_ack_while_disconnected_or_after_close() -> None:
    link = LinkState(incoming_limit=10)
    up(link)
    link.arrived(message(payload=b"a"), 1)
    link.arrived(message(payload=b"b"), 2)
    link.lost()
    assert link.take() == (message(payload=b"a"), None)
    up(link)
    link.arrived(message(payload=b"c"), 3)
    link.close()
    assert link.take() == (message(payload=b"b"), None)
    assert link.take() == (message(payload=b"c"), None)


def test_qos0_beyond_the_limit_is_dropped_and_reported_once() -> None:
    link = LinkState(incoming_limit=2)
    up(link)
    results = [link.arrived(message(qos=0, payload=b"%d" % i), 0) for i in range(5)]
    assert results == [True, True, False, False, False]
    assert link.arrived(message(qos=1), 7)  # QoS 1 is bounded by the Receive Maximum
    with pytest.raises(IncomingOverflow) as overflow:
        link.take()
    assert overflow.value.dropped == 3
    assert [taken[0].payload for _ in range(3) if (taken := link.take())] == [b"0", b"1", b"x"]
    assert link.backlog() == 0


def test_a_burst_is_taken_in_order_up_to_the_limit_each_with_its_own_ack() -> None:
    link = LinkState(incoming_limit=10)
    up(link)
    link.arrived(message(payload=b"old"), 11)
    link.lost()
    up(link)
    for i in range(4):
        link.arrived(message(qos=i % 2, payload=b"%d" % i), 20 + i)
    assert link.take_waiting(3) == [
        (message(payload=b"old"), None),  # its connection is gone: no ack
        (message(qos=0, payload=b"0"), None),
        (message(qos=1, payload=b"1"), Ack(21, 1)),
    ]
    assert link.take_waiting(3) == [
        (message(qos=0, payload=b"2"), None),
        (message(qos=1, payload=b"3"), Ack(23, 1)),
    ]
    assert link.take_waiting(3) == []
    assert link.backlog() == 0


def test_a_burst_taken_at_once_leaves_the_overflow_to_the_next_take() -> None:
    link = LinkState(incoming_limit=2)
    up(link)
    for i in range(4):
        link.arrived(message(qos=0, payload=b"%d" % i), 0)
    assert [m.payload for m, _ in link.take_waiting(10)] == [b"0", b"1"]
    with pytest.raises(IncomingOverflow) as overflow:
        link.take()
    assert overflow.value.dropped == 2
    assert link.take() is None


def test_incoming_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="incoming_limit"):
        LinkState(incoming_limit=0)
