"""Artifact custody: which artifacts the broker must hold, and what to do about the ones
it holds otherwise. Pure: the caller hashes, publishes, clears and deletes.

Theory of operation. The coordinator keeps a checked copy of every artifact a manifest
names or will name (:func:`named_refs`: stables and live candidates; plus those being
fetched or validated). :class:`BrokerArtifacts` follows what the broker retains under
``artifacts/`` and ``staging/`` (the meta as published, each chunk's sha256, when the
artifact was first seen). From that:

* :func:`repair_plan` says which chunks to publish again (missing or different), which to
  clear (beyond the artifact) and whether the meta needs to follow (a meta implies its
  chunks, so it goes last);
* :func:`contradicts` says whether one message under ``artifacts/`` calls for a repair;
* :meth:`BrokerArtifacts.orphans` says what to clear: at once an artifact some ended
  rollout named, and after ``grace`` any upload or artifact nobody claimed (an operator
  uploads before publishing the spec that names it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from coordinator.rollout import RolloutRecord
from coordinator.store import ClassRecord
from schemas import ArtifactMeta, ArtifactRef, Phase, Release

__all__ = [
    "BrokerArtifacts",
    "Held",
    "Orphan",
    "Repair",
    "contradicts",
    "named_refs",
    "release_shas",
    "repair_plan",
]


def release_shas(release: Release) -> set[str]:
    """The artifacts a release names: its model and golden set."""
    shas = {release.artifact.sha256}
    if release.golden is not None:
        shas.add(release.golden.sha256)
    return shas


def named_refs(
    classes: Iterable[ClassRecord], rollouts: Iterable[RolloutRecord]
) -> dict[str, ArtifactRef]:
    """The artifacts (models and golden sets) of the stables and live candidates."""
    releases = [c.stable for c in classes if c.stable is not None]
    for record in rollouts:
        if record.phase in (Phase.WAVE, Phase.PAUSED):
            releases += record.candidates.values()
    refs = {r.artifact.sha256: r.artifact for r in releases}
    refs |= {r.golden.sha256: r.golden for r in releases if r.golden is not None}
    return refs


@dataclass
class Held:
    """What the broker retains of one artifact under one prefix (digests only: chunks
    can be large)."""

    first_seen: float
    meta: bytes | None = None
    chunks: dict[int, str] = field(default_factory=dict)
    """Index -> sha256 of the chunk."""


@dataclass(frozen=True)
class Orphan:
    sha256: str
    staged: bool
    """Under ``staging/`` (an upload), else under ``artifacts/``."""


@dataclass
class BrokerArtifacts:
    """What the broker retains under ``artifacts/`` and ``staging/``, as last seen."""

    published: dict[str, Held] = field(default_factory=dict)
    staged: dict[str, Held] = field(default_factory=dict)
    _since: dict[Orphan, float] = field(default_factory=dict)

    def held(self, sha256: str, *, staged: bool) -> Held | None:
        return (self.staged if staged else self.published).get(sha256)

    def reread(self) -> None:
        """Forget what was seen, before the cache is read again; first sightings are
        kept, so an orphan's grace runs across reconnects."""
        self._since = {
            Orphan(sha, staged): held.first_seen
            for staged, cache in ((False, self.published), (True, self.staged))
            for sha, held in cache.items()
        }
        self.published.clear()
        self.staged.clear()

    def note(
        self,
        sha256: str,
        index: int | None,
        payload: bytes,
        digest: str | None,
        *,
        staged: bool,
        now: float,
    ) -> None:
        """A meta (``index`` None) or chunk retained, or cleared (empty ``payload``);
        ``digest`` is the sha256 of a non-empty chunk."""
        cache = self.staged if staged else self.published
        held = cache.get(sha256)
        if held is None:
            if not payload:
                return
            since = self._since.get(Orphan(sha256, staged), now)
            held = cache[sha256] = Held(first_seen=since)
        if index is None:
            held.meta = payload or None
        elif payload and digest is not None:
            held.chunks[index] = digest
        else:
            held.chunks.pop(index, None)
        if held.meta is None and not held.chunks:
            del cache[sha256]

    def orphans(
        self,
        now: float,
        grace: float,
        *,
        referenced: set[str],
        busy: set[str],
        ended: set[str] | None = None,
    ) -> list[Orphan]:
        """What to clear: artifacts no manifest names, at once when some ended rollout
        named them (``ended``), else once they outlived ``grace``; uploads nobody is
        fetching or validating, once they outlived ``grace``."""
        ended = ended or set()
        gone = [
            Orphan(sha, staged=False)
            for sha, held in self.published.items()
            if sha not in referenced and (sha in ended or now - held.first_seen > grace)
        ]
        gone += [
            Orphan(sha, staged=True)
            for sha, held in self.staged.items()
            if sha not in busy and now - held.first_seen > grace
        ]
        return gone

    def orphans_due(
        self, now: float, grace: float, *, referenced: set[str], busy: set[str]
    ) -> bool:
        """Whether an upload or artifact has outlived ``grace`` unnamed."""
        return bool(self.orphans(now, grace, referenced=referenced, busy=busy))


@dataclass(frozen=True)
class Repair:
    """What makes the broker's ``artifacts/{sha256}/`` what the kept copy says."""

    wrong: tuple[int, ...]
    """Chunks missing or different: publish from the copy."""
    extra: tuple[int, ...]
    """Chunks beyond the artifact: clear."""

    def batches(self, window: int) -> list[tuple[int, ...]]:
        """The chunks to publish, ``window`` at a time."""
        return [self.wrong[i : i + window] for i in range(0, len(self.wrong), window)]


def repair_plan(meta: ArtifactMeta, meta_payload: bytes, held: Held | None) -> Repair | None:
    """None when the broker holds exactly the copy; else what to publish and clear (the
    meta always follows, last)."""
    chunks = {} if held is None else held.chunks
    wrong = tuple(i for i, digest in enumerate(meta.chunks) if chunks.get(i) != digest)
    extra = tuple(sorted(i for i in chunks if i >= len(meta.chunks)))
    if not wrong and not extra and held is not None and held.meta == meta_payload:
        return None
    return Repair(wrong, extra)


def contradicts(
    copies: Mapping[str, tuple[ArtifactMeta, bytes]],
    named: set[str],
    sha256: str,
    *,
    index: int | None,
    payload: bytes,
    digest: str | None,
) -> bool:
    """Whether a message under ``artifacts/`` contradicts the kept copy of a named
    artifact (compared by digest)."""
    copy = copies.get(sha256)
    if copy is None or sha256 not in named:
        return False
    meta, meta_payload = copy
    if index is None:
        return payload != meta_payload
    if index >= len(meta.chunks):
        return bool(payload)
    return digest != meta.chunks[index]
