"""The operator's side on a real broker: uploads go to ``staging/`` (never to what
devices fetch), an artifact ``artifacts/`` already retains is not sent again, only the
variants a candidate names are sent, and a rollout id that is taken is refused."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from broker.session import Message
from coordinator.operator import (
    RolloutExists,
    VariantFile,
    check_new_rollout,
    describe_candidate,
    publish_artifact,
    read_spec,
    read_status,
    submit_spec,
    upload_candidate,
)
from edgefleet.cli import main
from models import DemoModel
from models.datafile import load_dataset
from models.optimize import build_variants
from schemas import Phase, Role, RolloutStatus, WaveCounts, encode, split_artifact, topics
from schemas.errors import UsageError
from tests.integration.fleetkit import (
    JETSON,
    MakeFleet,
    coordinator_session,
    profiles,
    run,
    spec_for,
)


async def _drain(stream: AsyncIterator[Message], seconds: float) -> list[Message]:
    """Every message that arrives within ``seconds``."""
    seen: list[Message] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            async for message in stream:
                seen.append(message)  # appended one by one: kept when the timeout cuts in
    return seen


def test_an_upload_goes_to_staging_even_when_artifacts_retains_it(
    make_fleet: MakeFleet, demo_models: dict[str, DemoModel]
) -> None:
    fleet = make_fleet({JETSON: 1})
    v1, v2 = demo_models["digits-v1"], demo_models["digits-v2"]

    async def go() -> None:
        async with (
            fleet.operator() as operator,
            coordinator_session(fleet.home, "it-artifact-watcher") as watcher,
        ):
            stream = watcher.messages()
            await watcher.subscribe(topics.all_staging(), topics.all_artifacts())
            meta = await publish_artifact(operator, v2.path.read_bytes(), name=v2.name)
            got = await _drain(stream, 1.0)
            staged = {m.topic for m in got}
            assert staged == {
                topics.staging_meta(meta.sha256),
                *(topics.staging_chunk(meta.sha256, i) for i in range(len(meta.chunks))),
            }
            assert got[-1].topic == topics.staging_meta(meta.sha256), "meta before a chunk"

            # v1 as the coordinator publishes an admitted artifact: a rollout of the same
            # file again still uploads it, since the coordinator may be clearing that
            # copy (no manifest names it) by the time the spec arrives.
            data = v1.path.read_bytes()
            published, chunks = split_artifact(data, name=v1.name)
            for i, chunk in enumerate(chunks):
                await watcher.publish(
                    topics.artifact_chunk(published.sha256, i), chunk, retain=True
                )
            await watcher.publish(
                topics.artifact_meta(published.sha256), encode(published), retain=True
            )
            await _drain(stream, 0.5)
            assert await publish_artifact(operator, data, name=v1.name) == published
            resent = {m.topic for m in await _drain(stream, 1.0)}
            assert topics.staging_meta(published.sha256) in resent

    run(go())


def test_a_taken_rollout_id_is_refused_whether_its_spec_or_only_its_status_is_retained(
    make_fleet: MakeFleet, demo_models: dict[str, DemoModel]
) -> None:
    fleet = make_fleet({JETSON: 1})
    v2 = demo_models["digits-v2"]
    key = fleet.home.key(Role.OPERATOR)

    async def go() -> None:
        async with (
            fleet.operator() as operator,
            coordinator_session(fleet.home, "it-coordinator") as cloud,
        ):
            spec = spec_for(v2, rollout_id="taken", classes=(JETSON,))
            await check_new_rollout(operator, "taken")
            await submit_spec(operator, spec, key)
            assert await read_spec(operator, "taken") == spec
            with pytest.raises(RolloutExists) as refused:
                await check_new_rollout(operator, "taken")
            assert isinstance(refused.value, UsageError)
            assert "rollout 'taken' already exists" in str(refused.value)
            with pytest.raises(RolloutExists):
                await submit_spec(operator, spec, key)

            # A status alone (the spec lost, or never the operator's) holds the id too.
            status = RolloutStatus(
                id="status-only",
                generation=1,
                phase=Phase.REJECTED,
                wave=0,
                waves_percent=(100.0,),
                counts=WaveCounts(),
                classes=(JETSON,),
                reason="bad signature",
                updated_at=0.0,
            )
            await cloud.publish(topics.rollout_status("status-only"), encode(status), retain=True)
            assert await read_status(operator, "status-only") == status
            with pytest.raises(RolloutExists):
                await check_new_rollout(operator, "status-only")
            # A new generation of one's own rollout is not a new rollout.
            await submit_spec(operator, spec.model_copy(update={"generation": 2}), key)

    run(go())


def test_retained_reads_are_complete_without_waiting_for_a_timeout(
    make_fleet: MakeFleet, demo_models: dict[str, DemoModel]
) -> None:
    """Each read is a SUBSCRIBE then an UNSUBSCRIBE: Mosquitto answers the second only
    after it queued the first's retained messages, so a read that finds nothing is an
    answer, not a guess. Many reads in a row on one session, present and absent."""
    fleet = make_fleet({JETSON: 1})
    v2 = demo_models["digits-v2"]
    key = fleet.home.key(Role.OPERATOR)

    async def go() -> None:
        async with fleet.operator() as operator:
            loop = asyncio.get_running_loop()
            started = loop.time()
            for i in range(40):
                rollout_id = f"r{i}"
                assert await read_spec(operator, rollout_id) is None
                spec = spec_for(v2, rollout_id=rollout_id, classes=(JETSON,))
                await submit_spec(operator, spec, key)
                assert await read_spec(operator, rollout_id) == spec
            # 80 reads found nothing (40 here, 40 in submit_spec): a timeout on each would not fit.
            assert loop.time() - started < 30.0

    run(go())


def test_only_the_variants_a_candidate_names_are_uploaded(
    make_fleet: MakeFleet, demo_models: dict[str, DemoModel]
) -> None:
    fleet = make_fleet({JETSON: 1})
    v2 = demo_models["digits-v2"]
    (fp16,) = build_variants(
        v2.path.read_bytes(), load_dataset(v2.dataset, "calibration"), precisions=["fp16"]
    )
    files = [VariantFile("fp32", v2.path.read_bytes()), VariantFile("fp16", fp16.data)]
    # The test profiles' Jetsons run fp32 only: the fp16 build is left out.
    candidate = describe_candidate("digits-v2", files, profiles(fleet), (JETSON,))
    assert [v.label for v in candidate.variants] == ["fp32"]

    async def go() -> None:
        async with (
            fleet.operator() as operator,
            coordinator_session(fleet.home, "it-artifact-watcher") as watcher,
        ):
            stream = watcher.messages()
            await watcher.subscribe(topics.all_staging())
            await upload_candidate(operator, candidate, files)
            uploaded = {topics.parse(m.topic).name for m in await _drain(stream, 1.0)}
            assert uploaded == {v2.sha256}

    run(go())


def test_rollout_start_under_a_taken_id_fails_with_one_line(
    make_fleet: MakeFleet,
    demo_models: dict[str, DemoModel],
    capsys: pytest.CaptureFixture[str],
) -> None:
    fleet = make_fleet({JETSON: 1})
    start = ["--home", str(fleet.home.root), "rollout", "start", "--class", JETSON]
    start += ["--classes", str(fleet.profiles), "--waves", "100", "--id", "once"]
    v1, v2 = demo_models["digits-v1"].path, demo_models["digits-v2"].path
    assert main([*start, "--model", str(v1)]) == 0
    assert capsys.readouterr().out == "once\n"
    assert main([*start, "--model", str(v2)]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("edgefleet: rollout 'once' already exists; start it under another --id")
