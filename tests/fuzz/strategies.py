"""Hypothesis strategies for hostile input: every wire message of ``schemas/`` at the
edges of its schema, signed where a handler sits behind a signature, and garbage
(random bytes, truncated or bit-flipped messages, msgpack that is not the schema,
payloads near the broker's packet limit).

Strings are built by repeating a short hostile unit up to a boundary length rather
than drawn character by character: that keeps examples cheap (hypothesis caps how
much it draws per example) while still reaching every ``max_length`` and the message
size cap. Each strategy yields :class:`Sample`: who publishes, where, what, and a
bounded description (hypothesis prints ``repr`` of a failing batch).
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final, TypeVar, get_args, get_origin

import msgpack
from hypothesis import strategies as st
from pydantic import BaseModel

from broker.config import default_template
from schemas import (
    MANIFEST_KIND,
    MAX_MESSAGE_BYTES,
    ROLLOUT_SPEC_KIND,
    TRUST_KIND,
    ArtifactMeta,
    ArtifactRef,
    Candidate,
    Desired,
    DeviceState,
    Event,
    EventKind,
    HealthBudget,
    HealthReport,
    KeyPair,
    LogHistogram,
    Manifest,
    Mode,
    Phase,
    Rejection,
    Release,
    RoleKeys,
    RolloutCohort,
    RolloutSpec,
    RolloutStatus,
    Runtime,
    TelemetrySummary,
    TensorSpec,
    TrustDoc,
    Variant,
    Verdict,
    WaveCounts,
    WireModel,
    encode,
    public_raw,
    seal,
)
from schemas.artifact import MAX_CHUNK_BYTES, MAX_CHUNKS
from schemas.trust import Role

T = TypeVar("T")

__all__ = [
    "BROKER_PACKET_LIMIT",
    "CHUNKS",
    "Keys",
    "Sample",
    "artifact_metas",
    "device_states",
    "encoded",
    "events",
    "field_ints",
    "floats",
    "health_reports",
    "highest",
    "hostile",
    "ints",
    "item_most",
    "manifests",
    "most",
    "most_items",
    "names",
    "optional",
    "pick",
    "releases",
    "rollout_specs",
    "rollout_statuses",
    "samples",
    "sealed",
    "sha256s",
    "telemetry",
    "text",
    "trust_docs",
]


def _packet_limit() -> int:
    match = re.search(r"^max_packet_size\s+(\d+)", default_template(), re.MULTILINE)
    assert match is not None, "mosquitto.conf sets no max_packet_size"
    return int(match.group(1))


BROKER_PACKET_LIMIT: Final = _packet_limit()
"""``max_packet_size`` of the repo's ``mosquitto.conf``: payloads just below it reach the
parties' own caps, payloads past it test the broker's refusal."""

_NAME_CHARS: Final = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"
_HOSTILE_UNITS: Final = (
    "a",
    "é",
    "€",
    "\U0001f4a9",  # four UTF-8 bytes per character
    "\x00",
    "/+#",
    "%s%n{}",
    "\u202e",
    "\n\r\t",
    "\ud7ff",
    "'\"\\",
)
_INT_EDGES: Final = (0, 1, -1, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, -(2**63), 2**64 - 1)
_FLOAT_EDGES: Final = (
    0.0,
    -0.0,
    5e-324,
    1.0,
    1e-9,
    1.7976931348623157e308,
    -1.7976931348623157e308,
    math.inf,
    -math.inf,
    math.nan,
)
# The longest a string may be in a message that must still fit MAX_MESSAGE_BYTES along
# with its other fields, when the schema itself sets no bound.
_UNBOUNDED: Final = (0, 1, 64, 65, 1000, 4096, 30_000)


@dataclass(frozen=True)
class Sample:
    """One publish: the account that makes it, the topic, the payload."""

    account: str
    """``coordinator``, ``operator`` or a device id (its own certificate)."""
    topic: str
    payload: bytes
    retain: bool
    what: str

    def __repr__(self) -> str:
        return f"<{self.account} -> {self.topic}: {self.what} ({len(self.payload)} B)>"

    def _repr_pretty_(self, printer: Any, _cycle: bool) -> None:
        """How hypothesis prints a failing example: without the payload's bytes."""
        printer.text(repr(self))


@dataclass(frozen=True)
class Keys:
    """The home's signing keys (hostile payloads are signed with the real ones)."""

    root: KeyPair
    manifest: KeyPair
    operator: KeyPair


# -- the schema's own bounds ----------------------------------------------------------


def _max_of(metadata: Iterable[object]) -> int | None:
    for item in metadata:
        value = getattr(item, "max_length", None)
        if isinstance(value, int):
            return value
        nested = getattr(item, "metadata", None)
        if nested is not None and (found := _max_of(nested)) is not None:
            return found
    return None


def most(model: type[BaseModel], name: str) -> int | None:
    """The ``max_length`` the schema sets on a field (a string's or a container's)."""
    return _max_of(model.model_fields[name].metadata)


def item_most(model: type[BaseModel], name: str) -> int | None:
    """The ``max_length`` of a container field's items (a tuple's items, a dict's keys)."""
    for arg in get_args(model.model_fields[name].annotation):
        if get_origin(arg) is Annotated:
            return _max_of(arg.__metadata__)
    return None


def _limit(model: type[BaseModel], name: str, attr: str) -> int | None:
    for item in model.model_fields[name].metadata:
        value = getattr(item, attr, None)
        if isinstance(value, int):
            return value
    return None


def highest(model: type[BaseModel], name: str) -> int | None:
    """The ``le`` bound the schema sets on an int field."""
    return _limit(model, name, "le")


def field_ints(
    model: type[BaseModel], name: str, *, lo: int | None = None, hi: int | None = None
) -> st.SearchStrategy[int]:
    """Boundary integers for an int field: the schema's own ``ge``/``gt``/``le``/``lt``,
    narrowed further by ``lo`` and ``hi``."""
    gt, lt = _limit(model, name, "gt"), _limit(model, name, "lt")
    lows = [
        v for v in (lo, _limit(model, name, "ge"), None if gt is None else gt + 1) if v is not None
    ]
    highs = [
        v for v in (hi, _limit(model, name, "le"), None if lt is None else lt - 1) if v is not None
    ]
    return ints(max(lows) if lows else None, min(highs) if highs else None)


def most_items(model: type[BaseModel], name: str, default: int) -> int:
    found = most(model, name)
    return default if found is None else found


# -- building blocks ----------------------------------------------------------------


def _fill(unit: str, length: int) -> str:
    return (unit * (length // len(unit) + 1))[:length]


def text(max_length: int | None = None, *, min_length: int = 0) -> st.SearchStrategy[str]:
    """A string at a boundary length (or a short one), of a hostile unit repeated."""
    lengths = (
        [n for n in _UNBOUNDED if n >= min_length]
        if max_length is None
        else sorted({min_length, max_length, max(min_length, max_length - 1)})
    )
    return st.builds(_fill, st.sampled_from(_HOSTILE_UNITS), st.sampled_from(lengths))


def names() -> st.SearchStrategy[str]:
    """Names that may stand as one topic level: 1 or 64 characters, or a short one."""
    longest = st.builds(
        lambda c, fill: c + _fill(fill, 63),
        st.sampled_from("aZ9"),
        st.sampled_from(("a", "-", ".", "_", "x.y-z_0")),
    )
    return st.one_of(
        longest, st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,8}", fullmatch=True), st.just("a")
    )


def sha256s() -> st.SearchStrategy[str]:
    return st.binary(min_size=4, max_size=4).map(lambda b: hashlib.sha256(b).hexdigest())


def ints(lo: int | None = None, hi: int | None = None) -> st.SearchStrategy[int]:
    """Boundary integers within [lo, hi], msgpack-encodable."""
    lo = -(2**63) if lo is None else lo
    hi = 2**64 - 1 if hi is None else hi
    edges = sorted({v for v in (*_INT_EDGES, lo, hi) if lo <= v <= hi})
    small_lo, small_hi = max(lo, -3), min(hi, 1000)
    if small_lo > small_hi:
        small_lo = small_hi = lo
    return st.one_of(st.sampled_from(edges), st.integers(small_lo, small_hi))


def floats(
    lo: float | None = None, hi: float | None = None, *, finite: bool = False
) -> st.SearchStrategy[float]:
    def ok(v: float) -> bool:
        if math.isnan(v):
            return not finite and lo is None and hi is None
        if finite and math.isinf(v):
            return False
        return (lo is None or v >= lo) and (hi is None or v <= hi)

    edges = [v for v in (*_FLOAT_EDGES, lo, hi, time.time()) if v is not None and ok(v)]
    return st.sampled_from(edges)


def optional(strategy: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    return st.one_of(st.none(), strategy)


def _most(strategy: st.SearchStrategy[T], most: int) -> st.SearchStrategy[list[T]]:
    """Lists of one item, a few, or exactly ``most`` (one drawn item repeated: a long
    list costs one draw)."""
    return st.one_of(
        st.lists(strategy, min_size=1, max_size=3),
        strategy.map(lambda item: [item] * most),
    )


# -- messages -----------------------------------------------------------------------


def rejections() -> st.SearchStrategy[Rejection]:
    return st.builds(
        Rejection,
        reason=text(most(Rejection, "reason")),
        detail=text(most(Rejection, "detail")),
        at=floats(),
    )


def device_states(device_id: st.SearchStrategy[str]) -> st.SearchStrategy[DeviceState]:
    return st.builds(
        DeviceState,
        device_id=device_id,
        hw_class=st.one_of(names(), text()),
        mode=st.sampled_from(Mode),
        active_release=optional(text()),
        active_sha256=optional(st.one_of(sha256s(), text())),
        target_release=optional(text()),
        rollout_id=optional(st.one_of(names(), text())),
        applied_seq=field_ints(DeviceState, "applied_seq"),
        trust_version=ints(),
        inferences_total=ints(),
        last_inference_at=optional(floats()),
        last_rejection=optional(rejections()),
        degraded_reason=optional(text(most(DeviceState, "degraded_reason"))),
        updated_at=floats(),
    )


def health_reports(
    device_id: st.SearchStrategy[str],
    rollout_ids: st.SearchStrategy[str | None],
    releases: st.SearchStrategy[str],
) -> st.SearchStrategy[HealthReport]:
    reason = text(item_most(HealthReport, "reasons"))
    reasons = st.one_of(
        st.just(()), _most(reason, most_items(HealthReport, "reasons", 64)).map(tuple)
    )
    return st.builds(
        HealthReport,
        report_id=st.one_of(st.uuids().map(lambda u: u.hex), text(min_length=1)),
        device_id=device_id,
        rollout_id=rollout_ids,
        manifest_seq=field_ints(HealthReport, "manifest_seq"),
        release=releases,
        verdict=st.sampled_from(Verdict),
        reasons=reasons,
        inferences=ints(),
        errors=ints(),
        p95_latency_ms=optional(floats()),
        soak_seconds=floats(),
        at=floats(),
    )


def events(device_id: st.SearchStrategy[str]) -> st.SearchStrategy[Event]:
    return st.builds(
        Event,
        event_id=st.one_of(st.uuids().map(lambda u: u.hex), text()),
        device_id=device_id,
        kind=st.sampled_from(EventKind),
        reason=optional(text(most(Event, "reason"))),
        detail=text(most(Event, "detail")),
        manifest_seq=optional(ints()),
        release=optional(text()),
        dropped_before=field_ints(Event, "dropped_before"),
        at=floats(),
    )


@st.composite
def _histograms(draw: st.DrawFn) -> LogHistogram:
    start = draw(ints(-(2**63), 2**63 - 10_001))
    size = draw(st.sampled_from((0, 1, 2, 5000)))
    count = draw(ints(1, 2**63 - 1))
    return LogHistogram(buckets=tuple((start + i, count) for i in range(size)))


def telemetry(device_id: st.SearchStrategy[str]) -> st.SearchStrategy[TelemetrySummary]:
    label_count = st.sampled_from((0, 1, most_items(TelemetrySummary, "labels", 1000)))
    label_chars = item_most(TelemetrySummary, "labels") or 64
    return st.builds(
        TelemetrySummary,
        summary_id=st.one_of(st.uuids().map(lambda u: u.hex), text()),
        device_id=device_id,
        release=optional(text()),
        window_start=floats(),
        window_end=floats(),
        windows=field_ints(TelemetrySummary, "windows"),
        count=field_ints(TelemetrySummary, "count"),
        errors=field_ints(TelemetrySummary, "errors"),
        latency_ms=_histograms(),
        confidence=ints(0).map(lambda n: (n,) * 10),
        labels=st.builds(
            lambda n, unit, count: {
                (f"{i}-" + _fill(unit, label_chars))[:label_chars]: count for i in range(n)
            },
            label_count,
            st.sampled_from(_HOSTILE_UNITS),
            ints(),
        ),
        max_rss_bytes=ints(),
    )


def rollout_statuses(rollout_id: st.SearchStrategy[str]) -> st.SearchStrategy[RolloutStatus]:
    counts = st.builds(
        WaveCounts,
        members=ints(),
        targeted=ints(),
        updated=ints(),
        healthy=ints(),
        unhealthy=ints(),
    )
    return st.builds(
        RolloutStatus,
        id=rollout_id,
        generation=ints(),
        phase=st.sampled_from(Phase),
        wave=ints(),
        waves_percent=_most(floats(), most_items(RolloutSpec, "waves_percent", 20)).map(tuple),
        counts=counts,
        classes=_most(names(), most_items(RolloutSpec, "classes", 64)).map(tuple),
        release=optional(text()),
        releases=st.builds(
            lambda n, r: {f"c{i}": r for i in range(n)}, st.sampled_from((0, 64)), text(300)
        ),
        reason=optional(text(most(RolloutStatus, "reason"))),
        updated_at=floats(),
    )


def _tensor_specs() -> st.SearchStrategy[tuple[TensorSpec, ...]]:
    shape = st.one_of(
        st.just(()),
        st.lists(st.one_of(ints(), st.none(), text(64)), min_size=1, max_size=4).map(tuple),
        ints().map(lambda n: (n,) * 200),
    )
    spec = st.builds(
        TensorSpec,
        name=text(most(TensorSpec, "name"), min_length=1),
        dtype=text(most(TensorSpec, "dtype")),
        shape=shape,
    )
    return _most(spec, 64).map(tuple)


def _artifact_refs(shas: st.SearchStrategy[str]) -> st.SearchStrategy[ArtifactRef]:
    return st.builds(ArtifactRef, sha256=shas, size=field_ints(ArtifactRef, "size"))


def releases(shas: st.SearchStrategy[str]) -> st.SearchStrategy[Release]:
    return st.builds(
        Release,
        name=names(),
        variant=optional(names()),
        artifact=_artifact_refs(shas),
        golden=optional(_artifact_refs(shas)),
        runtime=st.builds(
            Runtime,
            providers=_most(text(200, min_length=1), most_items(Runtime, "providers", 8)).map(
                tuple
            ),
            intra_op_threads=field_ints(Runtime, "intra_op_threads"),
        ),
        inputs=_tensor_specs(),
        outputs=_tensor_specs(),
        health=st.builds(
            HealthBudget,
            max_error_rate=floats(0.0, 1.0),
            p95_latency_ms=floats(5e-324),
            min_inferences=field_ints(HealthBudget, "min_inferences"),
            soak_seconds=floats(0.0),
        ),
    )


def manifests(
    hw_class: st.SearchStrategy[str],
    seq: st.SearchStrategy[int],
    expires_at: st.SearchStrategy[float],
    shas: st.SearchStrategy[str],
) -> st.SearchStrategy[Manifest]:
    cohort = st.builds(
        RolloutCohort,
        id=names(),
        candidate=releases(shas),
        salt=text(most(RolloutCohort, "salt"), min_length=1),
        cutoff_bp=field_ints(RolloutCohort, "cutoff_bp"),
        canaries=st.one_of(
            st.just(()), _most(names(), most_items(RolloutCohort, "canaries", 1000)).map(tuple)
        ),
    )
    return st.builds(
        Manifest,
        hw_class=hw_class,
        seq=seq,
        issued_at=floats(),
        expires_at=expires_at,
        stable=optional(releases(shas)),
        rollout=optional(cohort),
    )


@st.composite
def _variants(draw: st.DrawFn, shas: st.SearchStrategy[str]) -> tuple[Variant, ...]:
    """Variants whose first artifact is drawn from ``shas`` (a fetch the batch can feed),
    the others derived from it (labels and digests must differ)."""
    count = draw(st.sampled_from((1, 2, most_items(Candidate, "variants", 8))))
    inputs, outputs = draw(_tensor_specs()), draw(_tensor_specs())
    golden = draw(st.booleans())
    size = draw(
        st.one_of(st.sampled_from([len(c) for c in CHUNKS]), field_ints(ArtifactRef, "size"))
    )
    first = draw(shas)
    return tuple(
        Variant(
            label=f"v{i}-{draw(names())}"[:64],
            artifact=ArtifactRef(
                sha256=first if i == 0 else hashlib.sha256(f"{i}{first}".encode()).hexdigest(),
                size=size,
            ),
            golden=(
                ArtifactRef(sha256=hashlib.sha256(f"g{i}".encode()).hexdigest(), size=size)
                if golden
                else None
            ),
            inputs=inputs,
            outputs=outputs,
        )
        for i in range(count)
    )


@st.composite
def _waves(draw: st.DrawFn) -> tuple[float, ...]:
    count = draw(st.sampled_from((1, 2, most_items(RolloutSpec, "waves_percent", 20))))
    if count == 1:
        return (100.0,)
    first = draw(st.sampled_from((5e-324, 1e-9, 1.0)))
    return (first, *(100.0 * i / count for i in range(2, count)), 100.0)[-count:]


def rollout_specs(
    rollout_id: st.SearchStrategy[str],
    classes: st.SearchStrategy[tuple[str, ...]],
    desired: st.SearchStrategy[Desired],
    shas: st.SearchStrategy[str],
) -> st.SearchStrategy[RolloutSpec]:
    return st.builds(
        RolloutSpec,
        id=rollout_id,
        generation=field_ints(RolloutSpec, "generation"),
        desired=desired,
        classes=classes,
        candidate=st.builds(Candidate, name=names(), variants=_variants(shas)),
        waves_percent=_waves(),
        canaries=st.one_of(
            st.just(()), _most(names(), most_items(RolloutSpec, "canaries", 1000)).map(tuple)
        ),
        success_ratio=optional(floats(5e-324, 1.0)),
        max_failure_ratio=optional(floats(0.0, 0.999999)),
        wave_timeout_s=optional(floats(5e-324, finite=True)),
        issued_at=floats(),
        operator=text(most(RolloutSpec, "operator")),
    )


def trust_docs(keys: Keys, version: st.SearchStrategy[int]) -> st.SearchStrategy[TrustDoc]:
    """Root-signable TrustDocs that keep the home's roles working (so a device that takes
    one can still verify the fleet's manifests) with extremes everywhere else: many
    extra keys, every role at its 8 keys, boundary versions and expiries."""

    def build(version: int, extra: int, expires_at: float, issued_at: float) -> TrustDoc:
        strangers = [KeyPair.generate() for _ in range(extra)]
        table = {k.id: public_raw(k.public) for k in (keys.root, keys.manifest, keys.operator)}
        table |= {k.id: public_raw(k.public) for k in strangers}
        filler = tuple(k.id for k in strangers[:7])
        return TrustDoc(
            version=version,
            issued_at=issued_at,
            expires_at=expires_at,
            keys=table,
            roles={
                Role.ROOT: RoleKeys(keys=(keys.root.id, *filler)),
                Role.MANIFEST: RoleKeys(keys=(keys.manifest.id, *filler)),
                Role.OPERATOR: RoleKeys(keys=(keys.operator.id, *filler)),
            },
        )

    # Past (refused) or far future (taken): an expiry in between would leave a device
    # that took the document with no trust at all a moment later, which is right.
    expiry = st.sampled_from((0.0, -math.inf, 1.0, 1.7976931348623157e308, math.inf, math.nan))
    return st.builds(build, version, st.sampled_from((0, 7, 200)), expiry, floats())


CHUNKS: Final = (b"\x00" * 1024, b"edgefleet" * 455, bytes(range(256)) * 16)
"""Chunk payloads the fuzz publishes; some metas describe them truly (same length and
hash), so a party fetching an artifact gets as far as joining them."""


def artifact_metas(shas: st.SearchStrategy[str]) -> st.SearchStrategy[ArtifactMeta]:
    """Metas at their bounds (chunk size, chunk count, name), and metas of one of
    :data:`CHUNKS` whose digest is a lie (the joined file never matches ``sha256``)."""

    @st.composite
    def extreme(draw: st.DrawFn) -> ArtifactMeta:
        chunk_size = draw(st.sampled_from((1024, 4096, MAX_CHUNK_BYTES)))
        count = draw(st.sampled_from((1, 2, most_items(ArtifactMeta, "chunks", MAX_CHUNKS))))
        size = chunk_size * (count - 1) + draw(st.sampled_from((1, chunk_size)))
        chunk = draw(sha256s())
        return ArtifactMeta(
            sha256=draw(shas),
            size=size,
            chunk_size=chunk_size,
            chunks=(chunk,) * count,
            name=draw(text(most(ArtifactMeta, "name"))),
            media_type=draw(text()),
        )

    def lying(sha256: str, chunk: bytes) -> ArtifactMeta:
        return ArtifactMeta(
            sha256=sha256,
            size=len(chunk),
            chunk_size=max(1024, len(chunk)),
            chunks=(hashlib.sha256(chunk).hexdigest(),),
            name="lying",
        )

    return st.one_of(extreme(), st.builds(lying, shas, pick(CHUNKS)))


# -- garbage ------------------------------------------------------------------------


def _random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


_MSGPACK_JUNK: Final = (
    b"",
    b"\xc1",  # never used in msgpack
    b"\x91" * 100_000 + b"\xc0",  # nesting far past any stack
    b"\xdd\xff\xff\xff\xff",  # an array claiming 4 G items
    b"\xdf\xff\xff\xff\xff",  # a map claiming 4 G pairs
    b"\xc6\xff\xff\xff\xff",  # a bin claiming 4 GiB
    msgpack.packb({"v": 1}),
    msgpack.packb({"v": 2}),
    msgpack.packb({"v": 1, "kind": "x", "body": b"", "sigs": []}),
    msgpack.packb({"v": 1, 1: 2}, strict_types=False),
    msgpack.packb({"v": 1.0}),
    msgpack.packb({"v": True}),
    msgpack.packb({"v": 1, "payload": msgpack.ExtType(5, b"x" * 100)}),
    msgpack.packb({"v": 1, "at": msgpack.Timestamp(2**34, 999_999_999)}, datetime=False),
    msgpack.packb([1, 2, 3]),
    msgpack.packb("online"),
    msgpack.packb(math.nan),
    b"online",
    b"offline",
    b"\x00" * 64,
)


def _msgpack_values() -> st.SearchStrategy[object]:
    """msgpack-encodable values two containers deep, keyed like the wire's maps."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        ints(),
        st.floats(allow_nan=True),
        text(),
        st.binary(max_size=64),
    )
    keys = st.sampled_from(("v", "id", "kind", "body", "sigs", "x"))

    def containers(inner: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
        return st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4))

    return st.one_of(scalars, containers(scalars), containers(containers(scalars)))


def pick(values: Sequence[bytes]) -> st.SearchStrategy[bytes]:
    """One of ``values``, drawn by index: a strategy that holds big bytes literally
    makes hypothesis build reprs of them."""
    return st.integers(0, len(values) - 1).map(lambda i: values[i])


def hostile(
    valid: st.SearchStrategy[bytes], *, near_limit: bool = True
) -> st.SearchStrategy[tuple[bytes, str]]:
    """A valid payload, or that payload truncated or with a bit flipped, or junk:
    random bytes, msgpack that is not the schema, payloads at and past the message cap
    and near the broker's packet limit. With a description."""

    def cut(data: bytes, at: float) -> tuple[bytes, str]:
        keep = int(len(data) * at)
        return data[:keep], f"truncated to {keep} of {len(data)} B"

    def flip(data: bytes, at: float, bit: int) -> tuple[bytes, str]:
        if not data:
            return data, "empty"
        index = min(len(data) - 1, int(len(data) * at))
        return (
            data[:index] + bytes([data[index] ^ (1 << bit)]) + data[index + 1 :],
            f"bit {bit} of byte {index} flipped",
        )

    def junk(size: int, seed: int) -> tuple[bytes, str]:
        return _random_bytes(size, seed), f"{size} random bytes (seed {seed})"

    sizes = [0, 1, 7, 255, MAX_MESSAGE_BYTES, MAX_MESSAGE_BYTES + 1]
    if near_limit:
        sizes += [MAX_CHUNK_BYTES + 1, BROKER_PACKET_LIMIT - 1024, BROKER_PACKET_LIMIT + 1]
    fraction = st.sampled_from((0.0, 0.01, 0.5, 0.9, 0.999))
    return st.one_of(
        valid.map(lambda data: (data, "valid")),
        st.builds(cut, valid, fraction),
        st.builds(flip, valid, fraction, st.integers(0, 7)),
        st.builds(junk, st.sampled_from(sizes), st.integers(0, 2**16)),
        pick(_MSGPACK_JUNK).map(lambda d: (d, f"msgpack junk {d[:8]!r}")),
        _msgpack_values().map(lambda v: (msgpack.packb(v), "random msgpack")),
    )


def encoded(messages: st.SearchStrategy[WireModel]) -> st.SearchStrategy[bytes]:
    return messages.map(encode)


def sealed(
    kind: str, bodies: st.SearchStrategy[WireModel], signers: Sequence[KeyPair]
) -> st.SearchStrategy[bytes]:
    """Bodies correctly signed by each of ``signers`` (and, now and then, as another kind)."""
    kinds = st.sampled_from((kind, kind, kind, MANIFEST_KIND, ROLLOUT_SPEC_KIND, TRUST_KIND))
    signer = st.sampled_from(list(signers))
    return st.builds(lambda body, k, key: seal(k, encode(body), [key]), bodies, kinds, signer)


def samples(
    account: str,
    topic: str | st.SearchStrategy[str],
    payloads: st.SearchStrategy[tuple[bytes, str]],
    *,
    retain: bool,
    label: str,
) -> st.SearchStrategy[Sample]:
    topics_ = st.just(topic) if isinstance(topic, str) else topic
    return st.builds(
        lambda t, p: Sample(account, t, p[0], retain, f"{label}, {p[1]}"), topics_, payloads
    )
