"""``train()``: the standard consumer loop, ``fit`` for data larger than memory.

It is one short loop on :class:`pipetrain.Run`: for each batch, ``train_on_batch``;
after each epoch, validation through ``test_on_batch``. Everything else (the producer
pool, timing, the history, the callbacks, the progress bar) is the run's, shared with
custom loops.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping

from pipetrain import distributed
from pipetrain.errors import RunError, argument
from pipetrain.labels import sparse_label_limits
from pipetrain.run import MAX_ROWS, Run, check_groups, evaluation_plan, whole_setting
from pipetrain.source import H5Source, SourceError


def train(
    model,
    source: H5Source,
    epochs: int = 1,
    batch_size: int = 32,
    validation: H5Source | None = None,
    callbacks=None,
    shuffle: str = "block",
    seed: int = 0,
    workers: int = 2,
    max_queue: int = 8,
    history: str | os.PathLike | None = None,
    verbose: int = 1,
    *,
    class_weight: Mapping[int, float] | None = None,
    validation_batch_size: int | None = None,
    max_queue_bytes: int | None = None,
    shuffle_window: int = 8192,
    drop_remainder: bool = False,
    partitions: int = 16,
    monitor_interval: float | None = 2.0,
    overwrite: bool = False,
    resume: bool | str = False,
    checkpoint_every: int | None = 1000,
    stop_on_nonfinite: bool = True,
    producer_priority: str = "idle",
    allow_changed_data: bool = False,
    config: Mapping | None = None,
    steps_per_execution: int = 1,
    device_prefetch: bool | str = "auto",
):
    """Train a compiled Keras model on an :class:`H5Source` with ``train_on_batch``.

    Returns a ``keras.callbacks.History``, as ``fit`` does, whose epoch metrics equal
    ``fit``'s for the same model, data, batch order and batch size (``shuffle="none"``
    is ``fit(shuffle=False)``), non-decomposable metrics and a partial last batch
    included; ``val_*`` equal ``model.evaluate`` on ``validation``.

    Args:
        model: a compiled Keras model.
        source: the training data.
        epochs: epochs to train. Defaults to 1.
        batch_size: rows per batch. Defaults to 32.
        validation: data to evaluate on after each epoch. Defaults to None.
        callbacks: Keras callbacks (EarlyStopping, ModelCheckpoint, ...). Defaults to None.
        shuffle: ``"block"`` (chunk-aligned blocks in random order, rows permuted within
            a window) or ``"none"`` (file order). Defaults to "block".
        seed: seed of the batch order. Defaults to 0.
        workers: producer threads. Defaults to 2.
        max_queue: batches prefetched. Defaults to 8.
        history: JSON Lines history file to append to. Defaults to None (none).
        verbose: 0 silent, 1 progress bar. Defaults to 1.
        class_weight: weights by class index, as in ``fit``. Defaults to None.
        validation_batch_size: defaults to ``batch_size``.
        resume: continue the run of ``history`` from its last checkpoint, at the exact
            next batch (the model must be built as it was; its weights, optimizer state
            and the epoch's metrics are restored); ``"auto"`` when a checkpoint exists.
            Defaults to False.
        allow_changed_data: resume although a data file changed since the run read it.
            Defaults to False.
        checkpoint_every: batches between checkpoints in the run folder, besides one at
            each epoch end. Defaults to 1000.
        stop_on_nonfinite: stop (status ``failed``) on a NaN or infinite loss. Defaults
            to True.
        steps_per_execution: batches trained per compiled call (see
            :mod:`pipetrain.fused`), as ``fit``'s argument of that name: epoch metrics
            stay exactly ``fit``'s; one batch record, one pair of batch callbacks and
            one signal check per group of k batches; checkpoints land between groups.
            Defaults to 1.
        device_prefetch: copy the next batch to the accelerator while the current one
            trains (see :mod:`pipetrain.device`); ``"auto"``: where there is one.
            Defaults to "auto".

    Other arguments are those of :class:`pipetrain.Run`.

    In a data-parallel run (JAX, ``keras.distribution``; see ``docs/distributed.md``)
    ``batch_size`` is the global batch: each process trains on its share, and the
    history, checkpoints and returned metrics are those of the whole run.

    Example::

        history = pipetrain.train(model, pipetrain.H5Source("train.h5", x="x", y="y"),
                                  epochs=10, batch_size=256, history="runs/a/history.jsonl")
        history.history["loss"]
    """
    if getattr(model, "optimizer", None) is None:
        raise ValueError("train(): the model is not compiled; call model.compile(...) first")
    for name, data in (("source", source), ("validation", validation)):
        if data is not None and not isinstance(data, H5Source):
            raise RunError(f"{name}={data!r}: expected a pipetrain.H5Source (such as pipetrain.H5Source(path, "
                           "x=..., y=...))")
    if class_weight is not None:
        _check_class_weight(class_weight, source)
    if source.y is None and getattr(model, "loss", None) is not None and not _own_loss(model):
        # (else train_on_batch failed at the first batch: "None values not supported")
        raise RunError(f"the model's loss ({_loss_name(model.loss)}) needs targets, but the source has none: "
                       f"{argument('give H5Source(..., y=DATASET)', 'give --y DATASET')}")
    for data in (source, validation):
        if data is not None:
            data.check_model(model)
            data.limit_labels(sparse_label_limits(model, data.y))  # checked as the rows are read
    if validation is not None:
        _check_like_training(validation, source, model)
    # Before anything is written:
    steps_per_execution = whole_setting("steps_per_execution", steps_per_execution)
    if validation_batch_size:  # (0 or None: batch_size, as fit)
        validation_batch_size = whole_setting("validation_batch_size", validation_batch_size, 1, MAX_ROWS)
    if validation is not None:  # its batches split over a distributed run's devices
        evaluation_plan(validation, validation_batch_size or whole_setting("batch_size", batch_size, 1, MAX_ROWS))
    distributed.check_steps_per_execution(steps_per_execution)
    check_groups(model, steps_per_execution)
    settings = {
        "epochs": epochs, "batch_size": batch_size, "shuffle": shuffle, "seed": seed,
        "workers": workers, "max_queue": max_queue, "validation": [str(p) for p in validation.paths] if validation else None,
        "class_weight": dict(class_weight) if class_weight else None,
        "steps_per_execution": steps_per_execution,
    }
    with Run(
        source, batch_size=batch_size, epochs=epochs, history=history, shuffle=shuffle, seed=seed,
        workers=workers, max_queue=max_queue, max_queue_bytes=max_queue_bytes,
        shuffle_window=shuffle_window, drop_remainder=drop_remainder, partitions=partitions, models=model,
        callbacks=callbacks, verbose=verbose, monitor_interval=monitor_interval,
        config={**settings, **(config or {})}, overwrite=overwrite, resume=resume,
        checkpoint_every=checkpoint_every, stop_on_nonfinite=stop_on_nonfinite,
        producer_priority=producer_priority, allow_changed_data=allow_changed_data, validation=validation,
        device_prefetch=device_prefetch,
    ) as run:
        for epoch in run.epochs():
            if steps_per_execution == 1:
                for batch in epoch:
                    epoch.train_on_batch(model, batch.x, batch.y, batch.sample_weight, class_weight)
            else:
                for group in epoch.groups(steps_per_execution):
                    epoch.train_on_group(model, group, class_weight)
            if validation is not None:  # also after a callback stopped the epoch, as fit does
                epoch.evaluate(model, validation, validation_batch_size or batch_size)
    return run.history


def _pairs(ours, theirs) -> list[tuple[str, str]]:
    """The datasets of one role (y or sample_weight) of two sources, paired by output name
    or by position; none where the two are not given alike."""
    if isinstance(ours, Mapping) and isinstance(theirs, Mapping):
        return [(ours[k], theirs[k]) for k in ours if k in theirs]
    ours, theirs = ([n] if isinstance(n, str) else list(n or []) for n in (ours, theirs))
    return list(zip(ours, theirs)) if len(ours) == len(theirs) else []


def _check_like_training(validation: H5Source, source: H5Source, model) -> None:
    """Validation targets (and weights) whose rows are not shaped as the training data's:
    the model's inputs are checked, its losses are not, and they failed only at the first
    validation, after a whole epoch trained. A lone axis of 1 is the same row to a loss;
    where an input has a free axis (sequences of any length), only the number of axes."""
    try:
        fixed = all(None not in tuple(t.shape[1:]) for t in list(getattr(model, "inputs", None) or [None]))
    except (TypeError, AttributeError):  # (a model not built yet)
        fixed = False
    for role in ("y", "sample_weight"):
        for ours, theirs in _pairs(getattr(validation, role), getattr(source, role)):
            got, expected = validation.fields[ours].row_shape, source.fields[theirs].row_shape
            a, b = (tuple(d for d in shape if d != 1) for shape in (got, expected))
            if (a != b) if fixed else (len(a) != len(b)):
                raise SourceError(f"{validation.paths[0]}: dataset '{ours}' rows are {got} but the training "
                                  f"data's '{theirs}' rows are {expected} ({source.paths[0]})")


def _own_loss(model) -> bool:
    """The model computes its loss itself (a compute_loss or train_step of its own): it
    may need no targets."""
    import keras

    return any(getattr(type(model), name) is not getattr(keras.Model, name) for name in ("compute_loss", "train_step"))


def _loss_name(loss) -> str:
    return loss if isinstance(loss, str) else getattr(loss, "name", None) or type(loss).__name__


def _check_class_weight(class_weight, source: H5Source) -> None:
    """Before anything is written (else the first batch failed: a failed run left behind)."""
    if not isinstance(class_weight, Mapping):
        raise RunError(f"class_weight={class_weight!r}: expected a dict of weights by class index, as fit takes")
    if source.sample_weight is not None:
        raise RunError(f"class_weight={dict(class_weight)} and the sample weights of the source "
                       f"({source.sample_weight!r}) exclude each other, as in fit: give one")
    for label, weight in class_weight.items():
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise RunError(f"class_weight={{{label!r}: {weight!r}}}: a weight must be a finite number")
