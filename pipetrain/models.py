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
import os
import re
import sys
from pathlib import Path

import numpy as np

from pipetrain.errors import InputError
from pipetrain.source import H5Source, SourceError

SAMPLE_ROWS = 4096  # rows the default model's input normalisation is fitted on
MAX_CLASSES = 1 << 20  # labels above this are not class numbers the default model can take


class ModelError(InputError):
    """A model that cannot be loaded or built, said in one line."""


def _label_blocks(source: H5Source, name: str):
    """(file, first row, labels) of a label dataset, 2**20 rows at a time (memory stays
    bounded)."""
    step = 1 << 20
    for f, rows in enumerate(source.rows_per_file):
        for start in range(0, rows, step):
            arrays, _ = source.read(f, start, min(rows, start + step), names=[name])
            yield f, start, arrays[name].reshape(-1)


def label_classes(source: H5Source, name: str, check=None) -> int:
    """Number of classes of an integer label dataset: its largest value + 1, scanned
    block by block. Negative labels, and labels too large to be class numbers, are
    refused naming the file, dataset and row; ``check(file, start, labels)``, when given,
    sees each block first."""
    top = -1
    for f, start, labels in _label_blocks(source, name):
        if check is not None:
            check(f, start, labels)
        if not labels.size:
            continue
        low, high = labels.min(), labels.max()
        if low < 0 or high >= MAX_CLASSES:
            row = int(np.flatnonzero((labels < 0) | (labels >= MAX_CLASSES))[0])
            value = labels[row]
            why = ("class labels cannot be negative" if value < 0 else
                   f"the default model takes class numbers 0 to {MAX_CLASSES - 1:,}")
            raise SourceError(
                f"{source.paths[f]}: dataset '{name}' row {start + row} holds label {value}; {why} (or pass --model)"
            )
        top = max(top, int(high))
    return top + 1


def _check_below(source: H5Source, name: str, classes: int, train: H5Source) -> None:
    """Labels of ``source`` are classes of the default model sized from ``train``."""

    def whole_numbers(f: int, start: int, labels: np.ndarray) -> None:  # (a NaN made label_classes fail)
        bad = np.flatnonzero(~np.isfinite(labels) | (labels != np.round(labels)))
        if bad.size:
            raise ModelError(
                f"{source.paths[f]}: dataset '{name}' row {start + int(bad[0])} holds label {labels[bad[0]]}, "
                f"which is not a class number (the default model classifies, sized from the integer labels "
                f"of {train.paths[0]})"
            )

    if label_classes(source, name, whole_numbers if source.fields[name].dtype.kind == "f" else None) <= classes:
        return
    for f, start, labels in _label_blocks(source, name):
        over = np.flatnonzero(labels >= classes)
        if over.size:
            raise ModelError(
                f"{source.paths[f]}: dataset '{name}' row {start + int(over[0])} holds label {labels[over[0]]}, "
                f"but the default model has {classes} classes (sized from the labels of {train.paths[0]})"
            )


def _check_finite(source: H5Source, sample) -> None:
    """The rows the default model's normalisation adapts on hold no NaN or infinity
    (one would make every statistic NaN, and the whole run learn nothing)."""
    if sample.dtype.kind != "f":
        return
    finite = np.isfinite(sample.reshape(len(sample), -1)).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        value = sample.reshape(len(sample), -1)[row][~np.isfinite(sample.reshape(len(sample), -1)[row])][0]
        raise ModelError(
            f"{source.paths[0]}: dataset '{source.x}' row {row} holds {value}; the default model "
            f"standardises its input with the first {len(sample):,} rows, which must be finite "
            "(fix the data, or pass --model)"
        )


def layer_name(dataset: str) -> str:
    """A Keras layer name for a dataset name: groups (``/a/b/x``) joined by ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset.strip("/")) or "x"


def default_model(source: H5Source, learning_rate: float = 3e-3, validation: H5Source | None = None):
    """A compiled MLP for ``source`` (one x dataset, one y dataset). Integer labels of
    ``validation`` above the training labels' classes are refused before training."""
    import keras

    if not isinstance(source.x, str) or not isinstance(source.y, str):
        raise ModelError("the default model takes one x and one y dataset; pass --model for others")
    x, y = source.fields[source.x], source.fields[source.y]
    # Standardise the inputs with the mean and spread of a sample of rows.
    sample, _ = source.read(0, 0, min(source.rows_per_file[0], SAMPLE_ROWS), names=[source.x])
    _check_finite(source, sample[source.x])
    scale = keras.layers.Normalization(axis=None)
    scale.adapt(sample[source.x].astype("float32"))
    layers = [keras.Input(x.row_shape, name=layer_name(source.x)), scale]
    if len(x.row_shape) > 1:
        layers.append(keras.layers.Flatten())
    elif not x.row_shape:  # one number a row (x of shape (rows,)): Dense needs a feature axis
        layers.append(keras.layers.Reshape((1,)))
    layers.append(keras.layers.Dense(128, activation="relu"))
    if y.dtype.kind in "ui" and y.row_shape in ((), (1,)):
        classes = label_classes(source, source.y)
        if validation is not None and isinstance(validation.y, str):
            _check_below(validation, validation.y, max(2, classes), source)
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


def load_model(spec: str, source: H5Source, *, unsafe: bool = False, folders=()):
    """A compiled model from ``FILE.keras`` (loaded in Keras' safe mode: no code from the
    file runs, unless ``unsafe``) or from ``package.module:function`` (called with the
    source if it has a parameter without a default, else with none), imported as ``python -m`` would:
    from the current folder first, then ``folders`` (where a resumed run was started)."""
    import keras

    path = Path(spec)
    if spec.endswith(".keras") or path.exists():
        if path.is_dir():
            raise ModelError(f"{spec}: a folder, not a model file")
        if not path.is_file():
            raise ModelError(f"{spec}: no such model file")
        try:
            model = keras.saving.load_model(path, safe_mode=not unsafe)
        except Exception as e:
            reason = " ".join(str(e).split())
            if "safe_mode" in reason or "unsafe_deserialization" in reason:
                raise ModelError(
                    f"{spec}: cannot load the model: it holds Python code (a Lambda layer's function), "
                    "which would run as it loads; if you trust the file, pass --unsafe-model"
                ) from None
            raise ModelError(f"{spec}: cannot load the model: {_shorten(reason)}") from None
    elif ":" in spec and all(spec.partition(":")[::2]):
        module_name, _, func_name = spec.partition(":")
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # as `python -m` has it; the console script does not
        sys.path.extend(f for f in folders if f and f not in sys.path)
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ModelError(f"--model {spec}: cannot import {module_name}: {e}") from None
        factory = getattr(module, func_name, None)
        if not callable(factory):
            raise ModelError(f"--model {spec}: {module_name} has no function {func_name!r}")
        parameters = inspect.signature(factory).parameters
        required = [p.name for p in parameters.values()
                    if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(required) > 1:
            raise ModelError(f"--model {spec}: {func_name}() takes {len(required)} arguments "
                             f"({', '.join(required)}); a model function takes none, or the data source")
        try:  # (parameters with defaults are the function's own settings: the source is not one)
            model = factory(source) if required else factory()
        except SystemExit as e:  # (it ended pipetrain with its code, silently)
            raise ModelError(f"--model {spec}: {func_name}() exited (SystemExit({e.code!r})) instead of "
                             "returning a model") from None
        except Exception as e:  # (said as "training failed: <its message>", naming neither --model nor the function)
            from pipetrain.distributed import collective_failed

            if collective_failed(e):  # another process was lost meanwhile: said as such (naming it), not the model's
                raise
            raise ModelError(f"--model {spec}: {func_name}() raised {type(e).__name__}: {_shorten(' '.join(str(e).split()))}") from e
    else:
        raise ModelError(f"--model {spec}: expected FILE.keras or package.module:function")
    if not isinstance(model, keras.Model):
        raise ModelError(f"--model {spec}: gave {type(model).__name__}, not a Keras model")
    if getattr(model, "optimizer", None) is None or not getattr(model, "compiled", True):
        raise ModelError(f"--model {spec}: the model is not compiled (compile it before saving or returning it)")
    return model


def _shorten(text: str, limit: int = 600) -> str:
    """At most ``limit`` characters, cut after a whole sentence or word, never mid-word."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    end = max(cut.rfind(". "), cut.rfind("; "))
    cut = cut[: end + 1] if end > limit // 2 else cut[: cut.rfind(" ")]
    return cut.rstrip() + " …"
