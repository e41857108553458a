"""A changed state waits its settle, and up to as long again at random: a fleet that
takes one manifest spreads its answers."""

from __future__ import annotations

import pytest

from agent.link import settle_delay


@pytest.mark.parametrize(("draw", "expected"), [(0.0, 1.0), (0.5, 1.5), (0.999, 1.999)])
def test_a_settle_is_its_base_to_twice_that(draw: float, expected: float) -> None:
    assert settle_delay(1.0, lambda: draw) == pytest.approx(expected)


def test_settles_of_a_fleet_spread_over_the_whole_second() -> None:
    delays = [settle_delay(1.0) for _ in range(2000)]
    assert 1.0 <= min(delays) < 1.05
    assert 1.95 < max(delays) < 2.0
