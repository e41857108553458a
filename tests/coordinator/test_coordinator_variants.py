"""Which variant each class gets, on real builds of digits-v3: the profiles' precision
order and size limits (``coordinator.variants``), then the accuracy gate on real
held-out digits against the class's stable release (``coordinator.admission``)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import pytest

from coordinator.admission import Selection, select_releases
from coordinator.operator import VariantFile, describe_candidate
from coordinator.profiles import ClassProfile, load_profiles
from coordinator.reasons import RolloutReason
from coordinator.validate import ModelFacts
from coordinator.variants import Built, rank_variants
from models import DemoModel
from models.datafile import DataSet, load_dataset
from models.gate import check_candidate
from models.golden import make_golden
from models.optimize import VariantBuild, build_variants
from schemas import (
    ArtifactRef,
    Candidate,
    Cause,
    PolicyError,
    Release,
    RolloutSpec,
    ShadowBudget,
    UsageError,
    Variant,
    encode,
)
from tests.coordinator.conftest import T0

JETSON = "jetson-vision-standard"
INTEL = "intel-lowpower-detector"
GPU = "factory-gateway-gpu"
CART = "medical-cart-cpu"

TINY = """
[classes.tiny-gateway]
providers = ["CPUExecutionProvider"]
precisions = ["fp32", "int8"]
max_model_bytes = {limit}
health = {{ max_error_rate = 0.01, p95_latency_ms = 10.0, min_inferences = 60, soak_seconds = 4.0 }}
"""


@pytest.fixture(scope="module")
def v3(demo_models: dict[str, DemoModel]) -> DemoModel:
    return demo_models["digits-v3"]


@pytest.fixture(scope="module")
def builds(v3: DemoModel) -> dict[str, VariantBuild]:
    calibration = load_dataset(v3.dataset, "calibration")
    made = build_variants(
        v3.path.read_bytes(), calibration, precisions=("fp32", "fp16", "int8", "int8-dynamic")
    )
    return {b.label: b for b in made}


@pytest.fixture(scope="module")
def holdout(v3: DemoModel) -> DataSet:
    return load_dataset(v3.dataset, "holdout")


@pytest.fixture(scope="module")
def degraded(v3: DemoModel, holdout: DataSet) -> bytes:
    """digits-v3 quantised to int8 with calibration data far outside the real pixel range
    (every row 100x too bright): the activation scales are far too coarse."""
    calibration = load_dataset(v3.dataset, "calibration")
    wrong = DataSet(x=calibration.x * 100.0, y=None, source="100x too bright")
    (bad,) = build_variants(v3.path.read_bytes(), wrong, precisions=["int8"])
    fp32 = check_candidate(v3.path.read_bytes(), holdout)
    worse = check_candidate(bad.data, holdout)
    assert worse.candidate.accuracy < fp32.candidate.accuracy - 0.05, "not degraded enough"
    return bad.data


def _ref(data: bytes) -> ArtifactRef:
    return ArtifactRef(sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def _built(builds: dict[str, VariantBuild], labels: Sequence[str]) -> list[Built]:
    out = []
    for label in labels:
        facts = ModelFacts(builds[label].data)
        variant = Variant(
            label=label,
            artifact=_ref(builds[label].data),
            inputs=facts.inputs,
            outputs=facts.outputs,
        )
        out.append(Built(variant, facts))
    return out


def _tiny(tmp_path: Path, limit: int) -> dict[str, ClassProfile]:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.format(limit=limit), encoding="utf-8")
    return load_profiles(path)


def test_each_shipped_class_takes_the_precision_its_profile_lists_first(
    builds: dict[str, VariantBuild], profiles: dict[str, ClassProfile]
) -> None:
    built = _built(builds, ["fp32", "fp16", "int8-static", "int8-dynamic"])
    ranking = rank_variants(built, profiles, [JETSON, INTEL, GPU, CART])
    assert ranking.problems == ()
    first = {name: order[0].variant.label for name, order in ranking.order.items()}
    assert first == {JETSON: "fp16", INTEL: "int8-static", GPU: "fp16", CART: "fp32"}
    # The rest in the profile's order: what the gate falls back to.
    assert [b.variant.label for b in ranking.order[INTEL]] == [
        "int8-static",
        "int8-dynamic",
        "fp32",
    ]
    assert [b.variant.label for b in ranking.order[CART]] == ["fp32"]


def test_an_oversized_variant_is_left_out_for_a_small_class(
    tmp_path: Path, builds: dict[str, VariantBuild]
) -> None:
    fp32, int8 = len(builds["fp32"].data), len(builds["int8-static"].data)
    assert int8 * 2 < fp32
    built = _built(builds, ["fp32", "int8-static"])

    # Room for the int8 build only: the class's favourite (fp32) is passed over...
    small = _tiny(tmp_path, int8 + 100)
    ranking = rank_variants(built, small, ["tiny-gateway"])
    assert [b.variant.label for b in ranking.order["tiny-gateway"]] == ["int8-static"]
    # ...and since fp32 then fits no class of this rollout, it is left out, saying why.
    assert ranking.problems == ()
    assert [b.variant.label for b in ranking.used] == ["int8-static"]
    (ignored,) = ranking.ignored
    assert ignored.startswith("variant fp32 (fp32, ")
    assert f"{fp32} bytes exceed tiny-gateway's limit of {int8 + 100}" in ignored

    # Room for nothing: the class has no variant, and that refuses the rollout.
    smaller = _tiny(tmp_path, int8 - 1)
    ranking = rank_variants(built, smaller, ["tiny-gateway"])
    (problem,) = ranking.problems
    assert problem.startswith("no variant fits tiny-gateway (fp32: ")
    assert ranking.used == ()


def test_a_variant_folder_rolled_out_to_one_class_uses_what_fits_it(
    builds: dict[str, VariantBuild],
    profiles: dict[str, ClassProfile],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The README's manual path: every build 'model optimize' makes, rolled out to the
    Jetsons alone. Their profile lists fp16, int8 and fp32, not int8-dynamic."""
    labels = ["fp32", "fp16", "int8-static", "int8-dynamic"]
    files = [VariantFile(label, builds[label].data) for label in labels]
    with caplog.at_level(logging.WARNING, logger="coordinator.operator"):
        candidate = describe_candidate("digits-v3", files, profiles, [JETSON])
    assert [v.label for v in candidate.variants] == ["fp32", "fp16", "int8-static"]
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith("digits-v3: left out: variant int8-dynamic (int8-dynamic, ")
    assert f"int8-dynamic is not among {JETSON}'s" in warning
    # Every class the folder was built for takes a variant of it.
    every = describe_candidate("digits-v3", files, profiles, [JETSON, INTEL, GPU, CART])
    assert [v.label for v in every.variants] == labels


def test_a_class_no_variant_fits_refuses_the_rollout_before_anything_is_published(
    builds: dict[str, VariantBuild], profiles: dict[str, ClassProfile]
) -> None:
    files = [VariantFile(label, builds[label].data) for label in ("int8-static", "fp16")]
    # The carts run fp32 only.
    with pytest.raises(PolicyError) as refused:
        describe_candidate("digits-v3", files, profiles, [INTEL, CART])
    text = str(refused.value)
    assert text.startswith("profile_mismatch: no variant fits medical-cart-cpu (int8-static: ")
    assert "fp16 is not among medical-cart-cpu's" in text
    # fp16 fits neither class, yet only the class without a variant is a problem.
    assert "variant fp16" not in text
    with pytest.raises(PolicyError, match="unknown classes"):
        describe_candidate("digits-v3", files, profiles, ["no-such-class"])


def _spec(variants: Sequence[Variant], classes: Sequence[str]) -> RolloutSpec:
    return RolloutSpec(
        id="v3",
        generation=1,
        classes=tuple(classes),
        candidate=Candidate(name="digits-v3", variants=tuple(variants)),
        waves_percent=(100.0,),
        issued_at=T0,
        operator="op",
    )


def _stable(model: DemoModel, profile: ClassProfile) -> tuple[Release, bytes]:
    data = model.path.read_bytes()
    facts = ModelFacts(data)
    release = Release(
        name=model.name,
        variant="fp32",
        artifact=_ref(data),
        runtime=profile.runtime,
        inputs=facts.inputs,
        outputs=facts.outputs,
        health=profile.health,
    )
    return release, data


def _variant(label: str, data: bytes, golden: bytes | None = None) -> Variant:
    facts = ModelFacts(data)
    return Variant(
        label=label,
        artifact=_ref(data),
        golden=None if golden is None else _ref(golden),
        inputs=facts.inputs,
        outputs=facts.outputs,
    )


def test_gate_passes_good_variants_against_the_stable_release(
    builds: dict[str, VariantBuild],
    profiles: dict[str, ClassProfile],
    demo_models: dict[str, DemoModel],
    holdout: DataSet,
    v3: DemoModel,
) -> None:
    blobs = {}
    variants = []
    for label in ("fp32", "fp16", "int8-static"):
        data = builds[label].data
        golden = encode(make_golden(data, holdout.x, precision=builds[label].precision))
        blobs[_ref(data).sha256] = data
        blobs[_ref(golden).sha256] = golden
        variants.append(_variant(label, data, golden))
    stable = {c: _stable(demo_models["digits-v2"], profiles[c]) for c in (JETSON, INTEL)}
    selection = select_releases(
        _spec(variants, [JETSON, INTEL]), blobs, stable, profiles, v3.dataset.parent
    )
    assert (selection.problems, selection.cause, selection.refusal(2000)) == ((), None, None)
    assert {c: r.variant for c, r in selection.releases.items()} == {
        JETSON: "fp16",
        INTEL: "int8-static",
    }
    intel = selection.releases[INTEL]
    assert intel.golden == variants[2].golden
    assert intel.runtime == profiles[INTEL].runtime
    assert intel.health == profiles[INTEL].health
    assert any(n.startswith(f"{INTEL}: int8-static accuracy ") for n in selection.notes)


def test_gate_passes_over_a_badly_calibrated_int8_build(
    builds: dict[str, VariantBuild],
    profiles: dict[str, ClassProfile],
    demo_models: dict[str, DemoModel],
    degraded: bytes,
    v3: DemoModel,
) -> None:
    dynamic = builds["int8-dynamic"].data
    blobs = {_ref(degraded).sha256: degraded, _ref(dynamic).sha256: dynamic}
    variants = [_variant("int8-static", degraded), _variant("int8-dynamic", dynamic)]
    stable = {INTEL: _stable(demo_models["digits-v2"], profiles[INTEL])}
    selection = select_releases(
        _spec(variants, [INTEL]), blobs, stable, profiles, v3.dataset.parent
    )
    assert selection.problems == ()
    assert selection.releases[INTEL].variant == "int8-dynamic"
    refused = [n for n in selection.notes if "gate refused" in n]
    assert refused
    assert "int8-static" in refused[0]

    # With only the degraded build on offer, the rollout is refused.
    only = select_releases(_spec(variants[:1], [INTEL]), blobs, stable, profiles, v3.dataset.parent)
    assert only.releases == {}
    (problem,) = only.problems
    assert problem.startswith(f"{INTEL}: no variant passes the accuracy gate (int8-static: ")
    assert only.cause is Cause.GATE_FAILED
    refusal = only.refusal(2000)
    assert refusal is not None
    assert (refusal.cause, str(refusal)) == (Cause.GATE_FAILED, problem)


def test_gate_without_its_data_set_refuses_and_says_where_it_looked(
    builds: dict[str, VariantBuild], profiles: dict[str, ClassProfile], tmp_path: Path
) -> None:
    data = builds["int8-static"].data
    selection = select_releases(
        _spec([_variant("int8-static", data)], [INTEL]),
        {_ref(data).sha256: data},
        {},
        profiles,
        tmp_path,
    )
    (problem,) = selection.problems
    assert selection.cause is Cause.GATE_FAILED
    assert problem.startswith(f"{INTEL}: accuracy gate: ")
    assert str(tmp_path / "digits.npz") in problem


def test_golden_vectors_of_another_variant_refuse_the_rollout(
    builds: dict[str, VariantBuild], profiles: dict[str, ClassProfile], holdout: DataSet
) -> None:
    fp32, int8 = builds["fp32"].data, builds["int8-static"].data
    golden = encode(make_golden(fp32, holdout.x, precision="fp32"))
    blobs = {_ref(int8).sha256: int8, _ref(golden).sha256: golden}
    selection = select_releases(
        _spec([_variant("int8-static", int8, golden)], [INTEL]), blobs, {}, profiles, None
    )
    (problem,) = selection.problems
    assert selection.cause is Cause.INVALID_CANDIDATE
    assert problem.startswith("variant int8-static: golden vectors are for model ")


def test_class_without_a_gate_takes_its_first_fitting_variant(
    tmp_path: Path, builds: dict[str, VariantBuild]
) -> None:
    data = builds["fp32"].data
    small = _tiny(tmp_path, 10_000_000)
    selection = select_releases(
        _spec([_variant("fp32", data)], ["tiny-gateway"]),
        {_ref(data).sha256: data},
        {},
        small,
        None,
    )
    assert selection.problems == ()
    assert selection.releases["tiny-gateway"].variant == "fp32"
    assert selection.releases["tiny-gateway"].artifact.size == len(data)
    assert selection.releases["tiny-gateway"].health == small["tiny-gateway"].health
    # A spec that asks for a shadow soak gets it in every class's release.
    asked = ShadowBudget(min_agreement=0.9)
    spec = _spec([_variant("fp32", data)], ["tiny-gateway"]).model_copy(update={"shadow": asked})
    shadowed = select_releases(spec, {_ref(data).sha256: data}, {}, small, None)
    assert shadowed.releases["tiny-gateway"].health.shadow == asked


def test_admission_uses_the_variants_that_fit_and_ignores_the_rest(
    builds: dict[str, VariantBuild],
    profiles: dict[str, ClassProfile],
    demo_models: dict[str, DemoModel],
    v3: DemoModel,
) -> None:
    """The coordinator ranks with the operator's rule: a spec carrying a variant no class
    of the rollout runs is admitted, and the variant is named nowhere."""
    labels = ("fp32", "fp16", "int8-static", "int8-dynamic")
    blobs = {_ref(builds[label].data).sha256: builds[label].data for label in labels}
    variants = [_variant(label, builds[label].data) for label in labels]
    stable = {JETSON: _stable(demo_models["digits-v2"], profiles[JETSON])}
    selection = select_releases(
        _spec(variants, [JETSON]), blobs, stable, profiles, v3.dataset.parent
    )
    assert selection.problems == ()
    assert {c: r.variant for c, r in selection.releases.items()} == {JETSON: "fp16"}


def test_a_selection_says_what_kind_of_check_its_problems_failed() -> None:
    """Problems without a cause would admit a refused spec: not allowed."""
    with pytest.raises(UsageError):
        Selection({}, ("variant fp32: no graph",), ())
    with pytest.raises(UsageError):
        Selection({}, (), (), Cause.GATE_FAILED)
    refused = Selection({}, ("x" * 300,), (), Cause.INVALID_CANDIDATE)
    assert refused.refusal(100) == RolloutReason(
        cause=Cause.INVALID_CANDIDATE, problems=("x" * 300,), chars=100
    )
    assert len(str(refused.refusal(100))) == 100
