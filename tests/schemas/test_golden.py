"""Golden self-test vectors on the wire, and candidates carrying several variants."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
import pytest
from pydantic import ValidationError

from schemas import (
    ArtifactRef,
    Candidate,
    GoldenCase,
    GoldenSet,
    MalformedPayloadError,
    Reason,
    Release,
    Tensor,
    Tolerance,
    Variant,
    decode,
    encode,
    golden_mismatches,
)
from schemas.golden import MAX_GOLDEN_BYTES

SHA = "ab" * 32
WEIGHTS = np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]], dtype=np.float32)


def linear(feed: Mapping[str, npt.NDArray[np.generic]]) -> dict[str, npt.NDArray[np.generic]]:
    """A real (if small) model: scores = x @ W, label = argmax."""
    x = np.asarray(feed["x"], dtype=np.float32)
    scores = x @ WEIGHTS
    return {"scores": scores, "label": np.argmax(scores, axis=1).astype(np.int64)}


def golden_for(rows: npt.NDArray[np.float32], *, atol: float = 1e-5) -> GoldenSet:
    cases = []
    for row in rows:
        x = row.reshape(1, -1)
        out = linear({"x": x})
        cases.append(
            GoldenCase(
                inputs={"x": Tensor.of(x)},
                outputs={name: Tensor.of(value) for name, value in out.items()},
            )
        )
    return GoldenSet(
        model_sha256=SHA,
        cases=tuple(cases),
        tolerances={"scores": Tolerance(atol=atol, rtol=0.0)},
        source="four rows",
    )


ROWS = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, -1.0], [-0.5, 3.0]], dtype=np.float32)


def test_tensor_round_trips_through_the_codec() -> None:
    for array in (
        ROWS,
        np.arange(6, dtype=np.int64).reshape(3, 2),
        np.array([True, False]),
        np.zeros((0, 4), dtype=np.float16),
    ):
        tensor = decode(encode(Tensor.of(array)), Tensor)
        back = tensor.array()
        assert back.dtype == array.dtype
        assert np.array_equal(back, array)


def test_tensor_whose_bytes_do_not_fill_its_shape_is_refused() -> None:
    good = Tensor.of(ROWS)
    with pytest.raises(ValidationError, match="bytes for a float32 tensor"):
        Tensor(dtype="float32", shape=(4, 2), data=good.data[:-4])
    with pytest.raises(ValidationError):
        Tensor.of(np.array(["text"]))


def test_the_model_the_vectors_were_made_with_passes_them() -> None:
    golden = decode(encode(golden_for(ROWS)), GoldenSet, max_bytes=MAX_GOLDEN_BYTES)
    assert golden_mismatches(golden, linear) == []


def test_a_drift_beyond_tolerance_is_named_by_case_and_output() -> None:
    golden = golden_for(ROWS, atol=0.01)

    def drifted(feed: Mapping[str, npt.NDArray[np.generic]]) -> dict[str, npt.NDArray[np.generic]]:
        out = linear(feed)
        return {**out, "scores": np.asarray(out["scores"], dtype=np.float32) + np.float32(0.02)}

    def within(feed: Mapping[str, npt.NDArray[np.generic]]) -> dict[str, npt.NDArray[np.generic]]:
        out = linear(feed)
        return {**out, "scores": np.asarray(out["scores"], dtype=np.float32) + np.float32(0.005)}

    assert golden_mismatches(golden, within) == []
    problems = golden_mismatches(golden, drifted)
    assert len(problems) == len(ROWS)
    assert problems[0].startswith("case 0: scores differs by up to 0.02")


def test_labels_must_match_exactly() -> None:
    golden = golden_for(ROWS)

    def flipped(feed: Mapping[str, npt.NDArray[np.generic]]) -> dict[str, npt.NDArray[np.generic]]:
        out = linear(feed)
        return {**out, "label": (out["label"] + 1) % 3}

    problems = golden_mismatches(golden, flipped, limit=2)
    assert problems == [
        "case 0: label is int64[0], expected int64[2]",
        "case 1: label is int64[1], expected int64[0]",
    ]


def test_missing_output_wrong_shape_and_nan_are_mismatches() -> None:
    golden = golden_for(ROWS[:1])

    def no_label(feed: Mapping[str, npt.NDArray[np.generic]]) -> dict[str, npt.NDArray[np.generic]]:
        return {"scores": linear(feed)["scores"]}

    def reshaped(feed: Mapping[str, npt.NDArray[np.generic]]) -> dict[str, npt.NDArray[np.generic]]:
        out = linear(feed)
        return {**out, "scores": out["scores"].reshape(-1)}

    def nan(feed: Mapping[str, npt.NDArray[np.generic]]) -> dict[str, npt.NDArray[np.generic]]:
        out = linear(feed)
        return {**out, "scores": np.full_like(out["scores"], np.nan)}

    assert golden_mismatches(golden, no_label) == ["case 0: no output label"]
    assert golden_mismatches(golden, reshaped) == ["case 0: scores has shape (3,), expected (1, 3)"]
    assert golden_mismatches(golden, nan) == ["case 0: scores is not finite"]


def test_golden_set_over_its_cap_is_refused_before_parsing() -> None:
    payload = encode(golden_for(ROWS))
    with pytest.raises(MalformedPayloadError) as refused:
        decode(payload, GoldenSet, max_bytes=len(payload) - 1)
    assert refused.value.reason is Reason.OVERSIZED


def _variant(label: str, sha: str, golden: str | None = None) -> Variant:
    spec = {"name": "x", "dtype": "float32", "shape": ("N", 2)}
    return Variant.model_validate(
        {
            "label": label,
            "artifact": {"sha256": sha, "size": 10},
            "golden": None if golden is None else {"sha256": golden, "size": 5},
            "inputs": [spec],
            "outputs": [spec],
        }
    )


def test_candidate_variants_must_differ_in_label_and_artifact() -> None:
    with pytest.raises(ValidationError, match="variant labels repeat"):
        Candidate(name="m", variants=(_variant("fp32", "1" * 64), _variant("fp32", "2" * 64)))
    with pytest.raises(ValidationError, match="same artifact"):
        Candidate(name="m", variants=(_variant("fp32", "1" * 64), _variant("int8", "1" * 64)))
    with pytest.raises(ValidationError):
        Candidate(name="m", variants=())
    candidate = Candidate(
        name="m", variants=(_variant("fp32", "1" * 64, "3" * 64), _variant("int8", "2" * 64))
    )
    assert candidate.artifacts() == {"1" * 64, "2" * 64, "3" * 64}


def test_release_id_names_the_variant(release: Release) -> None:
    plain = release.model_copy(update={"variant": None})
    assert plain.release_id == f"{release.name}@{release.artifact.sha256[:12]}"
    int8 = release.model_copy(
        update={"variant": "int8-static", "golden": ArtifactRef(sha256=SHA, size=9)}
    )
    assert int8.release_id == f"{release.name}:int8-static@{release.artifact.sha256[:12]}"
