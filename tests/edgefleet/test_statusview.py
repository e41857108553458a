"""How a rollout's status reads: the per-class rows, and the watch's plain lines (one per
change), from statuses built by hand."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from edgefleet.statusview import PlainWatch, rich_table, status_line, status_text
from schemas import (
    Cause,
    LanePhase,
    LaneStatus,
    Phase,
    RolloutStatus,
    WaveCounts,
    WaveSpec,
)

CAM = "jetson-vision-standard"
GW = "intel-lowpower-detector"


def _status(lanes: dict[str, LaneStatus], **changes: Any) -> RolloutStatus:
    fields: dict[str, Any] = {
        "id": "r1",
        "generation": 1,
        "phase": Phase.WAVE,
        "wave": 1,
        "waves_percent": (),
        "waves": (WaveSpec(count=5), WaveSpec(percent=50), WaveSpec(percent=100)),
        "counts": sum((lane.counts for lane in lanes.values()), WaveCounts()),
        "classes": (CAM, GW),
        "release": "digits:fp32@abc",
        "lanes": lanes,
        "updated_at": 0.0,
    } | changes
    return RolloutStatus.model_validate(fields)


def _lane(wave: int = 1, **changes: Any) -> LaneStatus:
    fields: dict[str, Any] = {
        "phase": LanePhase.WAVE,
        "wave": wave,
        "cutoff_bp": 5000,
        "counts": WaveCounts(members=10, targeted=8, healthy=5, unhealthy=1, silent=0, pending=2),
    } | changes
    return LaneStatus.model_validate(fields)


def test_each_class_reads_phase_wave_reach_counts_and_why() -> None:
    silent = _lane(
        counts=WaveCounts(members=10, targeted=8, healthy=4, silent=2, pending=2),
        silent=("cam-007", "cam-009"),
        reason="wave 2: 2 of 8 devices silent",
        cause=Cause.SILENT,
    )
    paced = _lane(wave=0, waiting="paced: 5 of 20 devices targeted")
    status = _status({CAM: silent, GW: paced})
    lines = PlainWatch().lines(status)
    assert lines[2] == status_line(status)
    assert lines[0] == (
        f"r1 {CAM}: wave, wave 2/3 (50%), healthy 4/8, unhealthy 0, silent 2: cam-007 "
        "cam-009, pending 2 — wave 2: 2 of 8 devices silent [silent]"
    )
    assert lines[1] == (
        f"r1 {GW}: wave, wave 1/3 (5 devices), healthy 5/8, unhealthy 1, silent 0, "
        "pending 2 — waiting: paced: 5 of 20 devices targeted"
    )
    assert "members 20 targeted 16 updated 0 healthy 9 unhealthy 1 silent 2 pending 4" in lines[2]

    header, *rows = status_text(status).splitlines()[1:]
    assert header.split()[:4] == ["class", "phase", "wave", "healthy"]
    assert [row.split()[0] for row in rows] == [CAM, GW]


def test_the_plain_watch_prints_only_what_changed() -> None:
    watch = PlainWatch()
    first = _status({CAM: _lane(), GW: _lane()})
    assert len(watch.lines(first)) == 3
    assert watch.lines(first) == []  # the same status again (a re-assert): nothing
    moved = _lane(counts=WaveCounts(members=10, targeted=8, healthy=8, pending=2))
    second = _status({CAM: moved, GW: _lane()})
    changed = watch.lines(second)
    assert [line.split()[1] for line in changed] == [f"{CAM}:", "gen"]
    done = _status(
        {CAM: moved.model_copy(update={"phase": LanePhase.COMPLETED, "wave": 3}), GW: _lane()},
        phase=Phase.COMPLETED,
        wave=3,
    )
    lane, summary = watch.lines(done)
    assert lane.startswith(f"r1 {CAM}: completed, wave 3/3, healthy 8/8,")
    assert summary.startswith("r1 gen 1 completed wave 3/3")


def test_a_status_without_classes_reads_as_one_line_as_before() -> None:
    status = _status({}, waves=(), waves_percent=(10.0, 100.0), wave=0)
    assert status_text(status) == status_line(status)
    assert status_line(status).startswith("r1 gen 1 wave wave 1/2 release digits:fp32@abc")
    assert PlainWatch().lines(status) == [status_line(status)]


def test_the_terminal_table_shows_device_words_as_text_not_markup() -> None:
    hostile = _lane(reason="[bold red]not a style[/] [link=x]", silent=("a[b]",))
    console = Console(width=200, record=True, color_system=None)
    console.print(rich_table(_status({CAM: hostile, GW: _lane()}, reason="[x] why")))
    text = console.export_text()
    assert "[bold red]not a style[/] [link=x]" in text
    assert "a[b]" in text
    assert "[x] why" in text
    assert CAM in text
    assert GW in text


def test_shadow_soak_agreement_shows_where_reports_carry_it() -> None:
    shadowed = _lane(
        counts=WaveCounts(
            members=10, targeted=8, healthy=3, unhealthy=2, shadow_inferences=400, agreed=300
        )
    )
    status = _status({CAM: shadowed, GW: _lane()})
    cam, gw, summary = PlainWatch().lines(status)
    assert cam.endswith("pending 0, agreement 0.750 of 400")
    assert "agreement" not in gw
    assert summary.endswith("pending 2 agreement 0.750 of 400")
    header, cam_row, gw_row = status_text(status).splitlines()[1:]
    assert "agreement" in header
    assert "0.750 of 400" in cam_row
    assert "0.750" not in gw_row
    console = Console(width=200, record=True, color_system=None)
    console.print(rich_table(status))
    assert "0.750 of 400" in console.export_text()
