"""The shared artifact fetcher, driven by an in-memory transport (milliseconds, no broker)
and once against the real Mosquitto."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from broker.fetch import ArtifactFetcher, FetchFailed
from broker.session import Session
from broker.transport import Message, TransportError
from schemas import topics
from schemas.artifact import ArtifactMeta, ChunkCollector, check_whole, split_artifact
from schemas.codec import encode
from schemas.errors import Reason
from schemas.manifest import ArtifactRef
from tests.broker.localfleet import LocalFleet
from tests.broker.memory import MemoryTransport

DATA = bytes(range(256)) * 40  # 10,240 B: five 2 KiB chunks
META, CHUNKS = split_artifact(DATA, name="m.onnx", chunk_size=2048)
REF = ArtifactRef(sha256=META.sha256, size=META.size)


def in_loop(test: Callable[[], Awaitable[None]]) -> Callable[[], None]:
    """Run an async test in its own event loop, bounded."""

    @functools.wraps(test)
    def run() -> None:
        async def bounded() -> None:
            async with asyncio.timeout(10):
                await test()

        asyncio.run(bounded())

    return run


@dataclass
class MemorySink:
    kept: dict[int, bytes] = field(default_factory=dict)
    earlier: dict[int, bytes] = field(default_factory=dict)
    finished: int = 0

    def resume(self, collector: ChunkCollector) -> set[int]:
        good = set()
        for index, data in self.earlier.items():
            try:
                collector.add_chunk(index, data)
            except Exception:  # noqa: BLE001 (a chunk changed since: not resumed)
                continue
            self.kept[index] = data
            good.add(index)
        return good

    def keep(self, chunks: list[tuple[int, bytes]]) -> None:
        self.kept.update(chunks)

    def finish(self, meta: ArtifactMeta, meta_payload: bytes) -> bytes:  # noqa: ARG002
        data = b"".join(self.kept[i] for i in range(len(meta.chunks)))
        check_whole(meta, data)
        self.finished += 1
        return data


def _publish_artifact(transport: MemoryTransport, *, staging: bool = False) -> None:
    meta_topic = topics.staging_meta if staging else topics.artifact_meta
    chunk_topic = topics.staging_chunk if staging else topics.artifact_chunk
    transport.retained[meta_topic(META.sha256)] = encode(META)
    for index, chunk in enumerate(CHUNKS):
        transport.retained[chunk_topic(META.sha256, index)] = chunk


def _wired(budget: int = 1 << 20) -> tuple[ArtifactFetcher, MemoryTransport]:
    fetcher = ArtifactFetcher(budget_bytes=budget)
    transport = MemoryTransport(deliver=fetcher.offer)
    return fetcher, transport


async def _fetch(
    fetcher: ArtifactFetcher,
    transport: MemoryTransport,
    sink: MemorySink,
    *,
    end_on_corrupt: bool = True,
    timeout: float = 0.5,
) -> bytes:
    filters = (topics.staging_chunks(REF.sha256), topics.artifact_chunks(REF.sha256))
    return await fetcher.fetch(
        transport, REF, sink, filters=filters, timeout=timeout, end_on_corrupt=end_on_corrupt
    )


@in_loop
async def test_fetches_joins_and_unsubscribes() -> None:
    fetcher, transport = _wired()
    _publish_artifact(transport)
    sink = MemorySink()
    assert await _fetch(fetcher, transport, sink) == DATA
    assert sink.finished == 1
    assert transport.unsubscriptions == transport.subscriptions
    assert fetcher.queued_bytes == 0
    # Nobody fetches it any more: later messages are not taken.
    assert not fetcher.offer(
        Message(topic=topics.artifact_meta(REF.sha256), payload=b"x", retain=True, qos=1)
    )


@in_loop
async def test_chunks_before_the_meta_are_held_and_checked_when_it_comes() -> None:
    fetcher, transport = _wired()
    for index, chunk in enumerate(CHUNKS):
        transport.retained[topics.artifact_chunk(META.sha256, index)] = chunk
    task = asyncio.create_task(_fetch(fetcher, transport, MemorySink()))
    await asyncio.sleep(0.01)
    await transport.publish(topics.artifact_meta(META.sha256), encode(META), retain=True)
    assert await task == DATA


@in_loop
async def test_kept_chunks_are_resumed_and_only_the_rest_taken() -> None:
    fetcher, transport = _wired()
    transport.retained[topics.artifact_meta(META.sha256)] = encode(META)
    transport.retained[topics.artifact_chunk(META.sha256, 4)] = CHUNKS[4]
    sink = MemorySink(earlier={i: CHUNKS[i] for i in range(4)} | {3: b"changed on disk"})
    task = asyncio.create_task(_fetch(fetcher, transport, sink))
    await asyncio.sleep(0.01)
    assert not task.done()  # chunk 3 changed on disk: it is fetched again
    await transport.publish(topics.artifact_chunk(META.sha256, 3), CHUNKS[3], retain=True)
    assert await task == DATA


@in_loop
async def test_one_source_with_a_corrupt_chunk_ends_the_attempt_with_its_reason() -> None:
    fetcher, transport = _wired()
    _publish_artifact(transport)
    transport.retained[topics.artifact_chunk(META.sha256, 2)] = b"\0" * 2048
    with pytest.raises(FetchFailed) as caught:
        await _fetch(fetcher, transport, MemorySink())
    assert caught.value.reason is Reason.CHUNK_CORRUPT
    assert "chunks 2 of" in caught.value.detail


@in_loop
async def test_a_bad_meta_ends_a_one_source_attempt() -> None:
    fetcher, transport = _wired()
    other, _ = split_artifact(b"another artifact" * 100, name="x", chunk_size=1024)
    transport.retained[topics.artifact_meta(META.sha256)] = encode(other)
    with pytest.raises(FetchFailed) as caught:
        await _fetch(fetcher, transport, MemorySink())
    assert caught.value.reason is Reason.ARTIFACT_MISMATCH


@in_loop
async def test_with_two_sources_a_bad_copy_waits_for_the_genuine_one() -> None:
    fetcher, transport = _wired()
    _publish_artifact(transport, staging=True)
    transport.retained[topics.staging_chunk(META.sha256, 1)] = b"\1" * 2048
    task = asyncio.create_task(_fetch(fetcher, transport, MemorySink(), end_on_corrupt=False))
    await asyncio.sleep(0.01)
    assert not task.done()
    await transport.publish(topics.artifact_chunk(META.sha256, 1), CHUNKS[1], retain=True)
    assert await task == DATA


@in_loop
async def test_timing_out_after_bad_data_names_it_and_after_none_says_so() -> None:
    fetcher, transport = _wired()
    _publish_artifact(transport)
    transport.retained[topics.artifact_chunk(META.sha256, 1)] = b"\1" * 2048
    with pytest.raises(FetchFailed, match=r"incomplete after 0\.05 s"):
        await _fetch(fetcher, transport, MemorySink(), end_on_corrupt=False, timeout=0.05)
    fetcher, transport = _wired()
    with pytest.raises(TimeoutError, match=r"not fetched within 0\.05 s"):
        await _fetch(fetcher, transport, MemorySink(), timeout=0.05)


@in_loop
async def test_a_link_that_dropped_meanwhile_is_blamed_not_the_artifact() -> None:
    fetcher, transport = _wired()
    task = asyncio.create_task(_fetch(fetcher, transport, MemorySink(), timeout=0.05))
    await asyncio.sleep(0.01)
    transport.generation += 1
    with pytest.raises(TransportError, match="dropped"):
        await task


@in_loop
async def test_a_joined_file_of_the_wrong_digest_fails_the_attempt() -> None:
    class Lying(MemorySink):
        def finish(self, meta: ArtifactMeta, meta_payload: bytes) -> bytes:
            self.kept[0] = b"x" * len(self.kept[0])
            return super().finish(meta, meta_payload)

    fetcher, transport = _wired()
    _publish_artifact(transport)
    with pytest.raises(FetchFailed) as caught:
        await _fetch(fetcher, transport, Lying())
    assert caught.value.reason is Reason.ARTIFACT_MISMATCH


@in_loop
async def test_concurrent_fetches_of_one_artifact_share_one_attempt() -> None:
    fetcher, transport = _wired()
    _publish_artifact(transport)
    sink = MemorySink()
    first, second = await asyncio.gather(
        _fetch(fetcher, transport, sink), _fetch(fetcher, transport, MemorySink())
    )
    assert first == second == DATA
    assert sink.finished == 1
    assert len(transport.subscriptions) == 1


@in_loop
async def test_past_the_byte_budget_messages_are_dropped_then_asked_for_again() -> None:
    fetcher, transport = _wired(budget=1 << 20)
    _publish_artifact(transport)
    # A flood of junk on the artifact's topics comes first and fills the budget: the
    # genuine retained messages behind it are dropped, not queued.
    junk_topic = topics.artifact_chunk(META.sha256, 9999)
    junk = Message(topic=junk_topic, payload=b"j" * 4096, retain=False, qos=0)
    transport.pending = [junk] * 400
    assert await _fetch(fetcher, transport, MemorySink()) == DATA
    assert transport.dropped > 0
    assert len(transport.subscriptions) == 2  # asked again for what it dropped
    assert fetcher.queued_bytes == 0


def test_a_device_fetches_a_retained_artifact_from_mosquitto(fleet: LocalFleet) -> None:
    """Through a real Session: the coordinator publishes the artifact retained, a device's
    dispatcher hands the fetcher what arrives, the fetch completes and unsubscribes."""

    async def scenario() -> bytes:
        async with (
            Session(fleet.service_endpoint("coordinator"), client_id="coordinator") as coord,
            Session(fleet.device_endpoint("cam-001"), client_id="cam-001") as dev,
        ):
            await coord.publish(topics.artifact_meta(META.sha256), encode(META), retain=True)
            for index, chunk in enumerate(CHUNKS):
                await coord.publish(topics.artifact_chunk(META.sha256, index), chunk, retain=True)
            fetcher = ArtifactFetcher()

            async def dispatch() -> None:
                async for message in dev.messages():
                    fetcher.offer(message)

            async with asyncio.TaskGroup() as tg:
                dispatcher = tg.create_task(dispatch())
                data = await fetcher.fetch(
                    dev,
                    REF,
                    MemorySink(),
                    filters=(topics.artifact_chunks(REF.sha256),),
                    timeout=10,
                    end_on_corrupt=True,
                )
                dispatcher.cancel()
            return data

    assert asyncio.run(scenario()) == DATA
