"""Signing and storing each class's manifest as :mod:`coordinator.manifests` derives it.

The seq is stored before the manifest is published; a store behind the broker first
continues above the seq the broker retains (:meth:`Signer.recover`).
"""

from __future__ import annotations

import logging

from pydantic import ValidationError

from coordinator import manifests
from coordinator.core import Core, describe
from coordinator.manifests import RecoveryKind
from coordinator.store import ClassRecord
from schemas import RejectedError

__all__ = ["Signer"]

log = logging.getLogger(__name__)


class Signer:
    def __init__(self, core: Core) -> None:
        self._core = core

    async def sync(self) -> None:
        """Publish a new manifest for every class whose content changed or whose
        manifest nears expiry.

        Callers (ticks, new specs, re-asserts on connect) run concurrently: unserialised,
        two of them would both take ``seq + 1`` and publish different manifests under it.
        """
        async with self._core.sync_lock:
            changed = await self._store_changed()
        # Published outside the lock: a PUBACK can take its full timeout while the link
        # is down, and an operator's abort must not wait on that.
        for name in changed:
            await self._core.publish_manifest(name)

    async def _store_changed(self) -> list[str]:
        """Store a new manifest for every class that needs one; their names."""
        core = self._core
        changed: list[str] = []
        now = core.clock()
        for name, profile in core.config.profiles.items():
            current = core.classes.get(name, ClassRecord(name=name))
            try:
                planned = manifests.plan(
                    current, list(core.rollouts.values()), profile.manifest_ttl_s, now
                )
                if planned is None:
                    continue
                record = manifests.sign(current, planned, core.config.manifest_key)
            except (ValidationError, ValueError, KeyError, RejectedError) as exc:
                # One class's manifest that cannot be built must not stop the others'
                # (nor, at every start, the coordinator).
                log.error("coordinator: %s manifest not built: %s", name, describe(exc))
                continue
            await core.put_class(record)
            log.info("coordinator: %s manifest seq %d", name, record.seq)
            changed.append(name)
        return changed

    async def recover(self) -> None:
        """Before publishing anything: continue above the retained seq of every class
        when the store is behind the broker (a new or lost store)."""
        core = self._core
        trust = core.trusted.trust
        if trust is None:
            return
        async with core.sync_lock:
            for name, payload in list(core.retained_manifests.items()):
                retained = manifests.read_retained(payload, trust)
                if retained is None:
                    continue  # not ours: the re-assert replaces it
                current = core.classes.get(name, ClassRecord(name=name))
                recovery = manifests.recover(current, retained)
                if recovery.kind is RecoveryKind.EXHAUSTED:
                    # Devices that took it wait for a rotated manifest key.
                    log.error(
                        "coordinator: the broker holds %s manifest seq %d, the last there is: "
                        "not continuing above it; rotate the manifest key (a new TrustDoc)",
                        name,
                        retained.seq,
                    )
                elif recovery.kind is RecoveryKind.CONTINUE:
                    log.warning(
                        "coordinator: the broker holds %s manifest seq %d, the store only "
                        "seq %d (a new or lost store): continuing above it",
                        name,
                        retained.seq,
                        current.seq,
                    )
                    await core.put_class(recovery.record)
                    await core.audit(
                        "seq_recovered", "", f"{name}: continuing above retained seq {retained.seq}"
                    )
