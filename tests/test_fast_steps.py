"""Fused steps (k batches per compiled call), device prefetch and vector-valued metrics:
the numbers stay fit's, on every backend."""

import keras
import numpy as np
import pytest

import pipetrain
from pipetrain import device
from pipetrain.errors import RunError
from tests.conftest import write_h5
from tests.test_train import arrays, assert_same_history, assert_same_weights, binary_model

pytestmark = pytest.mark.model
BACKEND = keras.backend.backend()


@pytest.fixture
def binary(tmp_path):
    """150 + 61 rows: 6 batches of 32 and a partial one of 19."""
    rng = np.random.default_rng(7)
    paths = []
    for name, n in (("a.h5", 150), ("b.h5", 61)):
        x = rng.normal(size=(n, 10)).astype("float32")
        y = (x[:, 0] - x[:, 1] + rng.normal(scale=0.7, size=n) > 0).astype("float32")
        paths.append(write_h5(tmp_path / name, chunks=32, x=x, y=y))
    return paths


def fit_history(paths, k, epochs=3):
    x, y = arrays(paths, "x", "y")
    model = binary_model()
    if k > 1:
        model.compile(model.optimizer, model.loss, metrics=["accuracy", keras.metrics.AUC(name="auc"),
                                                            keras.metrics.Precision(name="precision")],
                      steps_per_execution=k)
    return model, model.fit(x, y, batch_size=32, epochs=epochs, shuffle=False, verbose=0).history


def test_k_batches_per_call_are_fit_bit_for_bit_with_two_outputs_and_sample_weights(tmp_path):
    """Not merely close: the same weights and epoch metrics as ``fit(steps_per_execution=3)``
    (PyTorch's fit trains one batch a step: there the per-batch fit), to the last bit. A
    ``lax.scan`` of k steps on JAX differed in the last bits (1.6e-7 relative)."""
    rng = np.random.default_rng(1)
    n = 211
    x = rng.normal(size=(n, 6)).astype("float32")
    ya, yb = (x[:, 0] > 0).astype("float32"), (x[:, 1] + x[:, 2]).astype("float32")
    w = rng.uniform(0.5, 2, size=n).astype("float32")
    path = write_h5(tmp_path / "d.h5", chunks=32, x=x, ya=ya, yb=yb, w=w)

    def model(k):
        keras.utils.set_random_seed(0)
        i = keras.Input((6,), name="x")
        h = keras.layers.Dense(8, activation="relu")(i)
        m = keras.Model(i, {"a": keras.layers.Dense(1, activation="sigmoid", name="a")(h),
                            "b": keras.layers.Dense(1, name="b")(h)})
        m.compile(keras.optimizers.Adam(0.01), {"a": "binary_crossentropy", "b": "mse"},
                  metrics={"a": ["accuracy", keras.metrics.AUC(name="auc")], "b": ["mae"]}, steps_per_execution=k)
        return m

    reference = model(1 if BACKEND == "torch" else 3)
    expected = reference.fit(x, {"a": ya, "b": yb}, sample_weight=w, batch_size=32, epochs=2, shuffle=False,
                             verbose=0).history
    ours = model(1)
    source = pipetrain.H5Source(path, x="x", y={"a": "ya", "b": "yb"}, sample_weight="w")
    got = pipetrain.train(ours, source, epochs=2, batch_size=32, shuffle="none", verbose=0, monitor_interval=None,
                          steps_per_execution=3).history
    assert sorted(got) == sorted(expected)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    for a, b in zip(ours.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("k", [3, 16])
def test_k_batches_per_call_give_fits_epoch_metrics_and_weights(binary, tmp_path, k):
    # PyTorch's fit refuses steps_per_execution > 1: there the per-batch fit is the reference.
    reference, expected = fit_history(binary, 1 if BACKEND == "torch" else k)
    _, per_batch = fit_history(binary, 1)
    model = binary_model()
    history = pipetrain.train(model, pipetrain.H5Source(binary, x="x", y="y"), epochs=3, batch_size=32,
                              shuffle="none", verbose=0, steps_per_execution=k,
                              history=tmp_path / "run" / "history.jsonl", monitor_interval=None)
    assert_same_history(history.history, expected)
    assert_same_history(history.history, per_batch)
    assert_same_weights(model, reference)

    # One record per group of up to k batches; the partial last batch is a group of its own.
    records = pipetrain.read_history(tmp_path / "run" / "history.jsonl").batches
    lasts = [min(i + k, 6) - 1 for i in range(0, 6, k)] + [6]
    assert [(r["epoch"], r["batch"]) for r in records] == [(e, last) for e in range(3) for last in lasts]
    for r in records:
        count = r.get("batches", 1)
        assert r["size"] == (19 if r["batch"] == 6 else 32 * count)
        assert np.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1


def test_a_group_records_the_metrics_of_its_batches(binary, tmp_path):
    """The record of a group holds the model's metrics over those batches alone."""
    x, y = arrays(binary, "x", "y")
    model = binary_model()
    pipetrain.train(model, pipetrain.H5Source(binary, x="x", y="y"), epochs=1, batch_size=32, shuffle="none",
                    verbose=0, steps_per_execution=3, history=tmp_path / "r" / "history.jsonl", monitor_interval=None)
    records = pipetrain.read_history(tmp_path / "r" / "history.jsonl").batches
    # Replay on a twin: its first batch alone (the group a fresh model starts with is trained
    # as one batch, then the rest), then batches 3-5 from zeroed metrics.
    twin = binary_model()
    for b in range(3):
        twin.train_on_batch(x[32 * b:32 * b + 32], y[32 * b:32 * b + 32])
    twin.reset_metrics()
    for b in range(3, 6):
        logs = _accumulating_train_on_batch(twin, x[32 * b:32 * b + 32], y[32 * b:32 * b + 32])
    second = records[1]
    assert (second["batch"], second["batches"]) == (5, 3)
    for name in ("loss", "accuracy", "auc"):
        np.testing.assert_allclose(second[name], logs[name], rtol=1e-5)


def _accumulating_train_on_batch(model, x, y):
    """One training step whose metrics add to the running ones (as within fit)."""
    state = [np.array(keras.ops.convert_to_numpy(v)) for v in model.metrics_variables]
    model.train_on_batch(x, y)  # Keras >= 3.15 resets the metrics first
    for v, before in zip(model.metrics_variables, state, strict=True):
        v.assign(before + keras.ops.convert_to_numpy(v))
    return {k: float(v) for k, v in model.get_metrics_result().items()}


def test_a_run_stopped_mid_epoch_with_groups_resumes_exactly(binary, tmp_path):
    class StopAt(keras.callbacks.Callback):
        def __init__(self, at=None):
            super().__init__()
            self.at = at

        def on_train_batch_end(self, batch, logs=None):
            if self.at is not None and batch >= self.at:
                self.model.stop_training = True

    source = pipetrain.H5Source(binary, x="x", y="y")
    straight = binary_model()
    expected = pipetrain.train(straight, source, epochs=2, batch_size=32, shuffle="block", seed=3, verbose=0,
                               steps_per_execution=3, monitor_interval=None, callbacks=[StopAt()]).history
    model = binary_model()
    run = tmp_path / "run" / "history.jsonl"
    pipetrain.train(model, source, epochs=2, batch_size=32, shuffle="block", seed=3, verbose=0,
                    steps_per_execution=3, monitor_interval=None, history=run, callbacks=[StopAt(3)])
    stopped = pipetrain.read_history(run)
    assert stopped.end["status"] == "stopped" and stopped.batches[-1]["batch"] == 5  # after the 2nd group
    resumed = binary_model()
    history = pipetrain.train(resumed, source, epochs=2, batch_size=32, shuffle="block", seed=3, verbose=0,
                              steps_per_execution=3, monitor_interval=None, history=run, resume=True,
                              callbacks=[StopAt()])
    assert_same_history(history.history, expected)
    for a, b in zip(resumed.get_weights(), straight.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_device_prefetch_hands_the_loop_exactly_the_produced_batches(tmp_path):
    x = np.arange(100 * 3, dtype="float32").reshape(100, 3)
    y = np.arange(100, dtype="int64")
    path = write_h5(tmp_path / "d.h5", chunks=8, x=x, y=y)
    assert device.accelerator() is not None or device.device_copier() is None  # "auto" on a CPU: nothing to do
    copy = device.device_copier(force=True)
    seen = []
    with pipetrain.Run(pipetrain.H5Source(path, x="x", y="y"), batch_size=16, epochs=2, shuffle="none",
                       verbose=0, monitor_interval=None, device_prefetch=True, models=binary_model()) as run:
        for epoch in run.epochs():
            for batch in epoch:
                assert not isinstance(batch.x, np.ndarray)  # the backend's own array, on its device
                seen.append((keras.ops.convert_to_numpy(batch.x), keras.ops.convert_to_numpy(batch.y)))
    assert len(seen) == 14
    got_x = np.concatenate([s[0] for s in seen])
    got_y = np.concatenate([s[1] for s in seen])
    np.testing.assert_array_equal(got_x, np.concatenate([x, x]))
    np.testing.assert_array_equal(got_y, np.concatenate([y, y]))
    copied = copy((x[:4], y[:4], None))
    assert copied[2] is None and np.array_equal(keras.ops.convert_to_numpy(copied[0]), x[:4])


def test_train_with_device_prefetch_and_groups_equals_fit(binary):
    reference, expected = fit_history(binary, 1)
    model = binary_model()
    history = pipetrain.train(model, pipetrain.H5Source(binary, x="x", y="y"), epochs=3, batch_size=32,
                              shuffle="none", verbose=0, steps_per_execution=4, device_prefetch=True,
                              monitor_interval=None)
    assert_same_history(history.history, expected)
    assert_same_weights(model, reference)


def f1_model():
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, activation="softmax")])
    model.compile("adam", "categorical_crossentropy",
                  metrics=[keras.metrics.F1Score(average=None, name="f1"), "accuracy"])
    return model


def test_a_per_class_metric_works_as_in_fit_in_records_and_checkpoints(tmp_path):
    """Issue 16 item 7: F1Score(average=None) crashed train() at batch 0 and its History
    was refused by the checkpoint."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(90, 6)).astype("float32")
    y = np.eye(3, dtype="float32")[np.argmax(x[:, :3], axis=1)]
    path = write_h5(tmp_path / "f1.h5", chunks=16, x=x, y=y)
    expected = f1_model().fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0).history

    source = pipetrain.H5Source(path, x="x", y="y")
    run = tmp_path / "run" / "history.jsonl"
    pipetrain.train(f1_model(), source, epochs=2, batch_size=16, shuffle="none", verbose=0,
                    monitor_interval=None, history=run)
    model = f1_model()
    history = pipetrain.train(model, source, epochs=3, batch_size=16, shuffle="none", verbose=0,
                              monitor_interval=None, history=run, resume=True)
    assert [np.shape(v) for v in history.history["f1"]] == [(3,)] * 3
    assert_same_history(history.history, expected)

    records = pipetrain.read_history(run)
    assert all(isinstance(r["f1"], list) and len(r["f1"]) == 3 for r in records.batches)
    assert len(records.batches) == 18
    np.testing.assert_allclose([e["f1"] for e in records.epochs], expected["f1"], rtol=1e-5)


@pytest.mark.parametrize("k", [1, 3])
def test_a_model_recompiled_between_epochs_trains_on_as_fit_does(binary, tmp_path, k):
    """A new optimizer and metrics at epoch 2 (a fine-tuning step): the epoch equals fit's
    after the same compile, and each record holds its own batches' metrics (JAX failed
    at once: 'SGD must be built'; elsewhere the records held running means)."""
    x, y = arrays(binary, "x", "y")

    def recompile(model):
        model.compile(keras.optimizers.SGD(0.05), "binary_crossentropy",
                      metrics=["accuracy", keras.metrics.AUC(name="auc")])

    reference = binary_model()
    first = reference.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0).history
    recompile(reference)
    second = reference.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0).history

    model = binary_model()
    history = tmp_path / "run" / "history.jsonl"
    with pipetrain.Run(pipetrain.H5Source(binary, x="x", y="y"), batch_size=32, epochs=2, shuffle="none",
                       history=history, models=model, verbose=0, monitor_interval=None) as run:
        for epoch in run.epochs():
            if epoch.index == 1:
                recompile(model)
            for group in epoch.groups(k):
                epoch.train_on_group(model, group)
    epochs = pipetrain.read_history(history).epochs
    for epoch, expected in zip(epochs, (first, second), strict=True):  # epoch 2 without precision
        assert_same_history({n: epoch[n] for n in expected}, {n: v[0] for n, v in expected.items()})
        assert "precision" in epoch if expected is first else "precision" not in epoch
    assert_same_weights(model, reference)
    records = [r for r in pipetrain.read_history(history).batches if r["epoch"] == 1]
    if k == 1:  # a batch's own loss: the size-weighted mean of the records is the epoch's
        mean = sum(r["loss"] * r["size"] for r in records) / sum(r["size"] for r in records)
        np.testing.assert_allclose(mean, second["loss"][0], rtol=1e-5)


@pytest.mark.parametrize("k, message", [
    (0, "steps_per_execution=0 must be a whole number >= 1"),
    (2.5, "steps_per_execution=2.5 must be a whole number >= 1"),
    ("16", "steps_per_execution='16' must be a whole number >= 1"),
    (None, "steps_per_execution=None must be a whole number >= 1"),
    (True, "steps_per_execution=True must be a whole number >= 1"),
])
def test_a_bad_steps_per_execution_is_refused_before_anything_is_written(binary, tmp_path, k, message):
    """It was checked once the history was written (a failed run that blocked the
    corrected call), or failed with a TypeError, or True trained as 1."""
    with pytest.raises(RunError) as raised:
        pipetrain.train(binary_model(), pipetrain.H5Source(binary, x="x", y="y"), batch_size=32, verbose=0,
                        steps_per_execution=k, history=tmp_path / "r" / "history.jsonl")
    assert str(raised.value) == message
    assert not (tmp_path / "r").exists()


def test_a_model_that_runs_eagerly_refuses_groups_before_training(binary, tmp_path):
    """Its batches go through its own eager train_on_batch, one a step: a group of them
    failed after training the first batch ('k=3: ... no fused step here')."""
    model = binary_model()
    model.compile(model.optimizer, model.loss, run_eagerly=True)
    before = [w.copy() for w in model.get_weights()]
    source = pipetrain.H5Source(binary, x="x", y="y")
    with pytest.raises(RunError, match=r"steps_per_execution=4: model '\w+' trains one batch a step: "
                                                 r"it is compiled with run_eagerly=True"):
        pipetrain.train(model, source, batch_size=32, verbose=0, steps_per_execution=4,
                        history=tmp_path / "r" / "history.jsonl")
    assert not (tmp_path / "r").exists()
    with pipetrain.Run(source, batch_size=32, models=model, verbose=0, monitor_interval=None) as run:
        for epoch in run.epochs():
            for group in epoch.groups(4):
                with pytest.raises(RunError, match="trains one batch a step"):
                    epoch.train_on_group(model, group)
                run.stop()  # (leaving the epoch early, said so: no warning)
                break
            break
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # nothing trained


def test_a_group_size_beyond_the_epoch_holds_the_epochs_batches_only(binary, tmp_path):
    """k = 10**9 allocated room for k batches (119 GiB: MemoryError); as fit, it is one
    group of the epoch's batches."""
    model = binary_model()
    history = pipetrain.train(model, pipetrain.H5Source(binary, x="x", y="y"), epochs=2, batch_size=32,
                              shuffle="none", verbose=0, steps_per_execution=10**9, monitor_interval=None)
    _, expected = fit_history(binary, 1, epochs=2)
    assert_same_history(history.history, expected)


@pytest.mark.parametrize("value", [1, 1.0, np.True_, 0, "yes"])
def test_device_prefetch_takes_true_false_or_auto_only(binary, value):
    """1 == True let 1, 1.0 and numpy's True through, acting as 'auto'."""
    with pytest.raises(RunError, match=r"device_prefetch=.*: expected True, False or 'auto'"):
        pipetrain.Run(pipetrain.H5Source(binary, x="x", y="y"), batch_size=32, device_prefetch=value)


class NestedLogs(keras.Sequential):
    """A train_step returning the compiled metrics' result as a nested dict, as the Keras
    guides' ``{m.name: m.result() for m in self.metrics}`` does."""

    if BACKEND == "jax":
        def train_step(self, state, data):
            logs, state = super().train_step(state, data)
            return {"loss": logs["loss"], "compile_metrics": {k: v for k, v in logs.items() if k != "loss"}}, state
    else:
        def train_step(self, data):
            logs = super().train_step(data)
            return {"loss": logs["loss"], "compile_metrics": {k: v for k, v in logs.items() if k != "loss"}}


def test_a_train_step_returning_nested_logs_trains_as_in_fit(binary, tmp_path):
    """It failed at the second batch (the first goes through train_on_batch) on every backend."""
    def model():
        keras.utils.set_random_seed(0)
        m = NestedLogs([keras.Input((10,)), keras.layers.Dense(8, activation="relu"),
                        keras.layers.Dense(1, activation="sigmoid")])
        m.compile(keras.optimizers.Adam(0.01), "binary_crossentropy", metrics=["accuracy"])
        return m

    x, y = arrays(binary, "x", "y")
    reference = model()
    expected = reference.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0).history
    ours = model()
    history = pipetrain.train(ours, pipetrain.H5Source(binary, x="x", y="y"), epochs=2, batch_size=32,
                              shuffle="none", verbose=0, history=tmp_path / "r" / "history.jsonl",
                              monitor_interval=None)
    assert_same_history(history.history, expected)
    assert_same_weights(ours, reference)
    assert all("accuracy" in r for r in pipetrain.read_history(tmp_path / "r" / "history.jsonl").batches)


def test_a_models_jit_compile_choice_is_kept(binary, monkeypatch):
    """JAX, jit_compile=False: fit runs the step unjitted, so Python in it runs every batch
    (the fused step jitted it: 3 calls of 14). PyTorch, jit_compile=True: fit runs the step
    through torch.compile (the fused step ran 1 of 14 through it). TensorFlow,
    jit_compile=False: a step holding an op XLA cannot compile (a numpy_function, run
    every batch) trains as in fit."""
    calls = []
    if BACKEND == "torch":
        import torch

        def counting_compile(function, *args, **kwargs):  # torch.compile, counted and not compiled (CI time)
            def compiled(*a, **kw):
                calls.append(1)
                return function(*a, **kw)
            return compiled

        monkeypatch.setattr(torch, "compile", counting_compile)

    class Counting(keras.Sequential):
        if BACKEND == "jax":
            def train_step(self, state, data):
                calls.append(1)
                return super().train_step(state, data)
        elif BACKEND == "tensorflow":
            def train_step(self, data):
                import tensorflow as tf

                tf.numpy_function(lambda: calls.append(1) or np.int32(0), [], tf.int32)
                return super().train_step(data)

    model = Counting([keras.Input((10,)), keras.layers.Dense(1, activation="sigmoid")])
    model.compile("adam", "binary_crossentropy", jit_compile=BACKEND == "torch")
    pipetrain.train(model, pipetrain.H5Source(binary, x="x", y="y"), epochs=2, batch_size=32, verbose=0,
                    monitor_interval=None)
    assert len(calls) == 14  # 7 batches an epoch, each through the model's own step


@pytest.mark.one_backend  # TensorFlow's tracing is its subject (CI deselects it on the others)
@pytest.mark.skipif(BACKEND != "tensorflow", reason="JAX compiles each shape (XLA), PyTorch traces nothing")
@pytest.mark.parametrize("k", [1, 4])
def test_the_short_last_batch_does_not_trace_the_step_again(binary, monkeypatch, k):
    """6 batches of 32 and one of 19 (k=4: groups of 4, 2 and 1): one trace for any rows."""
    from pipetrain import fused

    steps = []
    build = fused._TFStep._build
    monkeypatch.setattr(fused._TFStep, "_build", lambda self: (steps.append(self), build(self)))
    model = binary_model()
    pipetrain.train(model, pipetrain.H5Source(binary, x="x", y="y"), epochs=2, batch_size=32, shuffle="none",
                    verbose=0, monitor_interval=None, steps_per_execution=k)
    [step] = steps
    assert step._one_fn.experimental_get_tracing_count() == 1
    assert step._many_fn.experimental_get_tracing_count() == (k > 1)
