"""``edgefleet tail``'s reader, without a broker: messages in, JSON lines out. The
messages are real (msgpack, Ed25519 signatures); what a broker adds is tested in
``tests/integration/test_tail_e2e.py``."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import msgpack
import pytest

from broker.transport import Message
from edgefleet.tail import Renderer, TailOptions, parse_duration
from schemas import (
    MANIFEST_KIND,
    TRUST_KIND,
    ArtifactRef,
    DeviceState,
    HealthBudget,
    KeyPair,
    LogHistogram,
    Manifest,
    Release,
    Role,
    RoleKeys,
    Runtime,
    TelemetrySummary,
    TensorSpec,
    TrustDoc,
    encode,
    public_raw,
    seal,
    topics,
)
from schemas.topics import DeviceChannel
from tests.coordinator.records import device_state

NOW = 1_700_000_000.0
CLASS = "jetson-vision-standard"


class Keys:
    def __init__(self) -> None:
        self.root = KeyPair.generate()
        self.manifest = KeyPair.generate()
        self.operator = KeyPair.generate()

    def trust(self, version: int = 1, manifest: KeyPair | None = None) -> bytes:
        signing = manifest or self.manifest
        pairs = {Role.ROOT: self.root, Role.MANIFEST: signing, Role.OPERATOR: self.operator}
        doc = TrustDoc(
            version=version,
            issued_at=NOW,
            expires_at=NOW + 86_400.0,
            keys={p.id: public_raw(p.public) for p in pairs.values()},
            roles={role: RoleKeys(keys=(p.id,)) for role, p in pairs.items()},
        )
        return seal(TRUST_KIND, encode(doc), [self.root])

    def renderer(self, **options: Any) -> Renderer:
        return Renderer(
            {self.root.id: self.root.public}, self.trust(), TailOptions(**options), now=NOW
        )


def _manifest(seq: int = 1) -> Manifest:
    release = Release(
        name="digits",
        artifact=ArtifactRef(sha256=hashlib.sha256(b"model").hexdigest(), size=5),
        runtime=Runtime(providers=("CPUExecutionProvider",)),
        inputs=(TensorSpec(name="pixels", dtype="float32", shape=(None, 64)),),
        outputs=(TensorSpec(name="label", dtype="int64", shape=(None,)),),
        health=HealthBudget(
            max_error_rate=0.01, p95_latency_ms=10.0, min_inferences=20, soak_seconds=1.0
        ),
    )
    return Manifest(hw_class=CLASS, seq=seq, issued_at=NOW, expires_at=NOW + 3600.0, stable=release)


def _state(device_id: str = "cam-001", updated_at: float = NOW) -> DeviceState:
    return device_state(
        device_id,
        hw_class=CLASS,
        active_release="digits:fp32@0123456789ab",
        inferences_total=42,
        last_inference_at=updated_at,
        updated_at=updated_at,
    )


def _msg(topic: str, payload: bytes, *, retain: bool = True) -> Message:
    return Message(topic=topic, payload=payload, retain=retain, qos=1)


def _line(renderer: Renderer, message: Message, at: float = NOW) -> dict[str, Any]:
    line = renderer.render(message, at)
    assert line is not None
    assert line.isascii()
    parsed: dict[str, Any] = json.loads(line)
    return parsed


def test_a_device_state_reads_as_json_with_its_topic_and_channel() -> None:
    keys = Keys()
    state = _state()
    topic = topics.device("cam-001", DeviceChannel.STATE)
    line = _line(keys.renderer(), _msg(topic, encode(state)), at=NOW + 1.5)
    assert line["topic"] == topic
    assert line["retained"] is True
    assert line["received_at"] == NOW + 1.5
    assert line["channel"] == "deviceState"
    assert line["message"] == state.model_dump(mode="json")


def test_a_manifest_signed_by_the_manifest_key_verifies_and_names_its_signer() -> None:
    keys = Keys()
    manifest = _manifest()
    payload = seal(MANIFEST_KIND, encode(manifest), [keys.manifest])
    line = _line(keys.renderer(), _msg(topics.class_manifest(CLASS), payload))
    assert line["signed"] == {
        "kind": MANIFEST_KIND,
        "signers": [{"key": keys.manifest.id, "roles": ["manifest"]}],
        "verified": True,
    }
    assert line["message"]["seq"] == 1
    assert line["message"]["stable"]["name"] == "digits"


def test_a_manifest_forged_by_an_unlisted_key_shows_unverified_with_the_reason() -> None:
    keys = Keys()
    forger = KeyPair.generate()
    payload = seal(MANIFEST_KIND, encode(_manifest(seq=99)), [forger])
    line = _line(keys.renderer(), _msg(topics.class_manifest(CLASS), payload))
    signed = line["signed"]
    assert signed["verified"] is False
    assert signed["error"]["reason"] == "unknown_key"
    assert signed["signers"] == [{"key": forger.id, "roles": []}]
    assert line["message"]["seq"] == 99  # what the forgery says, for the reader to see


def test_a_manifest_signed_by_the_operator_key_does_not_verify() -> None:
    keys = Keys()
    payload = seal(MANIFEST_KIND, encode(_manifest()), [keys.operator])
    line = _line(keys.renderer(), _msg(topics.class_manifest(CLASS), payload))
    assert line["signed"]["signers"] == [{"key": keys.operator.id, "roles": ["operator"]}]
    assert line["signed"]["verified"] is False


def test_a_rotated_trust_on_the_wire_is_taken_and_verifies_the_new_manifest_key() -> None:
    keys = Keys()
    renderer = keys.renderer()
    rotated = KeyPair.generate()
    manifest = seal(MANIFEST_KIND, encode(_manifest()), [rotated])
    before = _line(renderer, _msg(topics.class_manifest(CLASS), manifest))
    assert before["signed"]["verified"] is False

    trust = _line(renderer, _msg(topics.trust(), keys.trust(version=2, manifest=rotated)))
    assert trust["signed"]["verified"] is True
    assert trust["message"]["version"] == 2
    after = _line(renderer, _msg(topics.class_manifest(CLASS), manifest))
    assert after["signed"] == {
        "kind": MANIFEST_KIND,
        "signers": [{"key": rotated.id, "roles": ["manifest"]}],
        "verified": True,
    }


def test_a_trust_document_not_signed_by_the_root_does_not_verify() -> None:
    keys = Keys()
    other = Keys()
    line = _line(keys.renderer(), _msg(topics.trust(), other.trust(version=5)))
    assert line["signed"]["verified"] is False
    assert line["signed"]["error"]["reason"] == "unknown_key"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xc1 not msgpack", "malformed"),
        (msgpack.packb([1, 2, 3]), "malformed"),
        (msgpack.packb({"v": 7}), "unsupported_version"),
        (msgpack.packb({"v": 1, "device_id": "cam-001"}), "schema"),
        (b"\x00" * (300 * 1024), "oversized"),
    ],
)
def test_a_payload_that_does_not_decode_gives_an_error_line(payload: bytes, reason: str) -> None:
    keys = Keys()
    renderer = keys.renderer()
    topic = topics.device("cam-001", DeviceChannel.HEALTH)
    line = _line(renderer, _msg(topic, payload))
    assert line["error"]["reason"] == reason
    assert len(line["error"]["detail"]) <= 500
    assert "message" not in line
    # and the next message reads as ever
    good = _line(renderer, _msg(topics.device("cam-001", DeviceChannel.STATE), encode(_state())))
    assert good["message"]["device_id"] == "cam-001"


def test_a_topic_outside_the_tree_gives_an_error_line_quoting_it_bounded() -> None:
    keys = Keys()
    topic = "fleet/v1/devices/" + "x" * 5000 + "/state"
    line = _line(keys.renderer(), _msg(topic, encode(_state())))
    assert line["error"]["reason"] == "malformed"
    assert len(line["topic"]) <= 300


def test_presence_reads_as_its_word_and_anything_else_is_an_error() -> None:
    keys = Keys()
    renderer = keys.renderer()
    topic = topics.device("cam-001", DeviceChannel.PRESENCE)
    assert _line(renderer, _msg(topic, b"online"))["message"] == "online"
    assert _line(renderer, _msg(topics.coordinator_presence(), b"offline"))["message"] == "offline"
    assert _line(renderer, _msg(topic, b"\x1b[2Jgone"))["error"]["reason"] == "malformed"


def test_a_cleared_retained_topic_says_so() -> None:
    keys = Keys()
    line = _line(keys.renderer(), _msg(topics.device("cam-001", DeviceChannel.STATE), b""))
    assert line["cleared"] is True
    assert "message" not in line


def test_an_artifact_chunk_shows_its_size_and_digest_not_its_bytes() -> None:
    keys = Keys()
    chunk = bytes(range(256)) * 8
    line = _line(keys.renderer(), _msg(topics.artifact_chunk("c" * 64, 3), chunk))
    assert line["channel"] == "artifactChunk"
    assert line["message"] == {"bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()}


def test_since_skips_messages_whose_own_time_is_older_retained_or_not() -> None:
    keys = Keys()
    renderer = keys.renderer(since_s=600.0)
    topic = topics.device("cam-001", DeviceChannel.STATE)
    old = _msg(topic, encode(_state(updated_at=NOW - 3600.0)), retain=True)
    fresh = _msg(topic, encode(_state(updated_at=NOW - 60.0)), retain=True)
    assert renderer.render(old, NOW) is None
    assert _line(renderer, fresh)["message"]["updated_at"] == NOW - 60.0
    live_old = _msg(topic, encode(_state(updated_at=NOW - 3600.0)), retain=False)
    assert renderer.render(live_old, NOW) is None
    # Presence carries no time of its own: always shown; so is a payload that does not decode.
    presence = _msg(topics.device("cam-001", DeviceChannel.PRESENCE), b"online")
    assert _line(renderer, presence)["message"] == "online"
    assert _line(renderer, _msg(topic, b"junk"))["error"]["reason"] == "malformed"
    # A time JSON cannot hold is shown as text, and never judged old.
    odd = _line(renderer, _msg(topic, encode(_state(updated_at=float("nan")))))
    assert odd["message"]["updated_at"] == "nan"


@pytest.mark.parametrize(("fmt", "decode"), [("base64", base64.b64decode), ("hex", bytes.fromhex)])
def test_raw_shows_the_payload_bytes_decodable_or_not(fmt: str, decode: Any) -> None:
    keys = Keys()
    renderer = keys.renderer(raw=fmt)
    for payload in (encode(_state()), b"\xc1 junk"):
        line = _line(renderer, _msg(topics.device("cam-001", DeviceChannel.STATE), payload))
        assert line["encoding"] == fmt
        assert line["bytes"] == len(payload)
        assert decode(line["payload"]) == payload
        assert "message" not in line
        assert "error" not in line


def test_raw_with_since_still_skips_old_messages() -> None:
    keys = Keys()
    renderer = keys.renderer(raw="hex", since_s=60.0)
    topic = topics.device("cam-001", DeviceChannel.STATE)
    assert renderer.render(_msg(topic, encode(_state(updated_at=NOW - 600))), NOW) is None


def test_a_long_message_is_cut_to_the_line_bound_and_says_how_long_it_was() -> None:
    keys = Keys()
    renderer = keys.renderer(max_line=2048)
    summary = TelemetrySummary(
        summary_id="s-1",
        device_id="cam-001",
        release=None,
        window_start=NOW - 60,
        window_end=NOW,
        count=256,
        errors=0,
        latency_ms=LogHistogram.of([1.0]),
        confidence=(0,) * 9 + (256,),
        labels={f"{i:03d}\x1b" + "é" * 59: 1 for i in range(256)},
    )
    raw = renderer.render(
        _msg(topics.device("cam-001", DeviceChannel.TELEMETRY), encode(summary)), NOW
    )
    assert raw is not None
    assert len(raw) <= 2048
    assert raw.isascii()
    line = json.loads(raw)
    assert line["message"] is None
    assert line["truncated"]["chars"] > 2048
    assert line["truncated"]["shown"].startswith('{"message": {')
    assert "\x1b" not in raw


def test_options_and_durations_refuse_nonsense() -> None:
    assert parse_duration("90") == 90.0
    assert parse_duration("90s") == 90.0
    assert parse_duration("15m") == 900.0
    assert parse_duration("2h") == 7200.0
    assert parse_duration("1.5d") == 129_600.0
    for bad in ("", "-5m", "5w", "m", "1e9", "5 m s"):
        with pytest.raises(ValueError, match="invalid duration"):
            parse_duration(bad)
    with pytest.raises(ValueError, match="max_line"):
        TailOptions(max_line=10)
    with pytest.raises(ValueError, match="since_s"):
        TailOptions(since_s=-1.0)
