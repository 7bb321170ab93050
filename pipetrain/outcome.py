"""How a run ends: why it stopped, which metric tells its best epoch, whether it is done.

- :func:`monitored`: the metric the run's callbacks watch (EarlyStopping's, say) and its
  direction, recorded in the ``run`` record so that every view names the same best epoch.
- :func:`best_epoch`: the best epoch record of a history for that metric (else
  ``val_loss``, else ``loss``).
- :func:`callback_stop`: which callback stopped training, in words, for the ``end``
  record's ``reason`` (and for the checkpoint: a run a callback ended is complete).
- :func:`already_complete`: whether a checkpoint is of a run that has nothing left to
  train for the epochs asked: a resume then changes nothing.

Example::

    h = pipetrain.read_history("runs/exp1", tables=("epochs",))
    best_epoch(h.epochs, h.runs[-1].get("monitor"))   # ("val_loss", "min", {epoch record}) or None
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

# Metric names whose higher values are better, when nothing says otherwise.
HIGHER_IS_BETTER = ("acc", "auc", "precision", "recall", "f1", "iou", "top", "r2", "coefficient")


def direction(name: str, mode: str = "auto", model=None) -> str:
    """"min" or "max" for a metric name, as Keras' monitoring callbacks decide it: the
    mode given, else min for a loss, else the model's metric of that name, else the name.

    >>> direction("val_loss"), direction("val_accuracy"), direction("mse", "max")
    ('min', 'max', 'max')
    """
    if mode in ("min", "max"):
        return mode
    base = name.removeprefix("val_")
    if base.endswith("loss"):
        return "min"
    for metric in _metrics(model):
        if getattr(metric, "name", None) == base and getattr(metric, "_direction", None) in ("up", "down"):
            return "max" if metric._direction == "up" else "min"
    return "max" if any(word in base for word in HIGHER_IS_BETTER) else "min"


def _metrics(model) -> list:
    found = []
    for metric in getattr(model, "metrics", None) or []:
        found.extend(getattr(metric, "metrics", None) or [metric])
    return found


def monitored(callbacks: Iterable, model=None) -> dict | None:
    """{"name", "mode"} of the first callback that monitors a metric (EarlyStopping,
    ModelCheckpoint, ReduceLROnPlateau, or any callback with a ``monitor``), or None."""
    for callback in callbacks:
        name = getattr(callback, "monitor", None)
        if isinstance(name, str) and name:
            return {"name": name, "mode": direction(name, getattr(callback, "mode", "auto"), model)}
    return None


def best_epoch(epochs: list[dict], monitor: Mapping | None = None) -> tuple[str, str, dict] | None:
    """(metric, mode, epoch record) of the best epoch: by the monitored metric when the
    epochs have it, else by ``val_loss``, else by ``loss``; None when none has a value."""
    names = [monitor["name"]] if isinstance(monitor, Mapping) and monitor.get("name") else []
    for name in [*names, "val_loss", "loss"]:
        scored = [e for e in epochs if _finite(e.get(name))]
        if scored:
            mode = monitor["mode"] if names and name == names[0] and monitor.get("mode") in ("min", "max") \
                else direction(name)
            pick = min if mode == "min" else max
            return name, mode, pick(scored, key=lambda e: e[name])  # the first of equals, as Keras keeps it
    return None


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def callback_stop(callbacks: Iterable, epoch: int, batches: int) -> str:
    """Which callback stopped training in ``epoch`` (from 0) after ``batches`` batches,
    in words (epochs and batches counted from 1, as Keras prints them)."""
    candidates = []
    for callback in callbacks:
        kind = type(callback).__name__
        if _is_keras(callback, "EarlyStopping") and getattr(callback, "stopped_epoch", 0) == epoch and epoch > 0:
            best = getattr(callback, "best_epoch", None)
            since = f" since epoch {best + 1}" if isinstance(best, int) else ""
            return f"EarlyStopping at epoch {epoch + 1}: {callback.monitor} did not improve{since}"
        if _is_keras(callback, "TerminateOnNaN"):
            candidates.append((kind, f"TerminateOnNaN at epoch {epoch + 1}, batch {batches}: a NaN or infinite loss"))
        elif not type(callback).__module__.startswith("keras"):
            candidates.append((kind, f"{kind} at epoch {epoch + 1}, batch {batches}"))
    if len(candidates) == 1:
        return candidates[0][1]
    names = " or ".join(kind for kind, _ in candidates) or "a callback"
    return f"{names} set stop_training at epoch {epoch + 1}, batch {batches}"


def _is_keras(callback, name: str) -> bool:
    return any(k.__name__ == name and k.__module__.startswith("keras") for k in type(callback).__mro__)


def already_complete(meta: Mapping, epochs: int) -> str | None:
    """Why the run of checkpoint ``meta`` has nothing left to train for ``epochs``
    epochs (all of its epochs done, or a callback ended it at an epoch end), or None. More epochs than
    the run had extend it: then it is not complete."""
    recorded = int(meta.get("epochs") or 0)
    position = meta.get("position") or {}
    if int(position.get("epoch", 0)) >= epochs and not position.get("batch"):
        return f"all {position.get('epoch', 0)} epochs trained"
    if epochs <= recorded and meta.get("stopped"):
        return meta["stopped"]
    return None
