"""Telemetry accounting (``coordinator.telemetry.judge``), one rule per test: a device's
numbers are counted once and in order, whatever is redelivered, lost in transit,
re-sent, or left behind by a reinstalled device."""

from __future__ import annotations

import pytest

from coordinator.telemetry import RETIRED_KEPT, Mark, Verdict, count_unnumbered, judge
from tests.coordinator.summaries import numbered


def test_numbers_in_order_are_counted_and_move_the_mark() -> None:
    mark = Mark()
    for first, last in ((1, 1), (2, 4), (5, 5)):
        judged = judge(mark, numbered(first, last, base=1))
        assert judged.verdict is Verdict.COUNTED
        mark = judged.mark
    assert mark == Mark(stream="s1", seq=5, inferences=50, errors=5, windows=5)


def test_a_redelivered_or_resent_summary_is_a_duplicate_and_changes_nothing() -> None:
    mark = judge(Mark(), numbered(1, 3)).mark
    for again in (numbered(1, 3), numbered(2, 3, base=1), numbered(3, base=1)):
        judged = judge(mark, again)
        assert judged.verdict is Verdict.DUPLICATE
        assert judged.mark == mark


def test_a_summary_after_a_missing_number_waits_for_it() -> None:
    """The broker lost number 2 (a crash, a full queue): 3 is not counted before it, or
    the mark would pass a number never counted."""
    mark = judge(Mark(), numbered(1)).mark
    early = judge(mark, numbered(3, base=2))
    assert early.verdict is Verdict.EARLY
    assert early.mark == mark
    mark = judge(mark, numbered(2, base=2)).mark  # both sent again, in order
    mark = judge(mark, numbered(3, base=2)).mark
    assert (mark.seq, mark.inferences) == (3, 30)


def test_numbers_the_device_no_longer_holds_are_passed_over_once() -> None:
    """A coordinator that lost its store meets a device whose oldest held number is 41
    (1..40 were acknowledged to the lost store): it counts from 41 on."""
    judged = judge(Mark(), numbered(41, 42, base=41))
    assert judged.verdict is Verdict.COUNTED
    assert judged.skipped == 40
    assert (judged.mark.seq, judged.mark.inferences) == (42, 20)
    assert judge(judged.mark, numbered(43, base=41)).skipped == 0


def test_a_jump_for_base_still_waits_for_a_missing_number_above_it() -> None:
    judged = judge(Mark(stream="s1", seq=3), numbered(9, base=7))
    assert judged.verdict is Verdict.EARLY
    assert judged.skipped == 3  # 4, 5, 6 will never come
    assert judged.mark.seq == 6


def test_an_overlap_is_dropped_not_half_counted() -> None:
    mark = judge(Mark(), numbered(1, 2)).mark
    judged = judge(mark, numbered(2, 3, base=1))
    assert judged.verdict is Verdict.OVERLAP
    assert judged.mark == mark


def test_a_new_stream_is_followed_from_its_start_and_the_old_one_is_stale() -> None:
    """A reinstalled device (a new outbox) numbers from 1 again: not duplicates of the
    old stream's numbers. Late summaries of the old stream count nothing after that."""
    old = judge(judge(Mark(), numbered(1)).mark, numbered(2)).mark
    new = judge(old, numbered(1, stream="s2"))
    assert new.verdict is Verdict.COUNTED
    assert (new.mark.stream, new.mark.seq, new.mark.retired) == ("s2", 1, ("s1",))
    assert new.mark.inferences == 30  # totals of the device go on
    stale = judge(new.mark, numbered(3, base=1))
    assert stale.verdict is Verdict.STALE
    assert stale.mark == new.mark


def test_only_the_latest_streams_are_remembered_as_left() -> None:
    mark = Mark()
    for n in range(RETIRED_KEPT + 3):
        mark = judge(mark, numbered(1, stream=f"s{n}")).mark
    assert len(mark.retired) == RETIRED_KEPT
    assert mark.retired[-1] == f"s{RETIRED_KEPT + 1}"


def test_unnumbered_summaries_add_to_the_totals_and_never_to_the_mark() -> None:
    legacy = numbered(1).model_copy(
        update={"stream": None, "seq": None, "last_seq": None, "base": None}
    )
    mark = count_unnumbered(Mark(stream="s1", seq=4), legacy)
    assert (mark.stream, mark.seq, mark.inferences, mark.errors) == ("s1", 4, 10, 1)
    with pytest.raises(ValueError, match="numbered"):
        judge(mark, legacy)
