"""Epoch metrics from per-batch results, equal to what ``fit`` reports.

Per-batch values cannot simply be averaged into epoch values: the last batch may be
partial (``fit`` weights the loss by batch size), and AUC, precision and friends are not
means at all. What *is* additive is the metrics' state: the totals and counts, the
true-positive counts per threshold. :class:`MetricSums` therefore takes the state of a
model's metric variables after each batch (and zeroes them), sums it in the variables'
own dtype, and at the end of the epoch assigns the sums back and asks the model for its
results: the same arithmetic, in the same order, as ``fit``'s running metrics.

Keras >= 3.15 resets the metrics inside ``train_on_batch``; 3.0-3.14 do not. Because
the state is zeroed after every batch here, both give per-batch state, and neither
behaviour is relied on.

:class:`WeightedMeans` is the plain case: scalar values that a custom loop records per
batch, averaged with the batch size as weight.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import keras
import numpy as np


def pythonify(logs: Mapping) -> dict:
    """Metric results as Python floats (scalars) or numpy arrays, as ``fit`` logs them."""
    out = {}
    for name, value in logs.items():
        if isinstance(value, Mapping):
            out.update(pythonify(value))
            continue
        if isinstance(value, keras.Variable):  # e.g. the learning rate that ReduceLROnPlateau logs
            value = value.numpy()
        array = np.asarray(keras.ops.convert_to_numpy(value))
        out[name] = float(array) if array.ndim == 0 else array
    return out


class WeightedMeans:
    """Means of recorded scalars, weighted by batch size (float64 sums)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.totals: dict[str, float] = {}
        self.weights: dict[str, float] = {}

    def add(self, values: Mapping[str, float], weight: float) -> None:
        for name, value in values.items():
            self.totals[name] = self.totals.get(name, 0.0) + float(value) * weight
            self.weights[name] = self.weights.get(name, 0.0) + weight

    def result(self) -> dict[str, float]:
        return {n: self.totals[n] / self.weights[n] for n in self.totals if self.weights[n]}

    def state(self) -> dict:
        return {"totals": dict(self.totals), "weights": dict(self.weights)}

    def load_state(self, state: Mapping) -> None:
        self.totals = dict(state["totals"])
        self.weights = dict(state["weights"])


class MetricObjects:
    """Keras metric objects that a custom loop updates itself (a discriminator's AUC,
    say): reset at the start of an epoch, read at its end. They accumulate across the
    epoch on their own, so the epoch result is exact without per-batch bookkeeping."""

    def __init__(self, metrics=()):
        self.metrics = list(metrics)

    def reset(self) -> None:
        for metric in self.metrics:
            metric.reset_state()

    def result(self) -> dict:
        return pythonify({metric.name: metric.result() for metric in self.metrics})

    def state(self) -> list[np.ndarray]:
        return [np.asarray(v.numpy()) for metric in self.metrics for v in metric.variables]

    def load_state(self, arrays: list[np.ndarray]) -> None:
        variables = [v for metric in self.metrics for v in metric.variables]
        if len(arrays) != len(variables):
            raise ValueError(f"the checkpoint holds {len(arrays)} metric variables, the run's metrics have {len(variables)}")
        for variable, value in zip(variables, arrays, strict=True):
            variable.assign(value)


class MetricSums:
    """Epoch results of a model's compiled metrics, summed from per-batch state.

    Call :meth:`reset` before the first batch of an epoch (or of an evaluation),
    :meth:`take` right after every ``train_on_batch`` / ``test_on_batch``, and
    :meth:`result` at the end.

    Example::

        sums = MetricSums(model)
        sums.reset()
        for x, y in batches:
            model.train_on_batch(x, y)
            sums.take()
        epoch_logs = sums.result()   # == fit's History for the same batches
    """

    def __init__(self, model):
        self.model = model
        self._variables: list | None = None
        self._take: Callable[[], list[np.ndarray]] | None = None
        self._put: Callable[[list[np.ndarray]], None] | None = None
        self.sums: list[np.ndarray] | None = None
        self.partial_batch = False

    def reset(self, partial_batch: bool = False) -> None:
        """Zero the sums and the model's metric state, before a pass over the data.

        ``partial_batch``: the pass ends with a partial batch (see
        :func:`_per_output_loss_pairs` for why ``fit`` then counts some metrics per batch).
        """
        self.model.reset_metrics()
        self.sums = None
        self.partial_batch = partial_batch

    def _bind(self) -> None:
        # Compiled metrics are built on the first train_on_batch: bind after it.
        self._variables = list(self.model.metrics_variables)
        self._take, self._put = _state_functions(self._variables)
        self._once_per_batch = _per_output_loss_pairs(self.model, self._variables)

    def take(self) -> None:
        """Add the metric state of the batch just run to the sums, and zero it."""
        if self._variables is None:
            self._bind()
        state = self._take()
        for total, count in self._once_per_batch if self.partial_batch else ():
            if state[count] > 0:
                state[total] = np.asarray(state[total] / state[count], state[total].dtype)
                state[count] = np.ones_like(state[count])
        if self.sums is None:
            self.sums = state
        else:
            for total, part in zip(self.sums, state, strict=True):
                np.add(total, part, out=total)

    def _assign(self) -> None:
        if self._variables is None:
            self._bind()
        if self.sums is None:
            self.sums = [np.zeros(v.shape, keras.backend.standardize_dtype(v.dtype)) for v in self._variables]
        self._put(self.sums)

    def result(self) -> dict:
        """The model's metric results over every batch taken since :meth:`reset`.

        The sums are left in the model's metric variables, as after ``fit``'s epoch."""
        self._assign()
        return pythonify(self.model.get_metrics_result())

    def running(self) -> dict:
        """The results so far, mid-epoch (for callbacks' batch hooks); the metric state
        is zeroed again afterwards, ready for the next batch."""
        result = self.result()
        self._put([np.zeros_like(s) for s in self.sums])
        return result

    def state(self) -> list[np.ndarray] | None:
        return None if self.sums is None else [s.copy() for s in self.sums]

    def load_state(self, state: list[np.ndarray] | None) -> None:
        self.sums = None if state is None else [np.array(s) for s in state]


def _per_output_loss_pairs(model, variables: list) -> list[tuple[int, int]]:
    """Positions of (total, count) of the per-output loss trackers (``out_a_loss``) that
    ``fit`` on TensorFlow counts once per batch.

    Keras weights these trackers by the *static* batch size (``y_pred.shape[0]``). When
    the data does not divide into whole batches, ``fit`` on TensorFlow feeds batches whose
    batch dimension is unknown, so each batch counts once and the epoch value is the plain
    mean of the batch means; when it divides evenly the dimension is known and batches
    are weighted by size. ``train_on_batch`` always traces static shapes. To report what
    ``fit`` reports, a pass with a partial batch counts each batch once here too. JAX and
    PyTorch trace static shapes in ``fit`` as well, and their batches keep their weights.
    """
    if keras.backend.backend() != "tensorflow":
        return []
    trackers = getattr(getattr(model, "_compile_loss", None), "metrics", None) or []
    position = {id(v): i for i, v in enumerate(variables)}
    pairs = []
    for tracker in trackers:
        total, count = getattr(tracker, "total", None), getattr(tracker, "count", None)
        if id(total) in position and id(count) in position:
            pairs.append((position[id(total)], position[id(count)]))
    return pairs


def _state_functions(variables: list) -> tuple[Callable[[], list[np.ndarray]], Callable[[list], None]]:
    """``take()``: read every variable and zero it; ``put(values)``: assign them.

    On TensorFlow one compiled call does all the reads and zeroing (about 50 us, against
    about 250 us for eager reads plus ``reset_metrics`` per batch); other backends have
    cheap eager variable access and use it directly.
    """
    if keras.backend.backend() == "tensorflow" and variables:
        return _tensorflow_state_functions(variables)

    def take() -> list[np.ndarray]:
        values = [np.array(keras.ops.convert_to_numpy(v)) for v in variables]
        for v in variables:
            v.assign(keras.ops.zeros(v.shape, v.dtype))
        return values

    def put(values: list) -> None:
        for v, value in zip(variables, values, strict=True):
            v.assign(value)

    return take, put


def _tensorflow_state_functions(variables: list):
    import tensorflow as tf

    handles = [v.value for v in variables]  # the tf.Variables behind Keras variables

    @tf.function(autograph=False)
    def take_graph():
        values = [h.read_value() for h in handles]
        with tf.control_dependencies(values):
            zeroed = [h.assign(tf.zeros_like(h)) for h in handles]
        with tf.control_dependencies(zeroed):
            return [tf.identity(v) for v in values]

    @tf.function(autograph=False)
    def put_graph(values):
        for h, value in zip(handles, values, strict=True):
            h.assign(value)

    # Calling the concrete function skips tf.function's argument dispatch.
    take_concrete = take_graph.get_concrete_function()
    specs = [tf.TensorSpec(h.shape, h.dtype) for h in handles]
    put_concrete = put_graph.get_concrete_function(specs)

    def take() -> list[np.ndarray]:
        return [np.array(t) for t in take_concrete()]

    def put(values: list) -> None:
        put_concrete([tf.convert_to_tensor(v, h.dtype) for v, h in zip(values, handles, strict=True)])

    return take, put
