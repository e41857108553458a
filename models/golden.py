"""Golden self-test vectors for one model build, made from real held-out inputs.

A device runs the cases on a freshly loaded build before it takes traffic
(:func:`schemas.golden_mismatches`). The cases are real rows the build is confident
about (a gap of at least :data:`MIN_MARGIN` between its top two class probabilities),
spread over the predicted classes: on such rows the label cannot flip from rounding
noise, so labels are compared exactly. Among those, the least saturated rows are taken,
where probabilities still reveal a changed computation; float outputs are compared
within tolerances chosen per precision (:data:`TOLERANCES`).

Each case is one row run alone (batch of 1), as devices serve.
"""

from __future__ import annotations

import hashlib
from typing import Final

import numpy as np
import numpy.typing as npt

from models.evaluate import Classifier
from models.precision import Precision
from schemas import GoldenCase, GoldenSet, Tensor, Tolerance

__all__ = ["DEFAULT_CASES", "MIN_MARGIN", "TOLERANCES", "make_golden"]

DEFAULT_CASES: Final = 16
MIN_MARGIN: Final = 0.5
"""Top-1 minus top-2 probability of a golden row: a label flip needs a 0.25 swing."""

TOLERANCES: Final[dict[Precision, Tolerance]] = {
    "fp32": Tolerance(atol=2e-5, rtol=1e-5),
    "fp16": Tolerance(atol=5e-3, rtol=5e-3),
    "int8": Tolerance(atol=1e-2, rtol=1e-2),
    "int8-dynamic": Tolerance(atol=1e-2, rtol=1e-2),
}
"""How far float outputs may move, per precision (probabilities lie in [0, 1], so atol
dominates). Measured on the demo models' golden rows (tests/models/test_models_golden.py
checks both sides): the same build run with onnxruntime's graph
optimisations off or on more threads moves probabilities by at most 2e-7 (fp32),
1e-6 (fp16) and 0 (int8: with 7-bit weights the integer kernels compute the QDQ
reference exactly), which leaves room for other CPUs' summation order and for GPU fp16
accumulation; another build of the same model moves them by 1e-4 to 3e-4 (fp16 vs fp32),
2e-2 to 6e-2 (an int8 build vs any other) and 0.45 or more (an int8 build calibrated on
data 40x out of range), so a set rejects builds other than its own."""


def make_golden(
    model: bytes,
    x: npt.NDArray[np.float32],
    *,
    precision: Precision,
    cases: int = DEFAULT_CASES,
    source: str = "",
) -> GoldenSet:
    """Golden vectors for ``model``: ``cases`` confident rows of ``x`` and all their outputs.

    Raises:
        ValueError: the model does not load, ``x`` does not fit its input, or ``cases``
            is not between 1 and the number of rows (at most 256).
    """
    if not 1 <= cases <= min(len(x), 256):
        raise ValueError(f"cases must be between 1 and min(rows, 256), got {cases}/{len(x)}")
    classifier = Classifier(model)
    classifier.check_fits(x)
    chosen = _confident_rows(classifier, x, cases)
    made = []
    for index in chosen:
        row = np.ascontiguousarray(x[index : index + 1], dtype=np.float32)
        outputs = classifier.run(row)
        made.append(
            GoldenCase(
                inputs={classifier.input_name: Tensor.of(row)},
                outputs={name: Tensor.of(np.asarray(value)) for name, value in outputs.items()},
            )
        )
    floats = {name for name, value in made[0].outputs.items() if np.dtype(value.dtype).kind == "f"}
    return GoldenSet(
        model_sha256=hashlib.sha256(model).hexdigest(),
        cases=tuple(made),
        tolerances=dict.fromkeys(sorted(floats), TOLERANCES[precision]),
        source=source if len(source) <= 200 else "..." + source[-197:],
    )


def _confident_rows(classifier: Classifier, x: npt.NDArray[np.float32], cases: int) -> list[int]:
    """Row indices, taking each predicted class in turn.

    Rows whose top-two margin is at least :data:`MIN_MARGIN` come first, least saturated
    first: their label survives any rounding noise, while their probabilities still move
    when the computation changes (at a margin near 1 every build of a model gives the
    same probabilities to many decimals, and the check would prove little). Rows below
    the margin only fill up a set when too few rows qualify, most confident first.
    """
    # Row by row, as the cases are recorded: a batched run may round differently (other
    # kernels), and a row chosen at a margin of 0.5001 must not record 0.498.
    rows = [np.ascontiguousarray(x[i : i + 1], dtype=np.float32) for i in range(len(x))]
    labels = np.concatenate([classifier.labels(row) for row in rows])
    margin = np.ones(len(x), dtype=np.float64)
    if classifier.scores_output is not None:
        scores = np.vstack([classifier.scores(row) for row in rows]).astype(np.float64)
        if scores.shape[1] > 1:
            top = np.sort(scores, axis=1)
            margin = top[:, -1] - top[:, -2]
    eligible = margin >= MIN_MARGIN
    # Stable sorts on row order keep the choice deterministic.
    order = np.concatenate(
        [
            np.flatnonzero(eligible)[np.argsort(margin[eligible], kind="stable")],
            np.flatnonzero(~eligible)[np.argsort(-margin[~eligible], kind="stable")],
        ]
    )
    queues = [[int(i) for i in order if labels[i] == c] for c in np.unique(labels)]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < cases:
        chosen += [q[depth] for q in queues if depth < len(q)][: cases - len(chosen)]
        depth += 1
    return chosen
