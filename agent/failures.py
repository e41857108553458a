"""What a failed update tells, sans-IO: the device's last rejection, its event, its log.

A failure is a verdict on the release when the release itself is bad (``rejected``: it
does not load or fails its self-test): the engine reports it unhealthy and does not try it
again in its scope. Any other failure is retried after a backoff: bytes that did not
arrive in time (``timeout``) or did not match (``refetch``: unsigned, so never a verdict),
or the agent's own trouble (``error``). See :class:`agent.events.FailureKind`.
"""

from __future__ import annotations

import logging

from agent.events import Command, Desired, Emit, Failure, FailureKind, Log, Note
from agent.limits import Limits
from schemas import EventKind, Reason, Release
from schemas.errors import bound_text

__all__ = ["told", "unloadable"]


def told(failure: Failure, release: Release, desired: Desired, limits: Limits) -> list[Command]:
    """What the failure of the update to ``release`` (towards ``desired``) tells."""
    detail = failure.detail
    if failure.kind is FailureKind.ERROR:
        return [Log(logging.ERROR, f"update to {release.release_id} failed: {detail}")]
    if failure.kind is FailureKind.REJECTED:
        kind, reason = EventKind.ARTIFACT_REJECTED, failure.reason
    elif failure.kind is FailureKind.TIMEOUT:
        kind, reason = EventKind.ARTIFACT_REJECTED, Reason.FETCH_TIMEOUT
        detail = f"{detail}; retrying"
    else:
        kind, reason = EventKind.ARTIFACT_RETRY, failure.reason
        detail = f"{detail}; dropped, fetching again"
    assert reason is not None
    return [
        Note(reason, bound_text(detail, limits.rejection_detail_chars)),
        Emit(kind, reason, bound_text(detail, limits.event_detail_chars), desired),
    ]


def unloadable(release: Release, failure: Failure) -> str:
    """Why no model serves, when the first one a device gets is rejected."""
    return f"model: {release.release_id} {failure.reason}: {failure.detail}"
