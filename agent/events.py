"""The update engine's vocabulary: what it is told (events) and what it asks (commands).

Values only, no behaviour: :mod:`agent.engine` decides, the services carry out. Every
event that depends on time carries ``now``, a reading of the agent's one clock.
Results of work the engine asked for carry the ``attempt`` it was asked under, so that a
result of work since superseded is recognised and ignored.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from agent.health import HealthCode
from schemas import EventKind, HealthReport, Reason, Release, encode

__all__ = [
    "NOTHING",
    "Cancel",
    "Command",
    "Desired",
    "Emit",
    "EngineEvent",
    "FailedRelease",
    "Failure",
    "FailureKind",
    "Fetch",
    "Fetched",
    "Inferred",
    "Load",
    "Loaded",
    "Log",
    "Memory",
    "Note",
    "Persist",
    "Report",
    "Restored",
    "Revert",
    "SelfTest",
    "SelfTested",
    "StateChanged",
    "Stopping",
    "StorageFailed",
    "StorageOk",
    "StoragePart",
    "Swap",
    "Targeted",
    "Tick",
]


# -- values -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Desired:
    """What the applied manifest (of ``seq``) asks of this device."""

    release: Release | None
    rollout_id: str | None
    seq: int

    @property
    def sha256(self) -> str | None:
        return None if self.release is None else self.release.artifact.sha256

    @property
    def work(self) -> tuple[str | None, str | None]:
        """What the target asks for; a re-signed manifest (new seq) asks the same."""
        return self.sha256, self.rollout_id


NOTHING = Desired(None, None, 0)

_LEGACY_STABLE = re.compile(r"seq\d+")
_STABLE = "stable@"


@dataclass(frozen=True)
class FailedRelease:
    """A release that failed here, remembered so that it is not tried again in its
    scope: its rollout, or for a stable target the release itself (``release``, a
    digest of its signed content). A re-signed manifest does not try it again; a manifest
    that changes the release (another artifact, budget, runtime...) does."""

    sha256: str
    rollout_id: str | None = None
    release: str | None = None

    @classmethod
    def of(cls, desired: Desired) -> FailedRelease:
        assert desired.release is not None
        sha256 = desired.release.artifact.sha256
        if desired.rollout_id is not None:
            return cls(sha256, rollout_id=desired.rollout_id)
        return cls(sha256, release=hashlib.sha256(encode(desired.release)).hexdigest()[:16])

    def stored(self) -> str:
        """As the state file keeps it: ``<rollout>:<sha256>`` or
        ``stable@<release digest>:<sha256>``."""
        scope = self.rollout_id if self.rollout_id is not None else f"{_STABLE}{self.release}"
        return f"{scope}:{self.sha256}"

    @classmethod
    def parse(cls, text: str) -> FailedRelease | None:
        """The key a state file kept (see :meth:`stored`); None for a stable key of an
        earlier agent (``seq<N>:<sha256>``), whose scope ended at its next manifest."""
        scope, _, sha256 = text.rpartition(":")
        if scope.startswith(_STABLE):
            return cls(sha256, release=scope.removeprefix(_STABLE))
        if _LEGACY_STABLE.fullmatch(scope):
            return None
        return cls(sha256, rollout_id=scope)


@dataclass(frozen=True)
class Memory:
    """What the engine keeps across restarts (:class:`Persist` asks to write it)."""

    active: Release | None = None
    known_good: tuple[str, ...] = ()
    """sha256 of releases that passed a soak here."""
    failed: tuple[FailedRelease, ...] = ()
    last_health: HealthReport | None = None
    soaking: Desired | None = None
    """The target being soaked, written before its swap and cleared when its soak ends:
    found at a start, the candidate took the agent down (see ``UpdateEngine``)."""


class FailureKind(StrEnum):
    TIMEOUT = "timeout"
    """Nothing, or not all of it, arrived in time: retried later, never a verdict."""
    REFETCH = "refetch"
    """Fetched bytes that do not match (unsigned, so never a verdict): fetched again."""
    REJECTED = "rejected"
    """The release itself is bad (does not load, fails its self-test): a verdict."""
    ERROR = "error"
    """The agent's own trouble (a full disk, a bug): retried later."""


@dataclass(frozen=True)
class Failure:
    kind: FailureKind
    detail: str
    reason: Reason | None = None


class StoragePart(StrEnum):
    STATE = "state"
    OUTBOX = "outbox"
    ARTIFACTS = "artifacts"


# -- events -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Restored:
    """The agent started: what it remembered, and whether the active model loaded;
    ``trouble`` says why it serves degraded (a fallback provider) or does not load."""

    memory: Memory
    serving: bool
    now: float
    trouble: str | None = None


@dataclass(frozen=True)
class Targeted:
    """A manifest was applied; ``desired`` is what it asks of this device."""

    desired: Desired
    now: float


@dataclass(frozen=True)
class Fetched:
    attempt: int
    now: float
    model: Path | None = None
    golden: Path | None = None
    failure: Failure | None = None


@dataclass(frozen=True)
class Loaded:
    """The model loaded (``fallback``: on a later provider than its first, and why)."""

    attempt: int
    now: float
    failure: Failure | None = None
    fallback: str | None = None


@dataclass(frozen=True)
class SelfTested:
    attempt: int
    now: float
    failure: Failure | None = None


@dataclass(frozen=True)
class Inferred:
    """One inference by the model of ``sha256``; ``latency_ms`` None when it failed."""

    sha256: str
    latency_ms: float | None
    now: float


@dataclass(frozen=True)
class Tick:
    """Time passed: a soak may be due for judging, a retry due to start."""

    now: float


@dataclass(frozen=True)
class Stopping:
    """The agent stops in order (a requested stop, or its owner cancelled it): a soak
    in flight was cut short, not crashed, and is tried again at the next start."""


@dataclass(frozen=True)
class StorageFailed:
    part: StoragePart
    why: str
    now: float


@dataclass(frozen=True)
class StorageOk:
    part: StoragePart
    now: float


EngineEvent = (
    Restored
    | Targeted
    | Fetched
    | Loaded
    | SelfTested
    | Inferred
    | Tick
    | StorageFailed
    | StorageOk
    | Stopping
)


# -- commands -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Fetch:
    """Fetch ``release``'s model and golden set (answer: :class:`Fetched`)."""

    attempt: int
    release: Release


@dataclass(frozen=True)
class Load:
    """Load the fetched model beside the one serving (answer: :class:`Loaded`)."""

    attempt: int
    release: Release
    model: Path


@dataclass(frozen=True)
class SelfTest:
    """Self-test the loaded model with its golden set, or else one real input
    (answer: :class:`SelfTested`)."""

    attempt: int
    golden: Path | None


@dataclass(frozen=True)
class Swap:
    """Serve ``release``: the model loaded under ``attempt``, or (None) one already
    held. Keep the slot of ``keep`` beside it, to fall back to; free any other."""

    release: Release
    attempt: int | None
    keep: str | None


@dataclass(frozen=True)
class Revert:
    """Serve ``to`` again (None: nothing), the model served before an update."""

    to: Release | None


@dataclass(frozen=True)
class Cancel:
    """The work of ``attempt`` no longer matters: stop it if it still runs."""

    attempt: int


@dataclass(frozen=True)
class Report:
    """Publish ``report`` (retained): what the coordinator waits for."""

    report: HealthReport


@dataclass(frozen=True)
class Emit:
    """Queue an event in the outbox; texts are bounded already."""

    kind: EventKind
    reason: Reason | HealthCode | None
    detail: str
    desired: Desired | None


@dataclass(frozen=True)
class Note:
    """Show this as the device's last rejection in its state."""

    reason: Reason
    detail: str


@dataclass(frozen=True)
class Persist:
    """Write ``memory`` to the state file."""

    memory: Memory


@dataclass(frozen=True)
class StateChanged:
    """The published state changed: publish it soon."""


@dataclass(frozen=True)
class Log:
    level: int
    message: str


Command = (
    Fetch
    | Load
    | SelfTest
    | Swap
    | Revert
    | Cancel
    | Report
    | Emit
    | Note
    | Persist
    | StateChanged
    | Log
)
