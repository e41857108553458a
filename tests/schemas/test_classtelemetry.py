"""The aggregated class telemetry message (``schemas.classtelemetry``): what a reader
may rely on whoever wrote the retained topic. Every bound is checked at decode time."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import msgpack
import pytest

from schemas import ClassTelemetry, MalformedPayloadError, Reason, decode, encode
from schemas.classtelemetry import MAX_LABELS_SHOWN, MAX_RELEASES

_WINDOW: dict[str, Any] = {
    "seconds": 60.0,
    "observed_s": 60.0,
    "inferences": 30,
    "errors": 1,
    "rate_per_s": 0.5,
    "error_rate": 1 / 30,
    "p50_ms": 1.1,
    "p95_ms": 2.2,
    "p99_ms": 3.3,
    "confidence": [0] * 9 + [29],
    "labels": {"cat": 29},
}
_RELEASE: dict[str, Any] = {
    "release": "digits:fp32@0123456789ab",
    "role": "stable",
    "rollout_id": None,
    "first_seen": 1.0,
    "last_seen": 2.0,
    "minute": _WINDOW,
    "hour": _WINDOW,
    "drift": {
        "reference": "rollout",
        "reference_inferences": 1000,
        "reference_confidence": [0] * 9 + [1000],
        "reference_labels": {"cat": 1000},
        "window_s": 60.0,
        "confidence_psi": 0.01,
        "confidence_ks": 0.02,
        "labels_psi": 0.0,
        "psi_threshold": 0.25,
        "alert": False,
        "since": None,
    },
    "health": {
        "budget": {
            "max_error_rate": 0.01,
            "p95_latency_ms": 10.0,
            "min_inferences": 20,
            "soak_seconds": 4.0,
        },
        "window_s": 60.0,
        "breach": True,
        "reasons": ["error_rate:0.033>0.010"],
        "since": 2.0,
    },
}
_MESSAGE: dict[str, Any] = {
    "v": 1,
    "hw_class": "jetson-vision-standard",
    "at": 3.0,
    "releases": [_RELEASE],
    "unattributed": 0,
}


def _packed(change: Callable[[dict[str, Any]], None]) -> bytes:
    message = copy.deepcopy(_MESSAGE)
    change(message)
    packed: bytes = msgpack.packb(message, use_bin_type=True)
    return packed


def test_a_message_round_trips_through_the_codec() -> None:
    message = decode(_packed(_set("at", 3.0)), ClassTelemetry)
    assert decode(encode(message), ClassTelemetry) == message
    assert message.releases[0].health.breach


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Set ``value`` at a dotted ``path`` (list items by index) of the message."""

    def change(message: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        node: Any = message
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[int(leaf) if isinstance(node, list) else leaf] = value

    return change


@pytest.mark.parametrize(
    ("path", "value"),
    [
        pytest.param("releases", [_RELEASE] * (MAX_RELEASES + 1), id="too-many-releases"),
        pytest.param(
            "releases.0.hour.labels",
            {f"l{i}": 1 for i in range(MAX_LABELS_SHOWN + 2)},
            id="too-many-labels",
        ),
        pytest.param("releases.0.hour.labels", {"x" * 65: 1}, id="label-too-long"),
        pytest.param("releases.0.minute.confidence", [0] * 9, id="too-few-bins"),
        pytest.param("releases.0.minute.confidence", [-1] + [0] * 9, id="negative-bin"),
        pytest.param("releases.0.minute.rate_per_s", float("nan"), id="nan-rate"),
        pytest.param("releases.0.minute.p95_ms", float("inf"), id="infinite-quantile"),
        pytest.param("releases.0.drift.labels_psi", -0.5, id="negative-psi"),
        pytest.param("releases.0.health.reasons", ["r"] * 5, id="too-many-reasons"),
        pytest.param("releases.0.release", "r" * 201, id="release-too-long"),
        pytest.param("releases.0.role", "boss", id="unknown-role"),
        pytest.param("unattributed", -1, id="negative-count"),
    ],
)
def test_a_message_out_of_bounds_is_refused(path: str, value: Any) -> None:
    with pytest.raises(MalformedPayloadError) as info:
        decode(_packed(_set(path, value)), ClassTelemetry)
    assert info.value.reason is Reason.SCHEMA
