"""An in-memory link for tests of what fetches over a :class:`broker.transport.Transport`:
retained messages in a dict, delivered straight to the owner's dispatcher (the fetcher's
``offer``) when a subscription matches, with no broker and no event loop of its own."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from broker.transport import Message

__all__ = ["MemoryTransport"]


def _matches(topic_filter: str, topic: str) -> bool:
    return topic_filter.endswith("/+") and topic.rsplit("/", 1)[0] == topic_filter[:-2]


@dataclass
class MemoryTransport:
    """Retained messages in a dict; a subscription delivers the matching ones to ``deliver``."""

    retained: dict[str, bytes] = field(default_factory=dict)
    deliver: Callable[[Message], object] = lambda _m: False
    subscriptions: list[tuple[str, ...]] = field(default_factory=list)
    unsubscriptions: list[tuple[str, ...]] = field(default_factory=list)
    pending: list[Message] = field(default_factory=list)
    """Delivered, in order, at the next subscription, before the retained messages (a
    flood of junk, or a script of what a broker sends)."""
    connected: bool = True
    generation: int = 1
    client_id: str = "memory"
    dropped: int = 0
    """Pending messages ``deliver`` refused (returned False)."""

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        timeout: float = 30.0,  # noqa: ARG002
    ) -> None:
        if retain:
            self.retained[topic] = payload
        self.deliver(Message(topic=topic, payload=payload, retain=False, qos=qos))

    async def subscribe(self, *topic_filters: str, qos: int = 1, timeout: float = 30.0) -> None:  # noqa: ARG002
        self.subscriptions.append(topic_filters)
        pending, self.pending = self.pending, []
        self.dropped += sum(self.deliver(message) is False for message in pending)
        for topic, payload in list(self.retained.items()):
            if any(_matches(f, topic) for f in topic_filters):
                self.deliver(Message(topic=topic, payload=payload, retain=True, qos=qos))

    async def unsubscribe(self, *topic_filters: str, timeout: float = 30.0) -> None:  # noqa: ARG002
        self.unsubscriptions.append(topic_filters)

    def messages(self) -> AsyncIterator[Message]:
        msg = "deliveries go to `deliver`: a fetch never iterates a link's messages"
        raise AssertionError(msg)

    def take_waiting(self, limit: int) -> list[Message]:  # noqa: ARG002 (the protocol's)
        msg = "deliveries go to `deliver`: a fetch never takes a link's messages"
        raise AssertionError(msg)

    def connections(self) -> AsyncIterator[int]:
        msg = "a fetch never waits for connections"
        raise AssertionError(msg)
