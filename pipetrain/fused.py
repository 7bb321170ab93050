"""Fused training steps: one compiled call trains k batches and keeps the epoch's
metric sums, with no eager operation around it.

``model.train_on_batch`` pays, on every call, for work that a training loop does not
need batch by batch: it resets each metric variable eagerly (a quarter of a small step
on TensorFlow and JAX), checks the build, wraps the batch in a generator and, on JAX,
converts every input and writes every variable back. ``fit`` avoids all that; so does
this module. A :class:`FusedStep` calls the model's own ``train_step`` (an override on
the class or the instance included) inside a function compiled by the backend:

- per batch: zero the metric state, run ``train_step``, add the state to the epoch's
  sums (and to the group's), all inside the compiled call;
- per call: k batches (``steps_per_execution``), stacked on a leading axis: a
  ``tf.while_loop`` on TensorFlow. On JAX, as Keras' own ``fit`` does, the compiled step
  runs k times from Python with the state kept on the device (a ``lax.scan`` of k steps
  is another program, whose results differ from ``fit``'s in the last bits). PyTorch
  has no compiled loop without ``torch.compile``; there the k steps run back to back in
  Python. On all three the sums stay on the device (no host transfer until the record).

The logs of a call are the batch's own metrics (k = 1) or the group's: the model's
metrics over those k batches, as ``fit`` would report them for the k batches alone.
Because the sums grow batch by batch in each variable's dtype, in the order ``fit``
adds, the epoch results stay bit-for-bit ``fit``'s for any k.

The very first batch of a model goes through ``train_on_batch`` (it builds the model,
the optimizer and the compiled metrics); :class:`pipetrain.aggregate.MetricSums` owns
that hand-over. The compiled function is rebuilt when the model's trainable variables,
optimizer or ``train_step`` change (a GAN toggling ``trainable``, a recompile).
"""

from __future__ import annotations

import keras
import numpy as np


def each(function, *trees):
    """``function`` over the arrays of ``(x, y, sample_weight)`` trees; None stays None."""
    return keras.tree.map_structure(lambda *a: None if a[0] is None else function(*a), *trees)


class FusedStep:
    """The model's ``train_step`` compiled with the epoch's metric sums (see module doc).

    ``variables`` are the model's metric variables and ``sums`` their epoch sums (numpy,
    each in its variable's dtype); ``pairs`` the (total, count) positions ``fit`` on
    TensorFlow counts once per batch (:func:`pipetrain.aggregate._per_output_loss_pairs`).
    """

    def __new__(cls, model, variables, sums, pairs):
        if cls is FusedStep:
            backend = keras.backend.backend()
            cls = {"tensorflow": _TFStep, "jax": _JaxStep, "torch": _TorchStep}.get(backend)
            if cls is None:
                raise NotImplementedError(f"no fused step for the {backend} backend")
        return super().__new__(cls)

    def __init__(self, model, variables, sums, pairs):
        self.model, self.variables, self.pairs = model, variables, dict(pairs)
        self.once_per_batch = False
        self._key = None
        self._set_sums(sums)

    def _signature(self):
        model = self.model
        step = model.train_step
        return (tuple(id(v) for v in model.trainable_variables), id(model.optimizer),
                getattr(step, "__func__", step), id(model.train_function))

    def _fresh(self) -> bool:
        """Whether the compiled function still fits the model (rebuilt if not)."""
        key = self._signature()
        if key != self._key:
            self._key = key
            self._build()
            return False
        return True

    def run(self, data, k: int) -> dict:
        """Train ``data`` (one batch ``(x, y, sample_weight)`` for k = 1, else k batches
        stacked on a leading axis); returns the logs as numpy values on the host."""
        self._fresh()
        return self._run(data, k)

    def commit(self) -> None:
        """Put the epoch's sums in the model's metric variables (before its results are read)."""
        for v, s in zip(self.variables, self.get(), strict=True):
            v.assign(s)

    # backend specifics: _set_sums, _build, _run, get, reset_sums


class _TFStep(FusedStep):
    def _set_sums(self, sums):
        import tensorflow as tf

        self.tf = tf
        self.sums = [tf.Variable(s, trainable=False) for s in sums]
        self.flag = tf.Variable(False, trainable=False)

    def _values(self):
        """(Traced) the metric state of the batch just trained, per-output losses
        counted once per batch when asked."""
        tf = self.tf
        values = [v.value.read_value() for v in self.variables]
        for total, count in self.pairs.items():
            once = tf.logical_and(self.flag, values[count] > 0)
            values[total] = tf.where(once, tf.math.divide_no_nan(values[total], values[count]), values[total])
            values[count] = tf.where(once, tf.ones_like(values[count]), values[count])
        return values

    def _one(self, data):
        tf = self.tf
        for v in self.variables:
            v.value.assign(tf.zeros_like(v.value))
        logs = self.model.train_step(data)
        values = self._values()
        for s, v in zip(self.sums, values, strict=True):
            s.assign_add(v)
        return logs, values

    def _build(self):
        tf, model = self.tf, self.model
        jit = bool(getattr(model, "jit_compile", False))

        def one(data):
            return self._one(data)[0]

        # Within the loop, each step compiled as the model's own (XLA where it uses XLA).
        inner = tf.function(lambda data: self._one(data)[1], reduce_retracing=True, jit_compile=jit)

        def many(stacked):
            k = tf.shape(next(a for a in tf.nest.flatten(stacked) if a is not None))[0]

            def body(i, group):
                values = inner(each(lambda a: a[i], stacked))
                return i + 1, [g + v for g, v in zip(group, values, strict=True)]

            group = [tf.zeros_like(s) for s in self.sums]
            _, group = tf.while_loop(lambda i, _: i < k, body, [tf.constant(0), group])
            for v, g in zip(self.variables, group, strict=True):
                v.value.assign(g)
            return model.get_metrics_result()

        self._one_fn = tf.function(one, reduce_retracing=True, jit_compile=jit)
        self._many_fn = tf.function(many, reduce_retracing=True)
        self._traced = set()

    def _run(self, data, k):
        fn = self._one_fn if k == 1 else self._many_fn
        if k not in self._traced:
            self._traced.add(k)
            self._trace_any_rows(fn, data, 1 if k == 1 else 2)  # (k > 1: the last group may be short)
        logs = fn(data)
        return keras.tree.map_structure(lambda value: value.numpy(), logs)

    def _trace_any_rows(self, fn, data, leading: int):
        """Trace ``fn`` once for any size of the ``leading`` axes, as fit's dataset has
        them: the short last batch then dispatches to it instead of tracing the step
        again (a stall of a second or more on a large model). Arrays only; anything
        else is left to tf.function's own tracing."""
        tf = self.tf
        leaves = [a for a in keras.tree.flatten(data) if a is not None]
        if not all(isinstance(a, (np.ndarray, tf.Tensor)) and a.ndim >= leading for a in leaves):
            return
        fn.get_concrete_function(each(
            lambda a: tf.TensorSpec((None,) * leading + tuple(a.shape[leading:]), tf.as_dtype(a.dtype)), data))

    def get(self):
        return [np.array(s.numpy()) for s in self.sums]

    def set(self, arrays):
        for s, a in zip(self.sums, arrays, strict=True):
            s.assign(np.asarray(a).reshape(s.shape))

    def reset_sums(self, once_per_batch: bool):
        self.flag.assign(once_per_batch)
        for s in self.sums:
            s.assign(self.tf.zeros_like(s))


class _JaxStep(FusedStep):
    def _set_sums(self, sums):
        import jax

        self.jax = jax
        self.sums = [jax.numpy.asarray(s) for s in sums]

    def _build(self):
        jax, model = self.jax, self.model
        jnp = jax.numpy
        step = model.train_step

        def one(state, sums, data):
            tv, ntv, ov, mv = state
            mv = [jnp.zeros_like(v) for v in mv]
            logs, state = step((tv, ntv, ov, mv), data)
            sums = [s + v for s, v in zip(sums, state[3], strict=True)]
            return logs, state, sums

        def one_of_group(state, sums, group, data):
            _, state, sums = one(state, sums, data)
            return state, sums, [g + v for g, v in zip(group, state[3], strict=True)]

        def results(group):
            mapping = list(zip(model.metrics_variables, group, strict=True))
            with keras.StatelessScope(state_mapping=mapping):
                return model.get_metrics_result()

        self._one_fn = jax.jit(one, donate_argnums=(0, 1))
        self._group_fn = jax.jit(one_of_group, donate_argnums=(0, 1, 2))
        self._results_fn = jax.jit(results)

    def _run(self, data, k):
        model = self.model
        groups = (model.trainable_variables, model.non_trainable_variables, model.optimizer.variables,
                  model.metrics_variables)
        state = tuple([v.value for v in vs] for vs in groups)
        if k == 1:
            logs, state, self.sums = self._one_fn(state, self.sums, data)
        else:
            # The compiled step k times from Python, the state kept on the device, as Keras'
            # fit runs steps_per_execution: one lax.scan program of k steps is compiled
            # otherwise, and its weights and losses differ from fit's in the last bits.
            tree = self.jax.tree_util
            leaves, shape = tree.tree_flatten(data)  # (sliced leaf by leaf: keras.tree costs ~30 us a batch)
            sums, group = self.sums, [self.jax.numpy.zeros_like(s) for s in self.sums]
            for i in range(k):
                batch = tree.tree_unflatten(shape, [leaf[i] for leaf in leaves])
                state, sums, group = self._group_fn(state, sums, group, batch)
            self.sums, logs = sums, self._results_fn(group)
            state = (*state[:3], group)
        for variables, values in zip(groups, state, strict=True):
            for ref, value in zip(variables, values, strict=True):
                ref.assign(value)
        return self.jax.device_get(logs)

    def get(self):
        return [np.array(s) for s in self.jax.device_get(self.sums)]

    def set(self, arrays):
        self.sums = [self.jax.numpy.asarray(np.asarray(a, s.dtype).reshape(s.shape))
                     for a, s in zip(arrays, self.sums, strict=True)]

    def reset_sums(self, once_per_batch: bool):
        self.sums = [self.jax.numpy.zeros_like(s) for s in self.sums]


class _TorchStep(FusedStep):
    def _set_sums(self, sums):
        import torch

        self.torch = torch
        device = self.variables[0].value.device if self.variables else None
        self.sums = [torch.as_tensor(np.array(s), device=device) for s in sums]

    def _build(self):
        pass  # nothing to compile: the k steps run in Python

    def _fresh(self) -> bool:
        # Nothing compiled to go stale: every step calls the model's train_step as it is
        # now (reading trainable_variables to check cost a dozen microseconds a step).
        return True

    def _one(self, data):
        torch = self.torch
        with torch.no_grad():
            for v in self.variables:
                v.value.zero_()
        logs = self.model.train_step(data)
        with torch.no_grad():
            for s, v in zip(self.sums, self.variables, strict=True):
                s.add_(v.value)
        return logs

    def _run(self, data, k):
        torch = self.torch
        if k == 1:
            logs = self._one(data)
        else:
            group = [torch.zeros_like(s) for s in self.sums]
            for i in range(k):
                self._one(each(lambda a, i=i: a[i], data))
                with torch.no_grad():
                    for g, v in zip(group, self.variables, strict=True):
                        g.add_(v.value)
            with torch.no_grad():
                for v, g in zip(self.variables, group, strict=True):
                    v.value.copy_(g)
            logs = self.model.get_metrics_result()
        if type(logs) is dict and all(torch.is_tensor(v) for v in logs.values()):  # the usual logs, directly
            return {name: value.detach().cpu().numpy() for name, value in logs.items()}
        return keras.tree.map_structure(
            lambda value: value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value), logs)

    def get(self):
        return [s.detach().cpu().numpy().copy() for s in self.sums]

    def commit(self) -> None:
        # Tensor to tensor: through numpy and Variable.assign it cost ~12 us a variable more
        # at every epoch's end.
        with self.torch.no_grad():
            for v, s in zip(self.variables, self.sums, strict=True):
                v.value.copy_(s)

    def set(self, arrays):
        with self.torch.no_grad():
            for s, a in zip(self.sums, arrays, strict=True):
                s.copy_(self.torch.as_tensor(np.asarray(a, dtype=s.detach().cpu().numpy().dtype).reshape(s.shape)))

    def reset_sums(self, once_per_batch: bool):
        with self.torch.no_grad():
            for s in self.sums:
                s.zero_()


class Group:
    """Up to k consecutive batches of one size, copied out of the producer pool's
    buffers (which it recycles) into stacked arrays as they arrive: what one fused call
    trains. ``index`` is the first batch's position in the epoch, ``count`` how many
    batches it holds, ``size`` their rows; ``x``, ``y``, ``sample_weight`` have a
    leading axis of ``count``.

    ``Group(batch, k)`` starts one; :meth:`add` copies in the next batch (False, and
    nothing copied, when its size differs); :meth:`done` trims the arrays to ``count``.
    A group can also start from another group of one (a batch held over)."""

    __slots__ = ("index", "count", "size", "x", "y", "sample_weight", "wait_s", "read_s", "read_bytes",
                 "nbytes", "_rows")

    def __init__(self, batch, k: int):
        if isinstance(batch, Group):  # a batch held over from the previous group
            data = (batch.x, batch.y, batch.sample_weight)
            data = each(lambda a: np.concatenate([a, np.empty((k - 1, *a.shape[1:]), a.dtype)]), data)
            self.x, self.y, self.sample_weight = data
            for name in self.__slots__:
                if name not in ("x", "y", "sample_weight"):
                    setattr(self, name, getattr(batch, name))
            return
        self.index, self.count, self._rows = batch.index, 0, batch.size
        self.size = 0
        self.wait_s = self.read_s = 0.0
        self.read_bytes = self.nbytes = 0
        data = (batch.x, batch.y, batch.sample_weight)
        self.x, self.y, self.sample_weight = each(lambda a: np.empty((k, *np.shape(a)), np.asarray(a).dtype), data)
        self.add(batch)

    def add(self, batch) -> bool:
        if batch.size != self._rows:
            return False
        n = self.count
        each(lambda out, a: out.__setitem__(n, a), (self.x, self.y, self.sample_weight),
             (batch.x, batch.y, batch.sample_weight))
        self.count += 1
        self.size += batch.size
        self.wait_s += batch.wait_s
        self.read_s += batch.read_s
        self.read_bytes += batch.read_bytes
        self.nbytes += batch.nbytes
        return True

    def done(self) -> Group:
        n = self.count
        self.x, self.y, self.sample_weight = each(lambda a: a[:n] if len(a) != n else a,
                                                  (self.x, self.y, self.sample_weight))
        return self

    @property
    def last(self) -> int:
        return self.index + self.count - 1
