"""The error tree of edgefleet.

Two families, kept apart on purpose (as python-tuf does):

* :class:`RejectedError` — untrusted input that failed a check. Each carries a
  machine-readable :class:`Reason` that ends up in device events and state, and a
  human-readable detail. Catching ``RejectedError`` is how a party survives bad input.
* :class:`UsageError` — the caller misused an API (a bug, or a bad operator command).

Transport failures live with the transport (``broker.session.TransportError``).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

__all__ = [
    "MAX_DETAIL_CHARS",
    "ArtifactError",
    "EdgefleetError",
    "MalformedPayloadError",
    "PolicyError",
    "Reason",
    "RejectedError",
    "SignatureError",
    "UsageError",
    "bound_text",
]


MAX_DETAIL_CHARS: Final = 500


def bound_text(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    """``text`` cut to at most ``limit`` characters, an ellipsis marking the cut.

    Every text composed from input (rejection details, rollback reasons, audit details)
    goes through here where it is built, so that carrying it can never fail on its size.
    """
    if len(text) <= limit:
        return text
    return text[: max(limit - 1, 0)] + "…"


class Reason(StrEnum):
    """Why a piece of untrusted input was rejected; stable strings on the wire."""

    OVERSIZED = "oversized"
    MALFORMED = "malformed"
    SCHEMA = "schema"
    UNSUPPORTED_VERSION = "unsupported_version"
    WRONG_KIND = "wrong_kind"
    UNSIGNED = "unsigned"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    WRONG_CLASS = "wrong_class"
    REPLAYED = "replayed"
    EXPIRED = "expired"
    NOT_TRUSTED = "not_trusted"
    CHUNK_CORRUPT = "chunk_corrupt"
    ARTIFACT_MISMATCH = "artifact_mismatch"
    FETCH_TIMEOUT = "fetch_timeout"
    MODEL_LOAD_FAILED = "model_load_failed"
    SELF_TEST_FAILED = "self_test_failed"
    PROFILE_MISMATCH = "profile_mismatch"
    CRASHED_DURING_SOAK = "crashed_during_soak"
    """The agent found its soak of the release still open at a start: the release took
    the process or the machine down (a health report's reason, not a rejection)."""


class EdgefleetError(Exception):
    """Root of every error edgefleet raises on purpose."""


class UsageError(EdgefleetError):
    """An API or command was used wrongly; a bug or a bad operator request."""


class RejectedError(EdgefleetError):
    """Untrusted input failed a check.

    Attributes:
        reason: machine-readable reason, reported in events and state.
        detail: what exactly was wrong, for people.
    """

    def __init__(self, reason: Reason, detail: str) -> None:
        # Details quote untrusted input (topics, field names, key ids): bounded here so
        # that reporting a rejection can never fail on its size.
        detail = bound_text(detail)
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class MalformedPayloadError(RejectedError):
    """Bytes that are too large, not msgpack, or not of the expected schema."""


class SignatureError(RejectedError):
    """A signed envelope was unsigned, signed by an unknown key, or forged."""


class PolicyError(RejectedError):
    """Verified content that must not be applied: wrong class, replayed, expired."""


class ArtifactError(RejectedError):
    """Model bytes that do not match what a verified manifest names, or fail to load."""
