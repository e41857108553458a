"""The channel table: every topic the tree parses has exactly one channel, and each
channel's builder, parameters and template agree with ``schemas.topics``."""

from __future__ import annotations

import re

import pytest

from schemas import topics
from schemas.catalog import CHANNELS, Body, Channel, channel_of
from schemas.topics import DeviceChannel, TopicKind


def test_every_kind_of_topic_has_one_channel() -> None:
    keys = [(c.kind, c.device_channel) for c in CHANNELS]
    assert len(set(keys)) == len(keys)
    expected: set[tuple[TopicKind, DeviceChannel | None]]
    expected = {(k, None) for k in TopicKind if k is not TopicKind.DEVICE}
    expected |= {(TopicKind.DEVICE, c) for c in DeviceChannel}
    assert set(keys) == expected
    assert len({c.key for c in CHANNELS}) == len(CHANNELS)


@pytest.mark.parametrize("channel", CHANNELS, ids=lambda c: c.key)
def test_a_channel_address_parses_back_to_it(channel: Channel) -> None:
    for values in (None, tuple(p.other for p in channel.params)):
        address = channel.address(values)
        assert channel_of(topics.parse(address)) is channel
    template = channel.template()
    assert template.startswith(topics.PREFIX + "/")
    assert re.findall(r"\{(\w+)\}", template) == [p.name for p in channel.params]


@pytest.mark.parametrize("channel", CHANNELS, ids=lambda c: c.key)
def test_a_channel_names_its_message_and_time_as_its_body_needs(channel: Channel) -> None:
    decoded = channel.body in (Body.MSGPACK, Body.SIGNED)
    assert (channel.model is not None) == decoded
    assert (channel.signed_kind is not None) == (channel.body is Body.SIGNED)
    if channel.stamp is not None:
        assert channel.model is not None
        assert channel.stamp in channel.model.model_fields
