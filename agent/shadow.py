"""Whether a shadow's answer agrees with the serving model's, as its budget measures it.

``label``: every row's label is the same: the first integer output (a classifier's
label), or else the argmax over the last axis of the first float output. ``distance``:
every value of the budget's ``output`` (the first float output when it names none) is
within ``tolerance`` of the serving model's. An answer without what is compared, or of
another shape, does not agree.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from agent.runtime import Outputs
from schemas import ShadowBudget

__all__ = ["agrees", "labels"]


def labels(outputs: Outputs) -> npt.NDArray[np.generic] | None:
    """Each row's label: the first integer output, else the argmax of the first float
    output over its last axis; None when there is neither."""
    for array in outputs.values():
        if array.dtype.kind in "iu":
            return array
    for array in outputs.values():
        if array.dtype.kind == "f" and array.ndim and array.shape[-1]:
            top: npt.NDArray[np.generic] = array.argmax(axis=-1)
            return top
    return None


def _first_float(outputs: Outputs) -> str | None:
    return next((name for name, a in outputs.items() if a.dtype.kind == "f"), None)


def agrees(served: Outputs, shadow: Outputs, budget: ShadowBudget) -> bool:
    """Whether ``shadow`` agrees with ``served`` (see the module's docstring)."""
    if budget.measure == "label":
        mine, theirs = labels(served), labels(shadow)
        return mine is not None and theirs is not None and np.array_equal(mine, theirs)
    name = budget.output or _first_float(served)
    mine_out, theirs_out = served.get(name or ""), shadow.get(name or "")
    if mine_out is None or theirs_out is None or mine_out.shape != theirs_out.shape:
        return False
    gap = np.abs(mine_out.astype(np.float64) - theirs_out.astype(np.float64))
    return bool((gap <= budget.tolerance).all())
