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

import contextlib
from collections.abc import Mapping

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


def host_logs(logs: Mapping) -> dict:
    """Logs already on the host (numpy) as Python floats, or arrays for vector values;
    nested dicts (a ``train_step`` returning ``compile_metrics``' result) flattened, as
    Keras does."""
    out = {}
    for name, value in logs.items():
        if isinstance(value, Mapping):
            out.update(host_logs(value))
            continue
        value = np.asarray(value)
        out[name] = float(value) if value.ndim == 0 else value
    return out


def unfused_reason(model) -> str | None:
    """Why ``model``'s training batches run through its own ``train_on_batch`` rather than
    pipetrain's compiled step (:mod:`pipetrain.fused`), so one at a time; None if they do not."""
    if getattr(model, "run_eagerly", False):
        return "it is compiled with run_eagerly=True (its own eager step, as fit runs it)"
    backend, jit = keras.backend.backend(), getattr(model, "jit_compile", None)
    if backend == "jax" and jit is False:  # fit runs its step unjitted: Python side effects on every batch
        return "it is compiled with jit_compile=False"
    if backend == "torch" and jit is True:  # fit runs its step through torch.compile
        return "it is compiled with jit_compile=True (torch.compile)"
    strategy = getattr(model, "distribute_strategy", None)
    if strategy is not None and type(strategy).__name__ != "_DefaultDistributionStrategy":
        return f"it trains under a tf.distribute strategy ({type(strategy).__name__})"
    if not _no_distribution():
        return "a Keras distribution is set"
    return None


def _no_distribution() -> bool:
    """No ``keras.distribution`` is set (JAX data parallel runs the model's own steps)."""
    distribution = getattr(keras, "distribution", None)
    return distribution is None or not hasattr(distribution, "distribution") or distribution.distribution() is None


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
    run every batch through :meth:`accumulate` (``train_on_batch``, or ``test_on_batch`` for
    ``step="test"``), and :meth:`result` at the end; :meth:`detach` when done.

    On TensorFlow the state is added to the sums inside a compiled step of our own (the
    model's ``train_step`` wrapped, in use only during :meth:`accumulate`), so a batch costs
    no extra call at all; elsewhere the metric variables are read and zeroed eagerly.

    Example::

        sums = MetricSums(model)
        sums.reset()
        for x, y in batches:
            sums.accumulate(lambda: model.train_on_batch(x, y))
        epoch_logs = sums.result()   # == fit's History for the same batches
        sums.detach()
    """

    def __init__(self, model, step: str = "train"):
        if step not in ("train", "test"):
            raise ValueError(f"step={step!r}: expected 'train' or 'test'")
        self.model, self.step = model, step
        self._sums: _EagerSums | _InStepSums | None = None
        self._compiled = None  # the compile the sums are bound to
        self.partial_batch = False

    def _compile_key(self) -> tuple:
        model = self.model
        return (id(getattr(model, "optimizer", None)), id(getattr(model, "_compile_metrics", None)),
                id(getattr(model, "_compile_loss", None)))

    def _bound(self) -> _EagerSums | _InStepSums | _FusedSums:
        if self._sums is not None and self._compile_key() != self._compiled:
            # Recompiled: new metric variables and optimizer, which the next batch
            # builds through train_on_batch. Their state starts at zero, as in fit's
            # next call: the sums go on from the batches trained after the compile.
            self.detach()
        if self._sums is None:
            self._compiled = self._compile_key()
            default = unfused_reason(self.model) is None
            if self.step == "train" and default:
                self._sums = _FusedSums(self.model)
            elif keras.backend.backend() == "tensorflow" and default:
                self._sums = _InStepSums(self.model, self.step)
            else:
                self._sums = _EagerSums(self.model)
            self._sums.reset(self.partial_batch)
        return self._sums

    @property
    def fused(self) -> bool:
        """Whether :meth:`train` runs the compiled step (so takes k > 1 batches a call)."""
        bound = self._bound()
        return isinstance(bound, _FusedSums) and bound.step is not None

    def train(self, data: tuple, k: int = 1) -> dict:
        """Train one batch ``data = (x, y, sample_weight)`` (k = 1), or k batches stacked
        on a leading axis (only once :attr:`fused`); their state joins the sums.

        Returns the batch's own metrics (k = 1) or the k batches' (see
        :mod:`pipetrain.fused`), as Python floats (arrays for vector-valued metrics)."""
        bound = self._bound()
        if isinstance(bound, _FusedSums) and bound.step is not None:
            return host_logs(bound.step.run(data, k))
        if k != 1:
            raise ValueError(f"k={k}: this model's batches go one at a time (no fused step here)")
        x, y, sample_weight = data
        logs = self.accumulate(lambda: self.model.train_on_batch(x, y, sample_weight=sample_weight, return_dict=True))
        return pythonify(logs)

    def reset(self, partial_batch: bool = False) -> None:
        """Zero the sums and the model's metric state, before a pass over the data.

        ``partial_batch``: the pass ends with a partial batch (see
        :func:`_per_output_loss_pairs` for why ``fit`` then counts some metrics per batch).
        """
        self.model.reset_metrics()
        self.partial_batch = partial_batch
        self._bound().reset(partial_batch)

    def accumulate(self, call):
        """Run one batch, ``call()`` (the model's ``train_on_batch`` or ``test_on_batch``),
        and add its metric state to the sums; returns what ``call`` returns.

        Only these calls add to the sums: the model's own ``fit``, ``evaluate`` or
        ``train_on_batch`` elsewhere (in a callback, say) run the model's unwrapped step."""
        bound = self._bound()
        with bound.engaged():
            result = call()
        bound.take(self.partial_batch)
        return result

    def result(self) -> dict:
        """The model's metric results over every batch taken since :meth:`reset`.

        The sums are left in the model's metric variables, as after ``fit``'s epoch."""
        self._bound().commit()
        return pythonify(self.model.get_metrics_result())

    def running(self) -> dict:
        """The results so far, mid-epoch (for callbacks' batch hooks); the metric state
        is zeroed again afterwards, ready for the next batch."""
        result = self.result()
        self.model.reset_metrics()
        return result

    def state(self) -> list[np.ndarray] | None:
        return self._bound().get()

    def load_state(self, state: list[np.ndarray] | None) -> None:
        if state is not None:
            self._bound().set([np.asarray(s) for s in state])

    def detach(self) -> None:
        """Give the model back its own step function (nothing to do off TensorFlow)."""
        if isinstance(self._sums, _InStepSums):
            self._sums.detach()
        self._sums = None


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


class _EagerSums:
    """Sums kept in numpy, in each variable's dtype (float32 adds round as the
    backend's); the metric state is read and zeroed after each batch."""

    def __init__(self, model):
        self.model = model
        self.variables: list | None = None
        self.sums: list[np.ndarray] | None = None
        self.pending: list[np.ndarray] | None = None  # state loaded before the first batch

    def _ready(self) -> bool:
        # Compiled metrics are built on the first train_on_batch: bind after it.
        if self.variables is None:
            variables = list(self.model.metrics_variables)
            if not variables:
                return False
            self.variables = variables
            self.pairs = _per_output_loss_pairs(self.model, variables)
            self.sums = [np.zeros(v.shape, keras.backend.standardize_dtype(v.dtype)) for v in variables]
            if self.pending is not None:
                self.set(self.pending)
                self.pending = None
        return True

    def reset(self, partial_batch: bool) -> None:
        self.pending = None
        if self.sums is not None:
            for s in self.sums:
                s[...] = 0

    def engaged(self):
        return contextlib.nullcontext()

    def take(self, once_per_batch: bool) -> None:
        if not self._ready():
            return
        state = [np.array(keras.ops.convert_to_numpy(v)) for v in self.variables]
        for v in self.variables:
            v.assign(keras.ops.zeros_like(v.value))  # laid out as v: no cross-process check in a distributed run
        for total, count in self.pairs if once_per_batch else ():
            if state[count] > 0:
                state[total] = np.asarray(state[total] / state[count], state[total].dtype)
                state[count] = np.ones_like(state[count])
        for s, part in zip(self.sums, state, strict=True):
            np.add(s, part, out=s)

    def commit(self) -> None:
        if self._ready():
            for v, s in zip(self.variables, self.sums, strict=True):
                v.assign(s)

    def get(self) -> list[np.ndarray] | None:
        return [s.copy() for s in self.sums] if self.sums is not None else self.pending

    def set(self, arrays: list[np.ndarray]) -> None:
        if self.sums is None:
            self.pending = arrays
            return
        if len(arrays) != len(self.sums):
            raise ValueError(f"{len(arrays)} metric sums given for {len(self.sums)} metric variables")
        self.sums = [np.array(a, dtype=s.dtype).reshape(s.shape) for a, s in zip(arrays, self.sums, strict=True)]


class _InStepSums:
    """TensorFlow: after the first batch, the batches go through a compiled step of our
    own, the model's ``train_step`` (or ``test_step``) followed, in the same compiled
    call, by adding the batch's metric state to sums held in TensorFlow variables and
    zeroing it. The step's logs are read before the zeroing (TensorFlow orders the reads
    and writes of a variable as written), so they are the batch's own. No extra call
    per batch: a separate compiled call cost about 100 us a step here.

    Our step is the model's only while :meth:`engaged`: a ``model.evaluate`` in a
    callback runs the model's own. It starts from zeroed metric state, so what such a
    call leaves in the metric variables is not counted.

    The first batch is taken eagerly: only then do the compiled metrics exist, and the
    sums are created outside any traced function (Keras 3.0 traces its step over a
    Python iterator, which a second trace for new variables would find exhausted).
    """

    def __init__(self, model, step: str):
        import tensorflow as tf

        self.tf, self.model, self.step = tf, model, step
        self.eager = _EagerSums(model)  # the sums until our step exists
        self.sums: list | None = None
        self.once_per_batch = tf.Variable(False, trainable=False, name="pipetrain_once_per_batch")
        self.step_and_accumulate = None  # the model's step followed by the sums' update
        self.function = None  # our compiled step, traced by Keras on first use
        self.wrapped = False

    def _wrap(self) -> None:
        """Move the sums into TensorFlow variables and define our step (once)."""
        tf, eager = self.tf, self.eager
        self.variables, self.pairs = eager.variables, dict(eager.pairs)
        self.sums = [tf.Variable(s, trainable=False) for s in eager.sums]
        original = getattr(self.model, f"{self.step}_step")

        def step_and_accumulate(data):
            for v in self.variables:  # what other calls left there is not this batch's
                v.value.assign(tf.zeros_like(v.value))
            logs = original(data)
            self._accumulate()
            return logs

        self.step_and_accumulate = step_and_accumulate
        self.wrapped = True

    @contextlib.contextmanager
    def engaged(self):
        """Our step is the model's for the duration (Keras traces and calls it as its
        ``train_function``); the model's own is back afterwards."""
        if not self.wrapped:
            yield
            return
        model, function, step = self.model, f"{self.step}_function", f"{self.step}_step"
        own = getattr(model, function, None)
        own_step = vars(model).get(step)  # a step the user set on the instance, if any
        setattr(model, step, self.step_and_accumulate)
        setattr(model, function, self.function)
        try:
            yield
        finally:
            self.function = getattr(model, function, None)
            if own_step is not None:
                setattr(model, step, own_step)
            elif step in vars(model):
                delattr(model, step)
            setattr(model, function, own)

    def _accumulate(self) -> None:
        """Build (while the step is traced) the ops that add the state to the sums."""
        tf = self.tf
        handles = [v.value for v in self.variables]
        values = [h.read_value() for h in handles]
        for total, count in self.pairs.items():  # per-output losses: the batch mean, counted once
            once = tf.logical_and(self.once_per_batch, values[count] > 0)
            values[total] = tf.where(once, tf.math.divide_no_nan(values[total], values[count]), values[total])
            values[count] = tf.where(once, tf.ones_like(values[count]), values[count])
        for s, h, v in zip(self.sums, handles, values, strict=True):
            s.assign_add(v)
            h.assign(tf.zeros_like(h))

    def reset(self, partial_batch: bool) -> None:
        self.once_per_batch.assign(partial_batch)
        self.eager.reset(partial_batch)
        for s in self.sums or ():
            s.assign(self.tf.zeros_like(s))

    def take(self, once_per_batch: bool) -> None:
        if self.wrapped:
            return  # the step itself added the batch
        self.eager.take(once_per_batch)
        if self.eager.sums is not None:
            self._wrap()

    def commit(self) -> None:
        if not self.wrapped:
            self.eager.commit()
            return
        for v, s in zip(self.variables, self.sums, strict=True):
            v.assign(s)

    def get(self) -> list[np.ndarray] | None:
        if not self.wrapped:
            return self.eager.get()
        return [np.array(s.numpy()) for s in self.sums]

    def set(self, arrays: list[np.ndarray]) -> None:
        if not self.wrapped:
            self.eager.set(arrays)
            return
        if len(arrays) != len(self.sums):
            raise ValueError(f"{len(arrays)} metric sums given for {len(self.sums)} metric variables")
        for s, a in zip(self.sums, arrays, strict=True):
            s.assign(np.asarray(a).reshape(s.shape))

    def detach(self) -> None:
        self.function = self.step_and_accumulate = None
        self.wrapped = False


class _FusedSums:
    """Training: the first batch goes through ``train_on_batch`` (it builds the model,
    the optimizer and the compiled metrics) with the state taken eagerly; from then on
    a :class:`pipetrain.fused.FusedStep` trains and keeps the sums inside its compiled
    call."""

    def __init__(self, model):
        self.model = model
        self.eager = _EagerSums(model)
        self.step = None
        self.once_per_batch = False

    def reset(self, partial_batch: bool) -> None:
        self.once_per_batch = partial_batch
        self.eager.reset(partial_batch)
        if self.step is not None:
            self.step.reset_sums(partial_batch)

    def engaged(self):
        return contextlib.nullcontext()

    def take(self, once_per_batch: bool) -> None:
        if self.step is not None:  # a batch run outside the fused step: add it eagerly
            eager = self.eager
            eager.sums = self.step.get()
            eager.take(once_per_batch)
            self.step.set(eager.sums)
            return
        self.eager.take(once_per_batch)
        if self.eager.sums is not None:
            from pipetrain.fused import FusedStep

            eager = self.eager
            self.step = FusedStep(self.model, eager.variables, eager.sums, eager.pairs)
            self.step.reset_sums(self.once_per_batch)
            self.step.set(eager.sums)

    def commit(self) -> None:
        if self.step is None:
            self.eager.commit()
            return
        self.step.commit()

    def get(self) -> list[np.ndarray] | None:
        return self.step.get() if self.step is not None else self.eager.get()

    def set(self, arrays: list[np.ndarray]) -> None:
        if self.step is None:
            self.eager.set(arrays)
            return
        if len(arrays) != len(self.eager.variables):
            raise ValueError(f"{len(arrays)} metric sums given for {len(self.eager.variables)} metric variables")
        self.step.set(arrays)
