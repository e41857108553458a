"""Opening a model on the execution providers a release asks for, in order.

Theory of operation. A release's runtime lists the providers its class should run on,
most wanted first (``TensorrtExecutionProvider``, ``CUDAExecutionProvider``,
``CPUExecutionProvider``). The agent tries them one at a time: a provider this
onnxruntime build does not have is passed over, one that fails to open the model is
passed over, and onnxruntime's own silent fall back (it registers the CPU provider
when the one asked for cannot start) counts as a failure of that provider too. The
first that opens the model serves it. CPU is the last resort even when the list
leaves it out.

A model served by anything but the first provider on the list serves *degraded*: the
device runs, slower or less proven than its class expects, and says why in its
retained state (:attr:`Opened.fallback`). A release whose runtime says
``on_fallback = "refuse"`` treats that as a load failure instead (the device keeps the
model it served). A device may override its class's list (``AgentConfig.providers``):
one pinned to the CPU while its accelerator is repaired, or a simulated device running
on its host's CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import onnxruntime as ort

from schemas import ArtifactError, Reason
from schemas.errors import bound_text

__all__ = ["CPU", "Opened", "open_session"]

CPU: Final = "CPUExecutionProvider"
_REASON_CHARS: Final = 300
_ERROR_CHARS: Final = 120
"""How much of one provider's error a reason keeps (several may be told together)."""


@dataclass(frozen=True, slots=True)
class Opened:
    session: ort.InferenceSession
    provider: str
    """The provider that serves the model."""
    fallback: str | None
    """Why it is not the first one asked for (None: it is): what failed, what serves."""


def _attempt(path: Path, options: ort.SessionOptions, provider: str) -> ort.InferenceSession:
    """A session on ``provider`` alone.

    Raises:
        RuntimeError: onnxruntime refused the model on it, or registered another
            provider in its place.
    """
    try:
        session = ort.InferenceSession(str(path), options, providers=[provider])
    except Exception as exc:  # onnxruntime raises bare Fail/InvalidGraph/RuntimeError
        raise RuntimeError(bound_text(str(exc), _ERROR_CHARS)) from exc
    got = session.get_providers()
    if not got or got[0] != provider:
        msg = f"onnxruntime fell back to {', '.join(got) or 'nothing'}"
        raise RuntimeError(msg)
    return session


def open_session(
    path: Path,
    options: ort.SessionOptions,
    wanted: Sequence[str],
    *,
    available: Sequence[str] | None = None,
) -> Opened:
    """Open the model at ``path`` on the first provider of ``wanted`` that takes it,
    CPU last; ``available`` defaults to what this onnxruntime build has.

    Raises:
        ArtifactError: MODEL_LOAD_FAILED, saying what each provider answered, when
            none opens the model.
    """
    have = set(ort.get_available_providers() if available is None else available)
    tried: list[str] = []
    order = [*dict.fromkeys(wanted)]
    if CPU not in order:
        order.append(CPU)
    for provider in order:
        if provider not in have:
            tried.append(f"{provider}: not in this onnxruntime build")
            continue
        try:
            session = _attempt(path, options, provider)
        except RuntimeError as exc:
            tried.append(f"{provider}: {exc}")
            continue
        fallback = None
        if provider != order[0]:
            fallback = bound_text(f"{'; '.join(tried)}; serving on {provider}", _REASON_CHARS)
        return Opened(session=session, provider=provider, fallback=fallback)
    raise ArtifactError(Reason.MODEL_LOAD_FAILED, bound_text("; ".join(tried), _REASON_CHARS))
