"""Why a rollout is where it is: a cause with the numbers behind it, and the text that
the status, the record and the audit log show.

Every reason the coordinator records for a rollout is one :class:`RolloutReason`: the
text of each cause is written once (:data:`_TEXT`), and the cause travels beside the
text, in the record and in the status (``RolloutStatus.cause``), so that a machine never
parses the text. The text is bounded where it is rendered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from schemas import Cause, UsageError, WaveCounts
from schemas.errors import bound_text
from schemas.rollout import MAX_REASON_CHARS

__all__ = ["REFUSALS", "WAVE_VERDICTS", "RolloutReason"]

WAVE_VERDICTS: Final = frozenset(
    {Cause.UNHEALTHY, Cause.SILENT, Cause.PROMOTED, Cause.EMPTY_WAVE, Cause.TIMED_OUT}
)
"""Causes decided on a wave's counts: they carry the wave and its counts."""
REFUSALS: Final = frozenset(
    {
        Cause.SPEC_REFUSED,
        Cause.CLASSES_UNAVAILABLE,
        Cause.ARTIFACT_UNAVAILABLE,
        Cause.INVALID_CANDIDATE,
        Cause.GATE_FAILED,
    }
)
"""Causes of a spec refused or rejected: they carry the problems, in the checks' words."""

_TEXT: Final[dict[Cause, str]] = {
    Cause.OPERATOR_ABORT: "aborted by operator",
    Cause.OPERATOR_PAUSE: "paused by operator",
    Cause.UNHEALTHY: "wave {n}: {c.unhealthy} of {c.reported} reporting devices unhealthy",
    Cause.SILENT: "wave {n}: {c.silent} of {c.targeted} targeted devices silent",
    Cause.PROMOTED: "wave {n}: {c.healthy} of {c.targeted} devices healthy",
    Cause.EMPTY_WAVE: "wave {n}: no device to ask ({c.pending} offline)",
    Cause.OTHER_CLASS_FAILED: "another class failed (all or nothing)",
    Cause.TIMED_OUT: "wave {n}: timed out with {c.healthy} of {c.targeted} healthy",
    Cause.SPEC_REFUSED: "spec refused: {problems}",
    Cause.CLASSES_UNAVAILABLE: "{problems}",
    Cause.ARTIFACT_UNAVAILABLE: "{problems}",
    Cause.INVALID_CANDIDATE: "{problems}",
    Cause.GATE_FAILED: "{problems}",
}


@dataclass(frozen=True, kw_only=True)
class RolloutReason:
    """One reason, rendered by ``str()``.

    Raises (on construction):
        UsageError: a wave verdict without its wave and counts, a refusal without its
            problems, or either carried by a cause that has none.
    """

    cause: Cause
    wave: int | None = None
    """The wave judged, 0-based as in the record and the status (the text counts from 1)."""
    counts: WaveCounts | None = None
    """The counts it was judged on."""
    quoted: tuple[str, ...] = ()
    """The devices' own words (``device: reasons``) that a rollback quotes, each bounded
    where it was quoted (``CoordinatorLimits.device_reason_chars``, at most
    ``CoordinatorLimits.unhealthy_quoted`` of them: ``FleetView.unhealthy_reasons``)."""
    problems: tuple[str, ...] = ()
    """What refused the spec or its candidate, in the checks' own words."""
    chars: int = MAX_REASON_CHARS
    """Bound of the text (``CoordinatorLimits.reason_chars``): the problems and the
    quoted words come from input."""

    def __post_init__(self) -> None:
        judged = self.wave is not None and self.counts is not None
        if (self.cause in WAVE_VERDICTS) != judged or (self.cause in REFUSALS) != bool(
            self.problems
        ):
            msg = f"a {self.cause.value} reason of wave {self.wave}, problems {self.problems!r}"
            raise UsageError(msg)

    def __str__(self) -> str:
        text = _TEXT[self.cause].format(
            n=None if self.wave is None else self.wave + 1,
            c=self.counts,
            problems="; ".join(self.problems),
        )
        if self.quoted:
            text += f" ({'; '.join(self.quoted)})"
        return bound_text(text, self.chars)
