"""Golden sets made as an operator would: real held-out digits run through the very
model file with onnxruntime, outputs recorded as they came."""

from __future__ import annotations

import numpy as np

from models import INPUT_NAME, DemoModel, DigitsSplit, open_session
from models.export import LABEL_OUTPUT, PROBABILITIES_OUTPUT
from schemas import GoldenCase, GoldenSet, Tensor, Tolerance

TOLERANCE = Tolerance(atol=1e-5, rtol=1e-4)
"""For the probabilities; labels must match exactly."""


def golden_for(model: DemoModel, split: DigitsSplit, *, cases: int = 8) -> GoldenSet:
    """Single-digit cases, then one batch of all of them, from the held-out split."""
    session = open_session(model.path, intra_op_threads=1)
    rows = np.ascontiguousarray(split.x_holdout[:cases], dtype=np.float32)
    feeds = [rows[i : i + 1] for i in range(cases)] + [rows]
    made: list[GoldenCase] = []
    for pixels in feeds:
        probabilities, labels = session.run(
            [PROBABILITIES_OUTPUT, LABEL_OUTPUT], {INPUT_NAME: pixels}
        )
        made.append(
            GoldenCase(
                inputs={INPUT_NAME: Tensor.of(pixels)},
                outputs={
                    PROBABILITIES_OUTPUT: Tensor.of(np.asarray(probabilities)),
                    LABEL_OUTPUT: Tensor.of(np.asarray(labels)),
                },
            )
        )
    return GoldenSet(
        model_sha256=model.sha256,
        cases=tuple(made),
        tolerances={PROBABILITIES_OUTPUT: TOLERANCE},
        source=f"sklearn digits, held-out split seed {split.seed}, rows 0..{cases - 1}",
    )


def with_output(golden: GoldenSet, case: int, output: str, tensor: Tensor) -> GoldenSet:
    """``golden`` with one expected output of one case replaced."""
    changed = golden.cases[case].model_copy(
        update={"outputs": {**golden.cases[case].outputs, output: tensor}}
    )
    cases = (*golden.cases[:case], changed, *golden.cases[case + 1 :])
    return golden.model_copy(update={"cases": cases})
