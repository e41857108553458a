"""The simulated devices' configuration: periods and shares are checked where it is made."""

from __future__ import annotations

from typing import Any

import pytest

from agent.link import STATE_SETTLE_S
from edgefleet.simconfig import SimConfig


def test_simulated_devices_settle_their_state_as_long_as_an_agent() -> None:
    assert SimConfig().state_settle_s == STATE_SETTLE_S


@pytest.mark.parametrize(
    "bad",
    [
        {"state_settle_s": -0.1},
        {"state_interval_s": -1.0},
        {"telemetry_s": -1.0},
        {"soak_s": -1.0},
    ],
)
def test_a_negative_period_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        SimConfig(**bad)
