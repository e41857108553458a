"""Telemetry accounting, pure: whether a summary is counted, and what a device's count
becomes.

Theory of operation. A device numbers its summaries in a stream (its outbox): ``seq ..
last_seq`` per summary, consecutive, and ``base``, the lowest number it still held when
it sent it (``schemas.telemetry``). The coordinator keeps, per device, a :class:`Mark`:
the stream it follows, the high-water mark ``seq`` (every number up to it counted) and the
totals. A summary is counted only when it starts right after the mark, so the mark never
passes a number that was not counted; the mark is what the coordinator acknowledges, once
stored. In order, one rule per case (:func:`judge`):

1. another stream: one the device left (``retired``) is ``STALE``; a new one (a new outbox:
   a reinstalled device, a wiped data folder) is followed from 0, the old one retired;
2. ``base - 1`` above the mark: the device holds nothing below ``base`` any more (it was
   acknowledged to a store since lost, or lost on the device), so the mark moves up to
   ``base - 1`` and the jump is ``skipped``: those numbers will never come;
3. ``last_seq`` at or below the mark: a ``DUPLICATE`` (QoS 1 redelivery, a resend);
4. ``seq`` at or below the mark (and ``last_seq`` above it): an ``OVERLAP`` no agent sends
   (it merges only numbers it never sent): dropped;
5. ``seq`` above ``mark + 1``: ``EARLY``, an earlier number is missing (lost in transit, or
   still on its way): dropped; the device sends both again, in order;
6. otherwise ``COUNTED``: the mark moves to ``last_seq`` and the totals add the summary.

Every case but ``COUNTED`` asks for the ack to be sent again (the device may have missed
it). Summaries without a stream (agents before end-to-end delivery) are counted by
:func:`count_unnumbered`; their de-duplication by id is the ledger's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Final

from schemas import TelemetrySummary

__all__ = ["RETIRED_KEPT", "Judgement", "Mark", "Verdict", "count_unnumbered", "judge"]

RETIRED_KEPT: Final = 4
"""Streams a device left that are remembered, so their late summaries count nothing."""


class Verdict(StrEnum):
    COUNTED = "counted"
    DUPLICATE = "duplicate"
    OVERLAP = "overlap"
    EARLY = "early"
    STALE = "stale"


@dataclass(frozen=True, slots=True)
class Mark:
    """What one device's telemetry has been counted."""

    stream: str | None = None
    """The stream followed (None: only unnumbered summaries so far)."""
    seq: int = 0
    """Every number of ``stream`` up to this one is counted."""
    inferences: int = 0
    errors: int = 0
    windows: int = 0
    retired: tuple[str, ...] = ()
    """Streams the device left, newest last (at most ``RETIRED_KEPT``)."""


@dataclass(frozen=True, slots=True)
class Judgement:
    verdict: Verdict
    mark: Mark
    """The device's mark after the summary (changed also by a new stream or a jump)."""
    skipped: int = 0
    """Numbers passed over for ``base`` (rule 2)."""


def judge(mark: Mark, summary: TelemetrySummary) -> Judgement:
    """What a numbered summary does to a device's mark.

    Raises:
        ValueError: ``summary`` is not numbered (see :func:`count_unnumbered`).
    """
    stream, first, last, base = summary.stream, summary.seq, summary.last_seq, summary.base
    if stream is None or first is None or last is None or base is None:
        msg = "judge takes numbered summaries"
        raise ValueError(msg)
    if stream != mark.stream:
        if stream in mark.retired:
            return Judgement(Verdict.STALE, mark)
        left = mark.retired if mark.stream is None else (*mark.retired, mark.stream)
        mark = replace(mark, stream=stream, seq=0, retired=left[-RETIRED_KEPT:])
    skipped = max(0, base - 1 - mark.seq)
    if skipped:
        mark = replace(mark, seq=base - 1)
    verdict = Verdict.COUNTED
    if last <= mark.seq:
        verdict = Verdict.DUPLICATE
    elif first <= mark.seq:
        verdict = Verdict.OVERLAP
    elif first > mark.seq + 1:
        verdict = Verdict.EARLY
    else:
        mark = replace(
            mark,
            seq=last,
            inferences=mark.inferences + summary.count,
            errors=mark.errors + summary.errors,
            windows=mark.windows + summary.windows,
        )
    return Judgement(verdict, mark, skipped)


def count_unnumbered(mark: Mark, summary: TelemetrySummary) -> Mark:
    """A summary without a stream, once its id was found new, added to the totals."""
    return replace(
        mark,
        inferences=mark.inferences + summary.count,
        errors=mark.errors + summary.errors,
        windows=mark.windows + summary.windows,
    )
