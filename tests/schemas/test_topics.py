"""Topic build and parse: every topic round-trips, no name can escape its level."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest

from schemas import MalformedPayloadError, Reason
from schemas import topics as t
from schemas.topics import DeviceChannel, ParsedTopic, TopicKind

SHA = hashlib.sha256(b"model").hexdigest()

HOSTILE_NAMES = [
    pytest.param("a/b", id="slash"),
    pytest.param("+", id="plus"),
    pytest.param("#", id="hash"),
    pytest.param("dev+1", id="embedded-plus"),
    pytest.param("dev#", id="embedded-hash"),
    pytest.param("", id="empty"),
    pytest.param("a" * 65, id="65-chars"),
    pytest.param("dévice", id="non-ascii"),
    pytest.param("dev\u0661", id="arabic-digit"),
    pytest.param("\uff44\uff45\uff56", id="fullwidth"),
    pytest.param("dev\x00", id="nul"),
    pytest.param("dev\n", id="trailing-newline"),
    pytest.param(" dev", id="leading-space"),
    pytest.param("-dev", id="leading-dash"),
    pytest.param(".hidden", id="leading-dot"),
    pytest.param("..", id="dotdot"),
    pytest.param("$SYS", id="dollar"),
]

NAMED_BUILDERS: list[tuple[str, Callable[[str], str], Callable[[str], str]]] = [
    ("class", t.class_manifest, lambda n: f"fleet/v1/classes/{n}/manifest"),
    ("class-telemetry", t.class_telemetry, lambda n: f"fleet/v1/classes/{n}/telemetry"),
    ("rollout-spec", t.rollout_spec, lambda n: f"fleet/v1/rollouts/{n}/spec"),
    ("rollout-status", t.rollout_status, lambda n: f"fleet/v1/rollouts/{n}/status"),
    (
        "device-state",
        lambda n: t.device(n, DeviceChannel.STATE),
        lambda n: f"fleet/v1/devices/{n}/state",
    ),
]


def _parse_rejected(topic: str) -> None:
    with pytest.raises(MalformedPayloadError) as info:
        t.parse(topic)
    assert info.value.reason is Reason.MALFORMED


@pytest.mark.parametrize(
    ("topic", "parsed"),
    [
        (t.trust(), ParsedTopic(kind=TopicKind.TRUST)),
        (
            t.class_manifest("jetson-vision-standard"),
            ParsedTopic(kind=TopicKind.CLASS_MANIFEST, name="jetson-vision-standard"),
        ),
        (
            t.class_telemetry("jetson-vision-standard"),
            ParsedTopic(kind=TopicKind.CLASS_TELEMETRY, name="jetson-vision-standard"),
        ),
        (t.artifact_meta(SHA), ParsedTopic(kind=TopicKind.ARTIFACT_META, name=SHA)),
        (
            t.artifact_chunk(SHA, 0),
            ParsedTopic(kind=TopicKind.ARTIFACT_CHUNK, name=SHA, index=0),
        ),
        (
            t.artifact_chunk(SHA, 4095),
            ParsedTopic(kind=TopicKind.ARTIFACT_CHUNK, name=SHA, index=4095),
        ),
        (t.staging_meta(SHA), ParsedTopic(kind=TopicKind.STAGING_META, name=SHA)),
        (
            t.staging_chunk(SHA, 7),
            ParsedTopic(kind=TopicKind.STAGING_CHUNK, name=SHA, index=7),
        ),
        (t.rollout_spec("r-1.2_x"), ParsedTopic(kind=TopicKind.ROLLOUT_SPEC, name="r-1.2_x")),
        (t.rollout_status("r1"), ParsedTopic(kind=TopicKind.ROLLOUT_STATUS, name="r1")),
        (t.coordinator_presence(), ParsedTopic(kind=TopicKind.COORDINATOR_PRESENCE)),
        (t.coordinator_fence(), ParsedTopic(kind=TopicKind.COORDINATOR_FENCE)),
        *[
            (
                t.device("dev-0001", channel),
                ParsedTopic(kind=TopicKind.DEVICE, name="dev-0001", channel=channel),
            )
            for channel in DeviceChannel
        ],
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_every_topic_round_trips_through_parse(topic: str, parsed: ParsedTopic) -> None:
    assert topic.startswith(t.PREFIX + "/")
    assert t.parse(topic) == parsed


def test_names_at_the_length_limit_are_accepted() -> None:
    longest = "a" * 64
    assert t.parse(t.device(longest, DeviceChannel.HEALTH)).name == longest
    assert t.check_name("A.b_c-9") == "A.b_c-9"


@pytest.mark.parametrize("name", HOSTILE_NAMES)
@pytest.mark.parametrize(
    ("builder", "shape"),
    [(b, s) for _, b, s in NAMED_BUILDERS],
    ids=[n for n, _, _ in NAMED_BUILDERS],
)
def test_hostile_name_is_refused_by_builder_and_parser(
    name: str, builder: Callable[[str], str], shape: Callable[[str], str]
) -> None:
    with pytest.raises(ValueError, match="invalid"):
        builder(name)
    # The same topic assembled by hand, as a hostile publisher would, does not parse.
    _parse_rejected(shape(name))


@pytest.mark.parametrize("channel", list(DeviceChannel))
@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_device_id_is_refused_on_every_channel(name: str, channel: DeviceChannel) -> None:
    with pytest.raises(ValueError, match="invalid"):
        t.device(name, channel)


@pytest.mark.parametrize(
    "sha",
    [
        pytest.param(SHA.upper(), id="uppercase"),
        pytest.param(SHA[:-1], id="63-hex"),
        pytest.param(SHA + "0", id="65-hex"),
        pytest.param("g" * 64, id="non-hex"),
        pytest.param("+", id="plus"),
        pytest.param("#", id="hash"),
        pytest.param(f"{SHA[:32]}/{SHA[33:]}", id="slash"),
        pytest.param("", id="empty"),
    ],
)
def test_artifact_topics_refuse_anything_but_a_lowercase_sha256(sha: str) -> None:
    for build in (
        t.artifact_meta,
        t.artifact_chunks,
        lambda s: t.artifact_chunk(s, 0),
        t.staging_meta,
        t.staging_chunks,
        lambda s: t.staging_chunk(s, 0),
    ):
        with pytest.raises(ValueError, match="sha256"):
            build(sha)
    for area in ("artifacts", "staging"):
        _parse_rejected(f"fleet/v1/{area}/{sha}/meta")
        _parse_rejected(f"fleet/v1/{area}/{sha}/0")


def test_negative_chunk_index_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        t.artifact_chunk(SHA, -1)
    with pytest.raises(ValueError, match="negative"):
        t.staging_chunk(SHA, -1)
    _parse_rejected(f"fleet/v1/artifacts/{SHA}/-1")
    _parse_rejected(f"fleet/v1/staging/{SHA}/-1")


@pytest.mark.parametrize(
    "index",
    [
        pytest.param("+", id="plus"),
        pytest.param("#", id="hash"),
        pytest.param("", id="empty"),
        pytest.param("1e3", id="exponent"),
        pytest.param("1_000", id="underscore"),
        pytest.param(" 1", id="space"),
        pytest.param("1234567890", id="ten-digits"),
        pytest.param("\u00b2", id="superscript-two"),
        pytest.param("\u0661", id="arabic-indic-one"),
        pytest.param("\uff11", id="fullwidth-one"),
        pytest.param("007", id="leading-zeros"),
    ],
)
def test_non_canonical_chunk_index_is_refused_by_parse(index: str) -> None:
    # Builders only ever write ASCII decimal without leading zeros; anything else would
    # be a second name for the same retained chunk.
    _parse_rejected(f"fleet/v1/artifacts/{SHA}/{index}")


@pytest.mark.parametrize(
    "topic",
    [
        pytest.param("", id="empty"),
        pytest.param("fleet/v1", id="prefix-only"),
        pytest.param("fleet/v1/", id="prefix-slash"),
        pytest.param("fleet/v2/trust", id="other-version"),
        pytest.param("other/v1/trust", id="other-prefix"),
        pytest.param("/fleet/v1/trust", id="leading-slash"),
        pytest.param("fleet/v1/trust/", id="trailing-slash"),
        pytest.param("fleet/v1//trust", id="empty-level"),
        pytest.param("fleet/v1/trust/extra", id="extra-level"),
        pytest.param("fleet/v1/TRUST", id="case"),
        pytest.param("fleet/v1/classes/jetson/manifest/x", id="manifest-extra-level"),
        pytest.param("fleet/v1/classes/jetson", id="manifest-short"),
        pytest.param("fleet/v1/classes/jetson/spec", id="wrong-leaf"),
        pytest.param("fleet/v1/rollouts/r1/manifest", id="rollout-wrong-leaf"),
        pytest.param("fleet/v1/devices/dev-1/secrets", id="unknown-channel"),
        pytest.param("fleet/v1/devices/dev-1/STATE", id="channel-case"),
        pytest.param("fleet/v1/devices/dev-1", id="device-no-channel"),
        pytest.param("fleet/v1/coordinator/state", id="coordinator-wrong-leaf"),
        pytest.param("fleet/v1/artifacts/+/meta", id="artifact-wildcard"),
        pytest.param("fleet/v1/#", id="multi-level-wildcard"),
        pytest.param("$SYS/broker/uptime", id="sys"),
    ],
)
def test_unknown_topic_is_rejected_malformed(topic: str) -> None:
    _parse_rejected(topic)


def test_subscription_filters_cover_the_topics_they_are_for() -> None:
    assert t.all_devices(DeviceChannel.TELEMETRY) == "fleet/v1/devices/+/telemetry"
    assert t.all_class_manifests() == "fleet/v1/classes/+/manifest"
    assert t.all_class_telemetry() == "fleet/v1/classes/+/telemetry"
    assert t.all_rollout_specs() == "fleet/v1/rollouts/+/spec"
    assert t.all_rollout_statuses() == "fleet/v1/rollouts/+/status"
    assert t.all_artifacts() == "fleet/v1/artifacts/#"
    assert t.artifact_chunks(SHA) == f"fleet/v1/artifacts/{SHA}/+"
    assert t.all_staging() == "fleet/v1/staging/#"
    assert t.staging_chunks(SHA) == f"fleet/v1/staging/{SHA}/+"


def test_a_filter_given_by_hand_is_taken_under_the_prefix_unless_it_is_there() -> None:
    assert t.scoped("devices/+/telemetry") == "fleet/v1/devices/+/telemetry"
    assert t.scoped("#") == "fleet/v1/#"
    assert t.scoped("fleet/v1/rollouts/#") == "fleet/v1/rollouts/#"
    assert t.scoped("fleet/v1") == "fleet/v1"


@pytest.mark.parametrize(
    "bad", ["", "devices/#/state", "devices/cam+/state", "dev#", "a\0b", "x" * 600]
)
def test_a_malformed_filter_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid topic filter"):
        t.scoped(bad)
