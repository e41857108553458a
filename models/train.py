"""Deterministic training of the demo classifiers on the bundled digits data.

Both classifiers are reduced to the same plain representation, a stack of dense layers
(``y = act(x @ weight + bias)``) whose last layer yields logits, so :mod:`models.export`
needs no scikit-learn knowledge. Recipes are frozen dataclasses; :func:`recipe_dict`
turns one into JSON-able data that the zoo records to decide whether a file is stale.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier

from models.datasets import N_CLASSES, N_FEATURES, DigitsSplit

__all__ = [
    "DenseLayer",
    "LogRegRecipe",
    "MLPRecipe",
    "TrainedClassifier",
    "recipe_dict",
    "train_logreg",
    "train_mlp",
]

Activation = Literal["identity", "relu"]


@dataclass(frozen=True)
class LogRegRecipe:
    """Multinomial logistic regression (lbfgs, L2) hyper-parameters."""

    c: float = 1.0
    max_iter: int = 2000


@dataclass(frozen=True)
class MLPRecipe:
    """One-hidden-layer ReLU MLP trained with Adam; ``random_state`` makes it deterministic."""

    hidden_units: int = 128
    alpha: float = 1e-4
    tol: float = 1e-3
    max_iter: int = 1000
    random_state: int = 0


@dataclass(frozen=True, eq=False)
class DenseLayer:
    """``act(x @ weight + bias)``; ``weight`` is ``(in, out)`` float32, ``bias`` is ``(out,)``."""

    weight: npt.NDArray[np.float32]
    bias: npt.NDArray[np.float32]
    activation: Activation


@dataclass(frozen=True, eq=False)
class TrainedClassifier:
    """A fitted scikit-learn estimator and its weights as dense layers (last one = logits)."""

    estimator: Any
    layers: tuple[DenseLayer, ...]


def recipe_dict(recipe: LogRegRecipe | MLPRecipe) -> dict[str, Any]:
    """JSON-able description of a training recipe, tagged with its kind."""
    return {"kind": type(recipe).__name__, **dataclasses.asdict(recipe)}


def train_logreg(split: DigitsSplit, recipe: LogRegRecipe | None = None) -> TrainedClassifier:
    """Fit multinomial logistic regression on ``split.x_train`` (a fraction of a second)."""
    r = recipe or LogRegRecipe()
    clf = LogisticRegression(C=r.c, max_iter=r.max_iter)
    clf.fit(split.x_train, split.y_train)
    _check_classes(clf)
    layer = DenseLayer(
        weight=_f32(np.asarray(clf.coef_).T),
        bias=_f32(np.asarray(clf.intercept_)),
        activation="identity",
    )
    _check_shapes((layer,))
    return TrainedClassifier(estimator=clf, layers=(layer,))


def train_mlp(split: DigitsSplit, recipe: MLPRecipe | None = None) -> TrainedClassifier:
    """Fit a ``64 -> hidden (ReLU) -> 10 (softmax)`` MLP on ``split.x_train`` (about a second)."""
    r = recipe or MLPRecipe()
    clf = MLPClassifier(
        hidden_layer_sizes=(r.hidden_units,),
        activation="relu",
        solver="adam",
        alpha=r.alpha,
        tol=r.tol,
        max_iter=r.max_iter,
        random_state=r.random_state,
    )
    clf.fit(split.x_train, split.y_train)
    _check_classes(clf)
    if clf.out_activation_ != "softmax":
        raise RuntimeError(f"unexpected MLP output activation {clf.out_activation_!r}")
    hidden = DenseLayer(
        weight=_f32(clf.coefs_[0]), bias=_f32(clf.intercepts_[0]), activation="relu"
    )
    output = DenseLayer(
        weight=_f32(clf.coefs_[1]), bias=_f32(clf.intercepts_[1]), activation="identity"
    )
    _check_shapes((hidden, output))
    return TrainedClassifier(estimator=clf, layers=(hidden, output))


def _f32(arr: Any) -> npt.NDArray[np.float32]:
    return np.ascontiguousarray(arr, dtype=np.float32)


def _check_classes(clf: Any) -> None:
    # The exported graph returns argmax indices as labels, valid only if classes_ == 0..9.
    if not np.array_equal(np.asarray(clf.classes_), np.arange(N_CLASSES)):
        raise RuntimeError(f"expected classes 0..{N_CLASSES - 1}, got {clf.classes_!r}")


def _check_shapes(layers: tuple[DenseLayer, ...]) -> None:
    width = N_FEATURES
    for layer in layers:
        if layer.weight.shape[0] != width or layer.bias.shape != (layer.weight.shape[1],):
            raise RuntimeError(f"inconsistent layer shapes {layer.weight.shape}/{layer.bias.shape}")
        width = layer.weight.shape[1]
    if width != N_CLASSES:
        raise RuntimeError(f"classifier ends with width {width}, expected {N_CLASSES}")
