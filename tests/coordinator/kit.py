"""A coordinator's surroundings for service tests without a broker: a configuration on
fresh keys, a scripted transport, and signed specs."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from broker.transport import Message, TransportError
from coordinator import CoordinatorConfig
from coordinator.profiles import load_profiles
from schemas import (
    ROLLOUT_SPEC_KIND,
    Candidate,
    Desired,
    KeyPair,
    Role,
    RoleKeys,
    RolloutSpec,
    TrustDoc,
    encode,
    public_raw,
    seal,
)
from schemas.trust import TRUST_KIND
from tests.coordinator.records import CLASS, T0, make_variant

__all__ = ["ScriptedTransport", "make_config", "sign_spec"]


def make_config(tmp_path: Path, operator: KeyPair, **changes: Any) -> CoordinatorConfig:
    """A coordinator on ``tmp_path`` trusting ``operator`` for specs; no endpoint (the
    tests hand it a transport)."""
    root, manifest = KeyPair.generate(), KeyPair.generate()
    doc = TrustDoc(
        version=1,
        issued_at=T0,
        expires_at=T0 + 86_400.0,
        keys={k.id: public_raw(k.public) for k in (root, manifest, operator)},
        roles={
            Role.ROOT: RoleKeys(keys=(root.id,)),
            Role.MANIFEST: RoleKeys(keys=(manifest.id,)),
            Role.OPERATOR: RoleKeys(keys=(operator.id,)),
        },
    )
    return CoordinatorConfig(
        data_dir=tmp_path,
        endpoint=None,  # type: ignore[arg-type]  # never connected: a transport is handed in
        profiles=load_profiles(),
        manifest_key=manifest,
        trust=seal(TRUST_KIND, encode(doc), [root]),
        root_keys={root.id: root.public},
        **changes,
    )


def sign_spec(
    operator: KeyPair,
    rollout_id: str,
    *,
    generation: int = 1,
    desired: Desired = Desired.ACTIVE,
    classes: tuple[str, ...] = (CLASS,),
) -> bytes:
    spec = RolloutSpec(
        id=rollout_id,
        generation=generation,
        desired=desired,
        classes=classes,
        candidate=Candidate(name="digits-v2", variants=(make_variant(),)),
        waves_percent=(10.0, 50.0, 100.0),
        issued_at=T0,
        operator="alice",
    )
    return seal(ROLLOUT_SPEC_KIND, encode(spec), [operator])


class ScriptedTransport:
    """A link whose incoming messages fail at once (``fail``), or are the ``incoming``
    ones, all waiting from the start, in order (then end if ``ends``, else none come)."""

    def __init__(self, *, fail: bool, incoming: Iterable[Message] = (), ends: bool = False) -> None:
        self._fail = fail
        self._ends = ends
        self.incoming = collections.deque(incoming)
        """What waits to be taken, oldest first."""
        self.published: list[tuple[str, bytes]] = []
        self.sent = asyncio.Event()
        """Set on every publish."""

    @property
    def connected(self) -> bool:
        return True

    @property
    def generation(self) -> int:
        return 1

    @property
    def client_id(self) -> str:
        return "coordinator"

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,  # noqa: ARG002 (the protocol's)
        retain: bool = False,  # noqa: ARG002
        timeout: float = 30.0,  # noqa: ARG002
    ) -> None:
        self.published.append((topic, payload))
        self.sent.set()

    async def until_published(self, topic: str, payload: bytes) -> None:
        """Wait until ``payload`` was published on ``topic``."""
        while (topic, payload) not in self.published:
            self.sent.clear()
            await self.sent.wait()

    async def subscribe(self, *topic_filters: str, qos: int = 1, timeout: float = 30.0) -> None:  # noqa: ARG002
        return

    async def unsubscribe(self, *topic_filters: str, timeout: float = 30.0) -> None:  # noqa: ARG002
        return

    async def messages(self) -> AsyncIterator[Message]:
        if self._fail:
            msg = "the session gave up on the link"
            raise TransportError(msg)
        while self.incoming:
            yield self.incoming.popleft()
        if not self._ends:
            await asyncio.Event().wait()

    def take_waiting(self, limit: int) -> list[Message]:
        return [self.incoming.popleft() for _ in range(min(limit, len(self.incoming)))]

    async def connections(self) -> AsyncIterator[int]:
        yield 1
        await asyncio.Event().wait()
