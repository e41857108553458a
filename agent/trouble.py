"""What makes a device ``degraded``, as the update engine keeps it (sans-IO, ``now``
passed in): which parts of its storage fail, why and since when; and why its model
serves on a fallback execution provider, or does not load."""

from __future__ import annotations

import logging

from agent.events import Command, Emit, Log, StateChanged, StoragePart
from schemas import EventKind, Release
from schemas.device import MAX_REASON_CHARS
from schemas.errors import bound_text

__all__ = ["ModelTrouble", "StorageTrouble"]


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

    def failed(self, part: StoragePart, why: str, now: float) -> list[Command]:
        """``part`` failed: what to do if it is new trouble (nothing if it failed
        already: it is failing since then)."""
        why = bound_text(f"{part}: {why}", self._reason_chars)
        first = part not in self._why
        self._why[part] = why
        if not first:
            return []
        self._since[part] = now
        return [Log(logging.ERROR, f"storage failing, {why}"), StateChanged()]

    def ok(self, part: StoragePart, now: float, detail_chars: int) -> list[Command]:
        """``part`` works: what to do if it failed (tell for how long)."""
        why = self._why.pop(part, None)
        if why is None:
            return []
        lasted = now - self._since.pop(part, now)
        detail = bound_text(f"{why} (for {lasted:.0f} s); works again", detail_chars)
        return [
            Log(logging.WARNING, f"storage works again ({why}, for {lasted:.0f} s)"),
            StateChanged(),
            Emit(EventKind.STORAGE_RECOVERED, None, detail, None),
        ]


class ModelTrouble:
    """Why the model serves degraded (on a fallback execution provider), or why none
    serves though one should (it did not load); the device is ``degraded`` meanwhile."""

    def __init__(self) -> None:
        self._fallback: dict[str, str | None] = {}
        """Models the service holds loaded, by sha256 (the one serving and one to fall
        back to), with why each runs on a fallback provider (None: it does not)."""
        self.unloadable: str | None = None
        """Why no model serves though one should, until one does."""

    def __contains__(self, sha256: str) -> bool:
        return sha256 in self._fallback

    def holding(self, sha256: str, fallback: str | None, *, keep: str | None = None) -> None:
        """The service holds the model of ``sha256`` (and still the one of ``keep``)."""
        kept = {} if keep is None else {keep: self._fallback.get(keep)}
        self._fallback = {**kept, sha256: None if fallback is None else f"provider: {fallback}"}

    def reason(self, active: Release | None) -> str | None:
        """Why the model of ``active`` serves degraded, or why none serves."""
        if active is None:
            return self.unloadable
        return self._fallback.get(active.artifact.sha256)
