"""Deterministic training of the demo classifiers on the bundled data sets.

Every classifier is reduced to the same plain representation, a stack of dense layers
(``y = act(x @ weight + bias)``) whose last layer yields logits, optionally preceded by a
:class:`Standardizer`, so :mod:`models.export` needs no scikit-learn knowledge. Recipes are
frozen dataclasses; :func:`recipe_dict` turns one into JSON-able data that the zoo records
to decide whether a file is stale.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier

from models.datasets import Split

__all__ = [
    "DeepMLPRecipe",
    "DenseLayer",
    "LogRegRecipe",
    "MLPRecipe",
    "Standardizer",
    "TrainedClassifier",
    "recipe_dict",
    "train_deep_mlp",
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


@dataclass(frozen=True)
class DeepMLPRecipe:
    """ReLU MLP with any hidden layers, trained for exactly ``epochs`` passes of Adam.

    Training runs ``partial_fit`` once per epoch: no convergence test, so the cost is known
    up front and no convergence warning is raised. With ``standardize`` the network is
    trained on features standardised with the training split's mean and standard
    deviation, and the exported graph standardises raw inputs itself.
    """

    hidden_layers: tuple[int, ...] = (1024, 1024)
    epochs: int = 12
    batch_size: int = 128
    learning_rate: float = 1e-3
    alpha: float = 1e-4
    standardize: bool = False
    random_state: int = 0

    def __post_init__(self) -> None:
        if not self.hidden_layers or min(self.hidden_layers) < 1:
            raise ValueError(f"hidden layers must be positive widths, got {self.hidden_layers}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be positive")


@dataclass(frozen=True, eq=False)
class DenseLayer:
    """``act(x @ weight + bias)``; ``weight`` is ``(in, out)`` float32, ``bias`` is ``(out,)``."""

    weight: npt.NDArray[np.float32]
    bias: npt.NDArray[np.float32]
    activation: Activation


@dataclass(frozen=True, eq=False)
class Standardizer:
    """``(x - mean) / scale`` per feature, both float32 ``(features,)``."""

    mean: npt.NDArray[np.float32]
    scale: npt.NDArray[np.float32]

    @classmethod
    def fit(cls, x: npt.NDArray[np.float32]) -> Standardizer:
        """Mean and standard deviation of each column (a constant column gets scale 1)."""
        wide = np.asarray(x, dtype=np.float64)
        std = wide.std(axis=0)
        return cls(mean=_f32(wide.mean(axis=0)), scale=_f32(np.where(std > 0.0, std, 1.0)))

    def apply(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Standardise in float32, exactly as the exported graph's ``Sub`` and ``Div`` do."""
        return _f32((np.asarray(x, dtype=np.float32) - self.mean) / self.scale)


@dataclass(frozen=True, eq=False)
class TrainedClassifier:
    """A fitted scikit-learn estimator and its weights as dense layers (last one = logits).

    With a ``standardizer``, the estimator was fitted on ``standardizer.apply(x)``.
    """

    estimator: Any
    layers: tuple[DenseLayer, ...]
    standardizer: Standardizer | None = None


def recipe_dict(recipe: LogRegRecipe | MLPRecipe | DeepMLPRecipe) -> dict[str, Any]:
    """JSON-able description of a training recipe, tagged with its kind."""
    return {"kind": type(recipe).__name__, **dataclasses.asdict(recipe)}


def train_logreg(split: Split, recipe: LogRegRecipe | None = None) -> TrainedClassifier:
    """Fit multinomial logistic regression on ``split.x_train`` (a fraction of a second)."""
    r = recipe or LogRegRecipe()
    clf = LogisticRegression(C=r.c, max_iter=r.max_iter)
    clf.fit(split.x_train, split.y_train)
    _check_classes(clf, split)
    layer = DenseLayer(
        weight=_f32(np.asarray(clf.coef_).T),
        bias=_f32(np.asarray(clf.intercept_)),
        activation="identity",
    )
    _check_shapes((layer,), split)
    return TrainedClassifier(estimator=clf, layers=(layer,))


def train_mlp(split: Split, recipe: MLPRecipe | None = None) -> TrainedClassifier:
    """Fit a ``features -> hidden (ReLU) -> classes`` MLP on ``split.x_train`` (about a second)."""
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
    layers = _mlp_layers(clf, split)
    return TrainedClassifier(estimator=clf, layers=layers)


def train_deep_mlp(split: Split, recipe: DeepMLPRecipe | None = None) -> TrainedClassifier:
    """Fit a ReLU MLP for ``recipe.epochs`` Adam epochs on (optionally standardised) x_train."""
    r = recipe or DeepMLPRecipe()
    standardizer = Standardizer.fit(split.x_train) if r.standardize else None
    x = split.x_train if standardizer is None else standardizer.apply(split.x_train)
    clf = MLPClassifier(
        hidden_layer_sizes=r.hidden_layers,
        activation="relu",
        solver="adam",
        alpha=r.alpha,
        batch_size=r.batch_size,
        learning_rate_init=r.learning_rate,
        random_state=r.random_state,
    )
    classes = np.arange(_n_classes(split))
    for _ in range(r.epochs):
        clf.partial_fit(x, split.y_train, classes=classes)
    return TrainedClassifier(
        estimator=clf, layers=_mlp_layers(clf, split), standardizer=standardizer
    )


def _mlp_layers(clf: Any, split: Split) -> tuple[DenseLayer, ...]:
    _check_classes(clf, split)
    coefs = [_f32(w) for w in clf.coefs_]
    biases = [_f32(b) for b in clf.intercepts_]
    if clf.out_activation_ == "logistic":
        # Binary MLPs have one logistic output z; logits (0, z) give the same probabilities
        # under softmax (1 - sigmoid(z), sigmoid(z)), and ArgMax picks class 1 iff z > 0,
        # as scikit-learn's 0.5 threshold does.
        coefs[-1] = _f32(np.concatenate([np.zeros_like(coefs[-1]), coefs[-1]], axis=1))
        biases[-1] = _f32(np.concatenate([np.zeros_like(biases[-1]), biases[-1]]))
    elif clf.out_activation_ != "softmax":
        raise RuntimeError(f"unexpected MLP output activation {clf.out_activation_!r}")
    last = len(coefs) - 1
    layers = tuple(
        DenseLayer(weight=w, bias=b, activation="identity" if i == last else "relu")
        for i, (w, b) in enumerate(zip(coefs, biases, strict=True))
    )
    _check_shapes(layers, split)
    return layers


def _f32(arr: Any) -> npt.NDArray[np.float32]:
    return np.ascontiguousarray(arr, dtype=np.float32)


def _n_classes(split: Split) -> int:
    return int(split.y_train.max()) + 1


def _check_classes(clf: Any, split: Split) -> None:
    # The exported graph returns argmax indices as labels, valid only if classes_ == 0..k-1.
    n = _n_classes(split)
    if not np.array_equal(np.asarray(clf.classes_), np.arange(n)):
        raise RuntimeError(f"expected classes 0..{n - 1}, got {clf.classes_!r}")


def _check_shapes(layers: tuple[DenseLayer, ...], split: Split) -> None:
    width = split.x_train.shape[1]
    for layer in layers:
        if layer.weight.shape[0] != width or layer.bias.shape != (layer.weight.shape[1],):
            raise RuntimeError(f"inconsistent layer shapes {layer.weight.shape}/{layer.bias.shape}")
        width = layer.weight.shape[1]
    if width != _n_classes(split):
        raise RuntimeError(f"classifier ends with width {width}, expected {_n_classes(split)}")
