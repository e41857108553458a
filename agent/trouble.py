"""Which parts of the device's storage fail, why, and since when: the update engine's
bookkeeping of storage trouble (sans-IO, ``now`` passed in)."""

from __future__ import annotations

from agent.events import StoragePart
from schemas.device import MAX_REASON_CHARS
from schemas.errors import bound_text

__all__ = ["StorageTrouble"]


class StorageTrouble:
    """Failing parts of storage; the device is ``degraded`` while any fails."""

    def __init__(self, reason_chars: int) -> None:
        self._reason_chars = reason_chars
        self._why: dict[StoragePart, str] = {}
        self._since: dict[StoragePart, float] = {}

    def __bool__(self) -> bool:
        return bool(self._why)

    def __contains__(self, part: StoragePart) -> bool:
        return part in self._why

    @property
    def reason(self) -> str | None:
        """Why storage fails now, as the state's ``degraded_reason`` tells it."""
        if not self._why:
            return None
        return bound_text("; ".join(self._why[k] for k in sorted(self._why)), MAX_REASON_CHARS)

    def by_part(self) -> dict[str, str]:
        return {part.value: why for part, why in self._why.items()}

    def failed(self, part: StoragePart, why: str, now: float) -> str | None:
        """``part`` failed; its bounded reason if it is new trouble (None if it failed
        already: it is failing since then)."""
        why = bound_text(f"{part}: {why}", self._reason_chars)
        first = part not in self._why
        self._why[part] = why
        if not first:
            return None
        self._since[part] = now
        return why

    def ok(self, part: StoragePart, now: float) -> tuple[str, float] | None:
        """``part`` works; why it failed and for how long, if it did."""
        why = self._why.pop(part, None)
        if why is None:
            return None
        return why, now - self._since.pop(part, now)
