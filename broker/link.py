"""The bookkeeping of one MQTT v5 session, sans-IO: events in, decisions out.

Everything that decides what a :class:`broker.session.Session` may believe about its link
lives here, apart from paho and the event loop, so that it is tested in milliseconds:

- which packet ids wait for an acknowledgement, and of what kind: a PUBLISH stays pending
  across a reconnect (paho resends it), a SUBSCRIBE/UNSUBSCRIBE is settled with ``None``
  when the connection drops, which tells its caller to send it again on the next one;
- which subscriptions to send again after a reconnect without a session present, and that
  the link counts as up (a new :attr:`LinkState.generation`) only once all of them are
  acknowledged, so an owner that re-asserts its retained topics misses nothing;
- which connection each incoming message arrived on: an acknowledgement is sent only on
  that connection while it lives, since a packet id of an earlier one may name another
  message now (the broker redelivers an unacknowledged message of a persistent session);
- the incoming queue: QoS 1 is bounded by the Receive Maximum (acked on consumption), QoS 0
  beyond ``incoming_limit`` is dropped and counted, then reported by :meth:`LinkState.take`;
  :meth:`LinkState.take_waiting` hands over a burst at once.

The caller sends what a decision names and reports what the broker answered; it holds the
futures of waiting callers keyed by the packet ids that :class:`Settled` names.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Iterable
from dataclasses import dataclass

from broker.transport import IncomingOverflow, Message

__all__ = ["Ack", "LinkState", "Resubscribe", "Settled"]


@dataclass(frozen=True)
class Resubscribe:
    """Send SUBSCRIBE for these filters at this QoS, then report its packet id."""

    filters: tuple[str, ...]
    qos: int


@dataclass(frozen=True)
class Settled:
    """A caller's request ``mid`` is over: the broker's reason codes, or ``None`` when the
    connection dropped first (send it again once the link is back up)."""

    mid: int
    codes: tuple[int, ...] | None


@dataclass(frozen=True)
class Ack:
    """Acknowledge incoming message ``mid`` (QoS ``qos``) on the live connection."""

    mid: int
    qos: int


class _Kind(enum.Enum):
    PUBLISH = "publish"  # resent by paho after a reconnect: stays pending
    REQUEST = "request"  # SUBSCRIBE/UNSUBSCRIBE: the caller resends


@dataclass(frozen=True)
class _Incoming:
    message: Message
    mid: int
    connection: int  # the connection it arrived on; its ack is only valid there


class LinkState:
    """One session's view of its link: connections, pending packet ids, subscriptions and
    the incoming queue. Every method is an event; what it returns is what to do."""

    def __init__(self, *, incoming_limit: int) -> None:
        if incoming_limit < 1:
            msg = "incoming_limit must be >= 1"
            raise ValueError(msg)
        self._incoming_limit = incoming_limit
        self._connection = 0  # CONNACKs accepted so far: names the current connection
        self._alive = False  # the current connection is accepted and not lost
        self._generation = 0  # the latest connection reported up
        self._resubscribing: set[int] = set()
        self._pending: dict[int, _Kind] = {}
        self._subscriptions: dict[str, int] = {}
        self._incoming: collections.deque[_Incoming] = collections.deque()
        self._dropped = 0
        self._closed = False

    # -- what the session reports ------------------------------------------------------

    @property
    def connected(self) -> bool:
        """The link is up: accepted, and every re-subscription acknowledged."""
        return self._alive and self._generation == self._connection

    @property
    def alive(self) -> bool:
        """The current connection was accepted and is not lost (re-SUBACKs or not)."""
        return self._alive

    @property
    def generation(self) -> int:
        """The counter of the latest connection that came up (0: none yet)."""
        return self._generation

    @property
    def closed(self) -> bool:
        """The session ended: nothing is sent or acknowledged any more."""
        return self._closed

    @property
    def subscriptions(self) -> dict[str, int]:
        """The filters (and their QoS) sent again after a reconnect without a session."""
        return dict(self._subscriptions)

    def pending(self) -> set[int]:
        """Packet ids that wait for an acknowledgement."""
        return set(self._pending)

    def backlog(self) -> int:
        """Incoming messages not yet taken."""
        return len(self._incoming)

    # -- connections --------------------------------------------------------------------

    def accepted(self, *, session_present: bool) -> list[Resubscribe]:
        """A CONNACK accepted a new connection. Returns the SUBSCRIBEs to send again (none
        when the broker kept the session); report their ids to :meth:`resubscribing`."""
        self._connection += 1
        self._alive = True
        self._resubscribing = set()
        if session_present:
            return []
        by_qos: dict[int, list[str]] = {}
        for topic_filter, qos in self._subscriptions.items():
            by_qos.setdefault(qos, []).append(topic_filter)
        return [Resubscribe(tuple(filters), qos) for qos, filters in sorted(by_qos.items())]

    def resubscribing(self, mids: Iterable[int | None]) -> int | None:
        """The re-SUBSCRIBEs went out with these ids (``None``: not sent, the connection is
        already going). Returns the new generation if the link is up now."""
        self._resubscribing = {mid for mid in mids if mid is not None}
        return self._up_if_ready()

    def lost(self) -> list[Settled]:
        """The connection ended. Requests in flight are settled with ``None`` (to be sent
        again); publishes stay pending, since paho resends them after the reconnect."""
        self._alive = False
        self._resubscribing = set()
        settled = [
            Settled(mid, None) for mid, kind in self._pending.items() if kind is _Kind.REQUEST
        ]
        for item in settled:
            del self._pending[item.mid]
        return settled

    def close(self) -> list[int]:
        """The session ends: returns every pending id, whose callers must fail."""
        self._closed = True
        self._alive = False
        mids = list(self._pending)
        self._pending.clear()
        return mids

    def _up_if_ready(self) -> int | None:
        if self._alive and not self._resubscribing and self._generation != self._connection:
            self._generation = self._connection
            return self._generation
        return None

    # -- requests -----------------------------------------------------------------------

    def publishing(self, mid: int) -> None:
        """A QoS 1 PUBLISH was handed to paho with this id; its PUBACK settles it."""
        self._pending[mid] = _Kind.PUBLISH

    def requesting(self, mid: int) -> None:
        """A SUBSCRIBE/UNSUBSCRIBE went out with this id; its ack settles it."""
        self._pending[mid] = _Kind.REQUEST

    def abandon(self, mid: int) -> None:
        """Its caller stopped waiting (timeout, cancellation): a late ack is ignored."""
        self._pending.pop(mid, None)

    def remember(self, topic_filters: Iterable[str], qos: int) -> None:
        """Subscribe: these filters are sent again after every reconnect without a session."""
        for topic_filter in topic_filters:
            self._subscriptions[topic_filter] = qos

    def forget(self, topic_filters: Iterable[str]) -> None:
        """Unsubscribe, or a refused filter: no longer sent again."""
        for topic_filter in topic_filters:
            self._subscriptions.pop(topic_filter, None)

    def puback(self, mid: int, code: int) -> Settled | None:
        """A PUBACK arrived; ``None`` when nobody waits for that id."""
        if self._pending.get(mid) is not _Kind.PUBLISH:
            return None
        del self._pending[mid]
        return Settled(mid, (code,))

    def suback(self, mid: int, codes: Iterable[int]) -> tuple[Settled | None, int | None]:
        """A SUBACK arrived: the caller's request it settles, and the new generation if it
        was the last re-subscription the link waited for."""
        if mid in self._resubscribing:
            self._resubscribing.discard(mid)
            return None, self._up_if_ready()
        return self.unsuback(mid, codes), None

    def unsuback(self, mid: int, codes: Iterable[int]) -> Settled | None:
        """An UNSUBACK (or a caller's SUBACK) arrived; ``None`` when nobody waits for it."""
        if self._pending.get(mid) is not _Kind.REQUEST:
            return None
        del self._pending[mid]
        return Settled(mid, tuple(codes))

    # -- incoming -----------------------------------------------------------------------

    def arrived(self, message: Message, mid: int) -> bool:
        """A PUBLISH arrived on the current connection. False: dropped (QoS 0 beyond the
        limit; QoS 1 is bounded by the Receive Maximum since it is acked on consumption)."""
        if message.qos == 0 and len(self._incoming) >= self._incoming_limit:
            self._dropped += 1
            return False
        self._incoming.append(_Incoming(message, mid, self._connection))
        return True

    def take(self) -> tuple[Message, Ack | None] | None:
        """The next message and the ack to send for it, or ``None`` when none waits.

        Raises:
            IncomingOverflow: QoS 0 messages were dropped since the last call.
        """
        if self._dropped:
            dropped, self._dropped = self._dropped, 0
            raise IncomingOverflow(dropped)
        if not self._incoming:
            return None
        return self._pop()

    def take_waiting(self, limit: int) -> list[tuple[Message, Ack | None]]:
        """Up to ``limit`` messages that are waiting, in order, each with the ack to send
        for it: a burst taken at once. A drop of QoS 0 messages is left for the next
        :meth:`take` to report."""
        taken: list[tuple[Message, Ack | None]] = []
        while self._incoming and len(taken) < limit:
            taken.append(self._pop())
        return taken

    def _pop(self) -> tuple[Message, Ack | None]:
        item = self._incoming.popleft()
        ack = None
        if item.message.qos > 0 and self._alive and item.connection == self._connection:
            ack = Ack(item.mid, item.message.qos)
        return item.message, ack
