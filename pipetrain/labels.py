"""Class labels against the model that trains on them: which target datasets hold class
numbers for a sparse categorical loss, and how many classes the model's output has.

A label outside ``0..classes-1`` fails differently on each backend: TensorFlow raises
an op error of some 2,800 characters, torch a bare ``RuntimeError``, and JAX none at
all (the one-hot row is zeros: the loss quietly ignores the row). So the check is made
on the data instead, where it is cheap: :meth:`pipetrain.H5Source.limit_labels` keeps
the limits this module finds, and every read of those datasets (in the producer
threads, a ``min``/``max`` over a block of labels) names the file, dataset and row of a
label out of range.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

_SPARSE = {"sparse_categorical_crossentropy", "sparsecategoricalcrossentropy", "sparse_categorical_focal_crossentropy",
           "sparsecategoricalfocalcrossentropy"}


@dataclass(frozen=True)
class LabelLimit:
    """Labels of a target dataset must lie in ``0..classes-1`` (or equal ``ignore``)."""

    classes: int
    output: str  # the model's output the labels are for, for messages
    loss: str
    ignore: int | None = None

    def describe(self) -> str:
        return f"the model's output '{self.output}' has {self.classes} classes ({self.loss} takes labels 0-{self.classes - 1})"


def _loss_name(loss) -> tuple[str, int | None]:
    """A loss's name (lower case, no separators) and its ignore_class, if any."""
    if isinstance(loss, str):
        return loss.lower(), None
    name = getattr(loss, "name", None) or getattr(loss, "__name__", None) or type(loss).__name__
    fn = getattr(loss, "fn", None)  # a LossFunctionWrapper names its function
    if fn is not None and getattr(fn, "__name__", "").lower() in _SPARSE:
        name = fn.__name__
    config = getattr(loss, "_fn_kwargs", None) or {}
    ignore = getattr(loss, "ignore_class", None)
    if ignore is None:
        ignore = config.get("ignore_class")
    return str(name).lower(), ignore


def _output_name(tensor, i: int) -> str:
    """The name of the layer that makes an output (a Sequential model has no
    output_names, and its tensors' own names, "keras_tensor_2", are found nowhere)."""
    layer = getattr(getattr(tensor, "_keras_history", None), "operation", None)
    return getattr(layer, "name", None) or getattr(tensor, "name", f"output_{i}")


def sparse_label_limits(model, y) -> dict[str, LabelLimit]:
    """Per target dataset name: the label limit of the model's output it feeds, for the
    outputs whose loss takes class numbers (sparse categorical). Empty when the model's
    outputs or loss cannot be read (a subclassed model not built yet, a custom loss)."""
    if y is None:
        return {}
    outputs = list(getattr(model, "outputs", None) or [])
    names = list(getattr(model, "output_names", None) or [_output_name(t, i) for i, t in enumerate(outputs)])
    if not outputs or len(names) != len(outputs):
        return {}
    loss = getattr(model, "loss", None)
    if isinstance(y, str):
        pairs = [(y, 0)] if len(outputs) == 1 else []
    elif isinstance(y, Mapping):
        pairs = [(dataset, names.index(key)) for key, dataset in y.items() if key in names]
    else:
        pairs = [(dataset, i) for i, dataset in enumerate(y) if i < len(outputs)]
    limits = {}
    for dataset, index in pairs:
        if isinstance(loss, Mapping):
            this = loss.get(names[index])
        elif isinstance(loss, (list, tuple)):
            this = loss[index] if index < len(loss) else None
        else:
            this = loss
        if this is None:
            continue
        name, ignore = _loss_name(this)
        if name.replace("_", "") not in {s.replace("_", "") for s in _SPARSE}:
            continue
        classes = outputs[index].shape[-1]
        if classes is None:
            continue
        limits[dataset] = LabelLimit(int(classes), str(names[index]), name, ignore)
    return limits
