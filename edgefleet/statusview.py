"""How a rollout's status reads to people: one summary line, and a row per class (its
phase, wave and reach, counts, silent devices, shadow-soak agreement, what it waits for,
why it is where it is).

``rollout status`` prints both; ``rollout status --watch`` prints, when piped, one line
per change (:class:`PlainWatch`), and on a terminal a live table (:func:`rich_table`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from rich.table import Table
from rich.text import Text

from models.report import text_table
from schemas import LaneStatus, RolloutStatus, WaveCounts
from schemas.errors import bound_text

__all__ = [
    "LANE_HEADER",
    "PlainWatch",
    "agreement_text",
    "lane_cells",
    "lane_line",
    "rich_table",
    "status_line",
    "status_text",
]

LANE_HEADER: Final = (
    "class",
    "phase",
    "wave",
    "healthy",
    "unhealthy",
    "silent",
    "pending",
    "agreement",
    "waiting / reason",
)
REASON_SHOWN: Final = 160
"""Characters of a class's reason or waiting text a row shows (the JSON has it whole)."""
SILENT_SHOWN: Final = 10
"""Silent device ids a row names (the status names up to 50; the count says how many)."""


def _wave_count(status: RolloutStatus) -> int:
    return len(status.waves) or len(status.waves_percent)


def _reach(status: RolloutStatus, wave: int) -> str:
    if wave < len(status.waves):
        return str(status.waves[wave])
    if wave < len(status.waves_percent):
        return f"{status.waves_percent[wave]:g}%"
    return ""


def agreement_text(counts: WaveCounts) -> str | None:
    """A wave's shadow-soak agreement, and how many answers it rests on; None without."""
    agreement = counts.agreement
    if agreement is None:
        return None
    return f"{agreement:.3f} of {counts.shadow_inferences}"


def status_line(status: RolloutStatus) -> str:
    """The rollout as one line: phase, wave, release and the classes' counts summed."""
    c = status.counts
    total = _wave_count(status)
    wave = f"{min(status.wave + 1, total)}/{total}"
    release = str(status.release)
    if len(set(status.releases.values())) > 1:  # a variant per class
        release = ", ".join(f"{name}={r}" for name, r in sorted(status.releases.items()))
    line = (
        f"{status.id} gen {status.generation} {status.phase.value} wave {wave} "
        f"release {release} members {c.members} targeted {c.targeted} "
        f"updated {c.updated} healthy {c.healthy} unhealthy {c.unhealthy} "
        f"silent {c.silent} pending {c.pending}"
    )
    agreement = agreement_text(c)
    if agreement is not None:
        line += f" agreement {agreement}"
    if status.reason:
        line += f" — {status.reason}"
    return line + (f" [{status.cause.value}]" if status.cause is not None else "")


def lane_cells(status: RolloutStatus, name: str, lane: LaneStatus) -> tuple[str, ...]:
    """One class's row under :data:`LANE_HEADER`."""
    total = _wave_count(status)
    reach = _reach(status, lane.wave)
    wave = f"{min(lane.wave + 1, total)}/{total}" + (f" ({reach})" if reach else "")
    c = lane.counts
    silent = str(c.silent)
    if lane.silent:
        more = f" +{c.silent - SILENT_SHOWN}" if c.silent > SILENT_SHOWN else ""
        silent += f": {' '.join(lane.silent[:SILENT_SHOWN])}{more}"
    notes = [f"waiting: {lane.waiting}"] if lane.waiting else []
    if lane.reason:
        cause = f" [{lane.cause.value}]" if lane.cause is not None else ""
        notes.append(lane.reason + cause)
    return (
        name,
        lane.phase.value,
        wave,
        f"{c.healthy}/{c.targeted}",
        str(c.unhealthy),
        silent,
        str(c.pending),
        agreement_text(c) or "-",
        bound_text(" — ".join(notes), REASON_SHOWN) or "-",
    )


def lane_line(status: RolloutStatus, name: str, lane: LaneStatus) -> str:
    """One class as one line (the watch's plain output)."""
    cells = dict(zip(LANE_HEADER, lane_cells(status, name, lane), strict=True))
    line = (
        f"{status.id} {name}: {cells['phase']}, wave {cells['wave']}, healthy "
        f"{cells['healthy']}, unhealthy {cells['unhealthy']}, silent {cells['silent']}, "
        f"pending {cells['pending']}"
    )
    if cells["agreement"] != "-":
        line += f", agreement {cells['agreement']}"
    note = cells["waiting / reason"]
    return line if note == "-" else f"{line} — {note}"


def _lanes(status: RolloutStatus) -> Iterator[tuple[str, LaneStatus]]:
    for name in status.classes:
        lane = status.lanes.get(name)
        if lane is not None:
            yield name, lane


def status_text(status: RolloutStatus) -> str:
    """The summary line, then a table of the classes (when the status has them)."""
    rows = [lane_cells(status, name, lane) for name, lane in _lanes(status)]
    if not rows:
        return status_line(status)
    table = "\n".join("  " + line for line in text_table(LANE_HEADER, rows).splitlines())
    return f"{status_line(status)}\n{table}"


class PlainWatch:
    """The watch for a pipe: each status as the lines that changed since the last one
    (the summary, and one per class), so a log reads as a history."""

    def __init__(self) -> None:
        self._shown: dict[str, str] = {}

    def lines(self, status: RolloutStatus) -> list[str]:
        """The classes' lines that changed, then the summary if it did: the last line
        printed is always the rollout's own, so a log's tail says where it stands."""
        current = {name: lane_line(status, name, lane) for name, lane in _lanes(status)}
        current[""] = status_line(status)
        changed = [line for key, line in current.items() if self._shown.get(key) != line]
        self._shown = current
        return changed


def rich_table(status: RolloutStatus) -> Table:
    """The watch for a terminal: the summary as the title, a row per class."""
    title = f"{status.id} gen {status.generation}: {status.phase.value}"
    total = _wave_count(status)
    title += f", wave {min(status.wave + 1, total)}/{total}"
    # Text, not markup: ids and reasons come from devices and must not be read as styles.
    caption = None if status.reason is None else Text(status.reason)
    table = Table(title=Text(title), caption=caption, title_justify="left")
    for i, column in enumerate(LANE_HEADER):
        # Class names whole; the waiting text and the reason wrap instead.
        table.add_column(
            column,
            justify="left" if i in (0, 1, 2, len(LANE_HEADER) - 1) else "right",
            no_wrap=i == 0,
            overflow="fold",
        )
    rows = [lane_cells(status, name, lane) for name, lane in _lanes(status)]
    c = status.counts
    summed = ("all", status.phase.value, "", f"{c.healthy}/{c.targeted}", str(c.unhealthy))
    rows.append((*summed, str(c.silent), str(c.pending), agreement_text(c) or "-", ""))
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    return table
