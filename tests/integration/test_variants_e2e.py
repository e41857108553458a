"""One rollout, several builds of one model: each class's manifest names the variant its
profile calls for, checked by the accuracy gate on real held-out data, and every device
self-tests its variant on the golden vectors before serving it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.session import Message, Session
from coordinator.operator import VariantFile, describe_candidate, publish_artifact, submit_spec
from edgefleet.compose import start_rollout
from edgefleet.fleet import Fleet
from edgefleet.home import OPERATOR
from models import DemoModel
from models.datafile import DataSet, load_dataset
from models.gate import check_candidate
from models.optimize import ReleaseBundle, build_variants, optimize
from schemas import Phase, PolicyError, Role, RolloutSpec, topics
from tests.integration.fleetkit import (
    INTEL,
    JETSON,
    MakeFleet,
    Wire,
    audit_log,
    coordinator_session,
    live,
    profiles,
    release_id,
    roll_out,
    run,
)

GATED_PROFILES = """
[classes.jetson-vision-standard]
providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
precisions = ["fp16", "int8", "fp32"]
max_model_bytes = 200_000_000
gate = { dataset = "digits", max_drop_points = 1.0 }
health = { max_error_rate = 0.01, p95_latency_ms = 10.0, min_inferences = 20, soak_seconds = 1.0 }

[classes.intel-lowpower-detector]
providers = ["OpenVINOExecutionProvider", "CPUExecutionProvider"]
precisions = ["int8", "int8-dynamic", "fp32"]
max_model_bytes = {intel_limit}
gate = { dataset = "digits", max_drop_points = 1.0 }
health = { max_error_rate = 0.01, p95_latency_ms = 15.0, min_inferences = 20, soak_seconds = 1.0 }

[classes.medical-cart-cpu]
providers = ["CPUExecutionProvider"]
precisions = ["fp32"]
max_model_bytes = 50_000_000
health = { max_error_rate = 0.0, p95_latency_ms = 50.0, min_inferences = 20, soak_seconds = 1.0 }
"""


@pytest.fixture(scope="module")
def digits_v3_bundle(
    demo_models: dict[str, DemoModel], tmp_path_factory: pytest.TempPathFactory
) -> ReleaseBundle:
    """digits-v3 in fp32, fp16, int8 static and int8 dynamic, each with golden vectors."""
    model = demo_models["digits-v3"]
    return optimize(
        model.path,
        load_dataset(model.dataset, "calibration"),
        load_dataset(model.dataset, "holdout"),
        precisions=("fp32", "fp16", "int8", "int8-dynamic"),
        out_dir=tmp_path_factory.mktemp("digits-v3-variants"),
    )


def _gated(fleet: Fleet, demo_models: dict[str, DemoModel], *, intel_limit: int) -> None:
    path = fleet.workdir / "gated.toml"
    path.write_text(GATED_PROFILES.replace("{intel_limit}", str(intel_limit)), encoding="utf-8")
    fleet.profiles = path
    fleet.datasets_dir = demo_models["digits-v3"].dataset.parent


def test_each_class_runs_the_variant_its_profile_calls_for(
    demo_models: dict[str, DemoModel], digits_v3_bundle: ReleaseBundle, make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 2, INTEL: 2})
    _gated(fleet, demo_models, intel_limit=20_000_000)
    variants = {v.label: v for v in digits_v3_bundle.variants}
    run(_roll_out_variants(fleet, demo_models, digits_v3_bundle.variants[0].file.parent))

    expected = {JETSON: variants["fp16"], INTEL: variants["int8-static"]}
    for device_id, hw_class in fleet.home.devices().items():
        agent = fleet.agents[device_id]
        release = agent.active_release
        assert release is not None
        want = expected[hw_class]
        assert release.variant == want.label, device_id
        assert release.artifact.sha256 == want.sha256
        assert release.golden is not None
        assert release.golden.sha256 != want.sha256
        stored = fleet.workdir / "agents" / device_id / "artifacts"
        assert any(p.name.startswith(release.golden.sha256) for p in stored.rglob("*"))


async def _roll_out_variants(fleet: Fleet, demo_models: dict[str, DemoModel], bundle: Path) -> None:
    async with live(fleet), Wire.open(fleet.home) as wire, fleet.operator() as operator:
        await roll_out(operator, fleet, wire, demo_models["digits-v2"], rollout_id="install-v2")
        await start_rollout(
            operator,
            fleet.home,
            bundle,
            rollout_id="v3-variants",
            profiles=profiles(fleet),
            classes=(JETSON, INTEL),
            waves=(50.0, 100.0),
        )
        status = await wire.until(
            lambda: wire.final_status("v3-variants"), what="the variants rollout to end"
        )
        assert status.phase is Phase.COMPLETED, status.reason
        assert set(status.releases) == {JETSON, INTEL}
        assert status.releases[JETSON].startswith("digits-v3:fp16@")
        assert status.releases[INTEL].startswith("digits-v3:int8-static@")
        for hw_class in (JETSON, INTEL):
            final = wire.verified_manifests(hw_class)[-1]
            assert final.stable is not None
            assert final.stable.release_id == status.releases[hw_class]
        stable = release_id(demo_models["digits-v2"])
        assert all(a.active_release is not None for a in fleet.agents.values())
        assert all(a.active_release.release_id != stable for a in fleet.agents.values())  # type: ignore[union-attr]


def test_variants_fitting_no_class_are_left_out_and_a_class_none_fits_is_refused(
    demo_models: dict[str, DemoModel], digits_v3_bundle: ReleaseBundle, make_fleet: MakeFleet
) -> None:
    variants = {v.label: v for v in digits_v3_bundle.variants}
    int8 = max(variants["int8-static"].size, variants["int8-dynamic"].size)
    assert int8 * 2 < variants["fp32"].size
    fleet = make_fleet({INTEL: 1})
    bundle = digits_v3_bundle.variants[0].file.parent
    # Room for no build at all: the class has no variant.
    _gated(fleet, demo_models, intel_limit=min(v.size for v in variants.values()) - 1)

    async def refuse() -> None:
        async with fleet.operator() as operator:
            with pytest.raises(PolicyError) as refused:
                await start_rollout(
                    operator,
                    fleet.home,
                    bundle,
                    rollout_id="too-big",
                    profiles=profiles(fleet),
                    classes=(INTEL,),
                    waves=(100.0,),
                )
            text = str(refused.value)
            assert text.startswith("profile_mismatch: no variant fits intel-lowpower-detector (")
            assert "exceed intel-lowpower-detector's limit of " in text
            # Refused before anything is published: a fresh subscriber to every upload
            # and artifact topic of the bundle gets nothing retained.
            shas = {v.sha256 for v in digits_v3_bundle.variants}
            async with coordinator_session(fleet.home, "it-artifact-watcher") as watcher:
                stream = watcher.messages()
                await watcher.subscribe(
                    *(topics.staging_chunks(sha) for sha in shas),
                    *(topics.artifact_chunks(sha) for sha in shas),
                )
                assert await _next_within(stream, 1.5) is None, "published despite the refusal"
                # The same watcher does see an upload once one is made.
                fp32 = variants["fp32"]
                await publish_artifact(operator, fp32.file.read_bytes(), name="control")
                message = await _next_within(stream, 10.0)
                assert message is not None
                assert fp32.sha256 in message.topic

    run(refuse())

    # Room for an int8 build, not for fp16 or fp32: those two fit no class of the
    # rollout, so they are left out of the spec, and the gateways get their int8 build.
    _gated(fleet, demo_models, intel_limit=int8 + 1000)

    async def go() -> None:
        async with live(fleet), Wire.open(fleet.home) as wire, fleet.operator() as operator:
            spec = await start_rollout(
                operator,
                fleet.home,
                bundle,
                rollout_id="int8-only",
                profiles=profiles(fleet),
                classes=(INTEL,),
                waves=(100.0,),
            )
            assert [v.label for v in spec.candidate.variants] == ["int8-static", "int8-dynamic"]
            done = await wire.until(lambda: wire.final_status("int8-only"), what="int8-only")
            assert done.phase is Phase.COMPLETED, done.reason
            assert done.releases[INTEL].startswith("digits-v3:int8-static@")

    run(go())


async def _next_within(stream: AsyncIterator[Message], seconds: float) -> Message | None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            return await anext(stream)
    return None


def test_coordinator_gate_passes_over_a_badly_calibrated_build_on_real_digits(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    """The operator's checks cannot see accuracy; the coordinator's gate does: an int8
    build calibrated on rows 100x too bright loses tens of points against the stable
    digits-v2, so the class falls back to the dynamic build; offered alone, it is refused."""
    v3 = demo_models["digits-v3"]
    calibration = load_dataset(v3.dataset, "calibration")
    too_bright = DataSet(x=calibration.x * 100.0, y=None, source="calibration x100")
    (bad,) = build_variants(v3.path.read_bytes(), too_bright, precisions=["int8"])
    (dynamic,) = build_variants(v3.path.read_bytes(), calibration, precisions=["int8-dynamic"])
    fleet = make_fleet({INTEL: 2})
    _gated(fleet, demo_models, intel_limit=20_000_000)
    files = [VariantFile("int8-static", bad.data), VariantFile("int8-dynamic", dynamic.data)]

    async def offer(operator: Session, rollout_id: str, variants: list[VariantFile]) -> None:
        candidate = describe_candidate("digits-v3", variants, profiles(fleet), (INTEL,))
        for file in variants:
            await publish_artifact(operator, file.model, name=file.label)
        spec = RolloutSpec(
            id=rollout_id,
            generation=1,
            classes=(INTEL,),
            candidate=candidate,
            waves_percent=(100.0,),
            issued_at=time.time(),
            operator=OPERATOR,
        )
        await submit_spec(operator, spec, fleet.home.key(Role.OPERATOR))

    async def go() -> None:
        async with live(fleet), Wire.open(fleet.home) as wire, fleet.operator() as operator:
            await roll_out(operator, fleet, wire, demo_models["digits-v2"], rollout_id="v2")
            await offer(operator, "fallback", files)
            done = await wire.until(lambda: wire.final_status("fallback"), what="fallback")
            assert done.phase is Phase.COMPLETED, done.reason
            assert done.releases[INTEL].startswith("digits-v3:int8-dynamic@")
            await offer(operator, "bad-only", files[:1])
            refused = await wire.until(lambda: wire.final_status("bad-only"), what="bad-only")
            assert refused.phase is Phase.REJECTED
            assert refused.reason is not None
            assert refused.reason.startswith(
                f"{INTEL}: no variant passes the accuracy gate (int8-static: accuracy "
            )
            # The baseline is what the class runs now: the dynamic build it fell back to.
            stable = check_candidate(dynamic.data, load_dataset(v3.dataset, "holdout"))
            assert f"below the baseline's {stable.candidate.accuracy * 100:.2f}%" in refused.reason
            served = {a.active_release.variant for a in fleet.agents.values() if a.active_release}
            assert served == {"int8-dynamic"}

    run(go())
    gate = [e["detail"] for e in audit_log(fleet) if e["event"] == "gate"]
    assert any(d.startswith(f"{INTEL}: int8-dynamic accuracy ") for d in gate)
    assert any(d.startswith(f"{INTEL}: gate refused int8-static: accuracy ") for d in gate)
