"""The keeper (``coordinator.keeper``) carrying out custody over a scripted transport and
a real artifact store: a tampered named artifact is put back from the kept copy, an
unnamed one is left alone, an ended rollout's artifact is cleared."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from broker.transport import Message
from coordinator.core import Core
from coordinator.fetching import Fetcher
from coordinator.keeper import Keeper
from coordinator.specs import Claim
from coordinator.store import ClassRecord
from schemas import ArtifactRef, KeyPair, encode, topics
from schemas.artifact import split_artifact
from schemas.topics import TopicKind
from tests.coordinator.kit import ScriptedTransport, make_config
from tests.coordinator.records import CLASS, T0, make_release

DATA = bytes(range(256)) * 20  # 5,120 B: five chunks of 1 KiB
META, CHUNKS = split_artifact(DATA, name="model.onnx", chunk_size=1024)
META_PAYLOAD = encode(META)
SHA = META.sha256


def _run(tmp_path: Path, test: Callable[[Core, Keeper], Coroutine[Any, Any, None]]) -> None:
    async def main() -> None:
        core = Core(make_config(tmp_path, KeyPair.generate()), clock=lambda: T0)
        keeper = Keeper(core, Fetcher(core))
        core.transport = ScriptedTransport(fail=False)
        try:
            async with asyncio.timeout(10.0), asyncio.TaskGroup() as tg:
                core.tg = tg
                await test(core, keeper)
        finally:
            core.store.close()

    asyncio.run(main())


def _published(core: Core) -> list[tuple[str, bytes]]:
    assert isinstance(core.transport, ScriptedTransport)
    return core.transport.published


async def _retain_everything(core: Core, keeper: Keeper) -> None:
    """The broker as it holds the artifact after a publish, noted as the keeper sees it."""
    for index, chunk in enumerate(CHUNKS):
        message = Message(
            topic=topics.artifact_chunk(SHA, index), payload=chunk, retain=True, qos=1
        )
        await keeper.note(message, TopicKind.ARTIFACT_CHUNK, SHA, index)
    meta = Message(topic=topics.artifact_meta(SHA), payload=META_PAYLOAD, retain=True, qos=1)
    await keeper.note(meta, TopicKind.ARTIFACT_META, SHA, None)


def _name_it(core: Core) -> None:
    stable = make_release(sha256=SHA).model_copy(
        update={"artifact": ArtifactRef(sha256=SHA, size=len(DATA))}
    )
    core.classes[CLASS] = ClassRecord(name=CLASS, stable=stable)


def test_a_tampered_chunk_of_a_named_artifact_is_put_back_from_the_copy(tmp_path: Path) -> None:
    async def tamper(core: Core, keeper: Keeper) -> None:
        core.artifacts.put(META_PAYLOAD, DATA)
        _name_it(core)
        await _retain_everything(core, keeper)
        await keeper.reassert()  # as on every connection: the copy is known from here
        core.ready.set()
        forged = b"x" * 1024
        message = Message(topic=topics.artifact_chunk(SHA, 2), payload=forged, retain=True, qos=1)
        await keeper.note(message, TopicKind.ARTIFACT_CHUNK, SHA, 2)
        assert isinstance(core.transport, ScriptedTransport)
        await core.transport.until_published(topics.artifact_meta(SHA), META_PAYLOAD)
        assert _published(core) == [
            (topics.artifact_chunk(SHA, 2), CHUNKS[2]),
            (topics.artifact_meta(SHA), META_PAYLOAD),
        ]

    _run(tmp_path, tamper)


def test_the_broker_holding_the_copy_is_not_sent_again(tmp_path: Path) -> None:
    async def intact(core: Core, keeper: Keeper) -> None:
        core.artifacts.put(META_PAYLOAD, DATA)
        _name_it(core)
        await _retain_everything(core, keeper)
        await keeper.reassert()
        assert _published(core) == []

    _run(tmp_path, intact)


def test_an_artifact_no_manifest_names_is_pruned_and_cleared(tmp_path: Path) -> None:
    async def ended(core: Core, keeper: Keeper) -> None:
        core.artifacts.put(META_PAYLOAD, DATA)
        await _retain_everything(core, keeper)
        core.ready.set()
        await keeper.prune()
        assert core.artifacts.get(SHA) is None
        cleared = [(topics.artifact_chunk(SHA, i), b"") for i in range(len(CHUNKS))]
        assert _published(core) == [*cleared, (topics.artifact_meta(SHA), b"")]

    _run(tmp_path, ended)


def test_nothing_is_pruned_while_a_spec_arrives_that_may_claim_it(tmp_path: Path) -> None:
    """A coordinator that lost its store re-admits a live rollout from its retained spec;
    until that spec is recorded, its candidate is named by nothing. The prune of the
    connection's re-assert waits for it, so the candidate is neither deleted nor cleared
    from under the re-admission."""

    async def arriving(core: Core, keeper: Keeper) -> None:
        core.artifacts.put(META_PAYLOAD, DATA)
        await _retain_everything(core, keeper)
        core.ready.set()
        keeper.arrivals.add()
        prune = asyncio.create_task(keeper.prune())
        await asyncio.sleep(0.05)
        assert not prune.done()
        assert core.artifacts.get(SHA) is not None
        assert _published(core) == []
        # The spec is recorded with its claim on the artifact: the prune keeps it.
        core.claims["r"] = Claim(frozenset({CLASS}), frozenset({SHA}))
        keeper.arrivals.done()
        await prune
        assert core.artifacts.get(SHA) is not None
        assert _published(core) == []

    _run(tmp_path, arriving)
