"""Models for the command line: the built-in default, a saved ``.keras`` file, or a
factory named ``package.module:function``.

The default is a small MLP sized from the data: its input takes the rows of ``x`` (any
numeric dtype, standardised by a ``Normalization`` layer fitted on a sample), and its head is
chosen from ``y``: integer labels give softmax classification with ``accuracy``, float
rows give regression with ``mae``.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import numpy as np

from pipetrain.errors import InputError
from pipetrain.source import H5Source, SourceError

SAMPLE_ROWS = 4096  # rows the default model's input normalisation is fitted on


class ModelError(InputError):
    """A model that cannot be loaded or built, said in one line."""


def label_classes(source: H5Source, name: str) -> int:
    """Number of classes of an integer label dataset: its largest value + 1, scanned
    block by block (memory stays bounded)."""
    top = -1
    for f, rows in enumerate(source.rows_per_file):
        step = 1 << 20
        for start in range(0, rows, step):
            arrays, _ = source.read(f, start, min(rows, start + step), names=[name])
            labels = arrays[name]
            if labels.size:
                if labels.min() < 0:
                    raise SourceError(f"{source.paths[f]}: dataset '{name}' has negative labels")
                top = max(top, int(labels.max()))
    return top + 1


def default_model(source: H5Source, learning_rate: float = 3e-3):
    """A compiled MLP for ``source`` (one x dataset, one y dataset)."""
    import keras

    if not isinstance(source.x, str) or not isinstance(source.y, str):
        raise ModelError("the default model takes one x and one y dataset; pass --model for others")
    x, y = source.fields[source.x], source.fields[source.y]
    # Standardise the inputs with the mean and spread of a sample of rows.
    sample, _ = source.read(0, 0, min(source.rows_per_file[0], SAMPLE_ROWS))
    scale = keras.layers.Normalization(axis=None)
    scale.adapt(sample[source.x].astype("float32"))
    layers = [keras.Input(x.row_shape, name=source.x), scale]
    if len(x.row_shape) > 1:
        layers.append(keras.layers.Flatten())
    layers.append(keras.layers.Dense(128, activation="relu"))
    if y.dtype.kind in "ui" and y.row_shape in ((), (1,)):
        classes = label_classes(source, source.y)
        layers.append(keras.layers.Dense(max(2, classes), activation="softmax"))
        loss, metrics = "sparse_categorical_crossentropy", ["accuracy"]
    else:
        layers.append(keras.layers.Dense(int(np.prod(y.row_shape, dtype=int)) or 1))
        if len(y.row_shape) > 1:
            layers.append(keras.layers.Reshape(y.row_shape))
        loss, metrics = "mse", ["mae"]
    model = keras.Sequential(layers, name="pipetrain_mlp")
    model.compile(keras.optimizers.Adam(learning_rate), loss, metrics=metrics)
    return model


def load_model(spec: str, source: H5Source):
    """A compiled model from ``FILE.keras`` (loaded in Keras' safe mode: no code from the
    file runs) or from ``package.module:function`` (called with the source if it takes
    an argument, else with none)."""
    import keras

    path = Path(spec)
    if spec.endswith(".keras") or path.exists():
        if not path.is_file():
            raise ModelError(f"{spec}: no such model file")
        try:
            model = keras.saving.load_model(path, safe_mode=True)
        except Exception as e:
            reason = " ".join(str(e).split())
            if "safe_mode" in reason or "lambda" in reason.lower():
                reason = "loading it would run code stored in the file, which safe mode refuses: " + reason
            raise ModelError(f"{spec}: cannot load the model: {reason[:400]}") from None
    elif ":" in spec:
        module_name, _, func_name = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ModelError(f"--model {spec}: cannot import {module_name}: {e}") from None
        factory = getattr(module, func_name, None)
        if not callable(factory):
            raise ModelError(f"--model {spec}: {module_name} has no function {func_name!r}")
        takes_source = bool(inspect.signature(factory).parameters)
        model = factory(source) if takes_source else factory()
    else:
        raise ModelError(f"--model {spec}: expected FILE.keras or package.module:function")
    if getattr(model, "optimizer", None) is None or not getattr(model, "compiled", True):
        raise ModelError(f"--model {spec}: the model is not compiled (compile it before saving or returning it)")
    return model
