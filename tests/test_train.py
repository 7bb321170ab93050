"""train() against fit(): the same epoch metrics (AUC, precision, a partial last batch,
validation, several inputs and outputs, sample and class weights) and the same weights,
with Keras callbacks working as they do in fit."""

import csv
import re

import h5py
import keras
import numpy as np
import pytest

import pipetrain
from pipetrain.errors import RunError
from tests.conftest import write_h5

pytestmark = pytest.mark.model

BACKEND = keras.backend.backend()
RTOL = 1e-5  # the promise; in practice the numbers are bit-for-bit equal


def arrays(paths, *names):
    out = []
    for name in names:
        parts = []
        for p in paths:
            with h5py.File(p, "r") as f:
                parts.append(f[name][...])
        out.append(np.concatenate(parts))
    return out


def assert_same_history(ours: dict, theirs: dict):
    assert set(ours) == set(theirs), (sorted(ours), sorted(theirs))
    for key in theirs:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=RTOL, err_msg=key)


def assert_same_weights(a, b):
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_allclose(wa, wb, rtol=RTOL, atol=1e-7)


@pytest.fixture
def binary_files(tmp_path):
    """Two files (150 + 61 rows) of a noisy binary problem, and a validation file."""
    rng = np.random.default_rng(7)

    def make(name, n):
        x = rng.normal(size=(n, 10)).astype("float32")
        y = (x[:, 0] - x[:, 1] + rng.normal(scale=0.7, size=n) > 0).astype("float32")
        w = rng.uniform(0.2, 2.0, size=n).astype("float32")
        return write_h5(tmp_path / name, chunks=32, x=x, y=y, w=w)

    return [make("a.h5", 150), make("b.h5", 61)], make("val.h5", 45)


def binary_model(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((10,)),
        keras.layers.Dense(8, activation="relu"),
        keras.layers.Dense(1, activation="sigmoid"),
    ])
    model.compile(
        keras.optimizers.Adam(0.01), "binary_crossentropy",
        metrics=["accuracy", keras.metrics.AUC(name="auc"), keras.metrics.Precision(name="precision")],
    )
    return model


def test_epoch_metrics_equal_fit_with_auc_precision_and_a_partial_batch(binary_files):
    train_paths, val_path = binary_files
    x, y = arrays(train_paths, "x", "y")
    vx, vy = arrays([val_path], "x", "y")
    reference = binary_model()
    expected = reference.fit(x, y, batch_size=32, epochs=3, shuffle=False, validation_data=(vx, vy), verbose=0)

    model = binary_model()
    source = pipetrain.H5Source(train_paths, x="x", y="y")
    val = pipetrain.H5Source(val_path, x="x", y="y")
    history = pipetrain.train(model, source, epochs=3, batch_size=32, validation=val, shuffle="none", verbose=0)

    assert isinstance(history, keras.callbacks.History)
    assert 211 % 32 != 0  # the last batch is partial
    assert_same_history(history.history, expected.history)
    assert_same_weights(model, reference)
    # val_* equal evaluate() on the validation file.
    ours = pipetrain.evaluate(model, val, batch_size=32)
    theirs = model.evaluate(vx, vy, batch_size=32, verbose=0, return_dict=True)
    assert_same_history({k: [v] for k, v in ours.items()}, {k: [v] for k, v in theirs.items()})


@pytest.mark.model
def test_a_validation_split_equals_fits_validation_split(binary_files):
    """source.split(0.2) (and --val-split) validate on the last rows before any
    shuffling, across the two files, as fit(validation_split=0.2) does: same history."""
    train_paths, _ = binary_files
    x, y = arrays(train_paths, "x", "y")
    expected = binary_model().fit(x, y, batch_size=32, epochs=2, shuffle=False, validation_split=0.2, verbose=0)
    train, val = pipetrain.H5Source(train_paths, x="x", y="y").split(0.2)
    assert train.row_range == (0, 168) and val.row_range == (168, 211)  # the cut falls in the second file
    history = pipetrain.train(binary_model(), train, epochs=2, batch_size=32, validation=val, shuffle="none", verbose=0)
    assert_same_history(history.history, expected.history)


def test_sample_weights_from_a_dataset_equal_fit(binary_files):
    train_paths, _ = binary_files
    x, y, w = arrays(train_paths, "x", "y", "w")
    reference = binary_model(1)
    expected = reference.fit(x, y, sample_weight=w, batch_size=40, epochs=2, shuffle=False, verbose=0)
    model = binary_model(1)
    source = pipetrain.H5Source(train_paths, x="x", y="y", sample_weight="w")
    history = pipetrain.train(model, source, epochs=2, batch_size=40, shuffle="none", verbose=0)
    assert_same_history(history.history, expected.history)
    assert_same_weights(model, reference)


def test_class_weights_equal_fit(classification_files):
    x, y = arrays(classification_files, "x", "y")

    def make():
        keras.utils.set_random_seed(3)
        m = keras.Sequential([keras.Input((12,)), keras.layers.Dense(3, activation="softmax")])
        m.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy", metrics=["accuracy"])
        return m

    weights = {0: 0.5, 1: 2.0, 2: 1.0}
    reference = make()
    expected = reference.fit(x, y, class_weight=weights, batch_size=50, epochs=2, shuffle=False, verbose=0)
    model = make()
    history = pipetrain.train(
        model, pipetrain.H5Source(classification_files, x="x", y="y"), epochs=2, batch_size=50,
        shuffle="none", class_weight=weights, verbose=0,
    )
    assert_same_history(history.history, expected.history)


@pytest.fixture
def multi_files(tmp_path):
    rng = np.random.default_rng(11)
    paths = []
    for i, n in enumerate([90, 47]):
        image = rng.normal(size=(n, 4, 4)).astype("float32")
        meta = rng.normal(size=(n, 3)).astype("float32")
        label = (image.mean(axis=(1, 2)) + meta[:, 0] > 0).astype("int64")
        score = (meta.sum(axis=1, keepdims=True)).astype("float32")
        paths.append(write_h5(tmp_path / f"m{i}.h5", chunks=16, image=image, meta=meta, label=label, score=score))
    return paths


def multi_model():
    keras.utils.set_random_seed(5)
    image = keras.Input((4, 4), name="image_in")
    meta = keras.Input((3,), name="meta_in")
    h = keras.layers.Concatenate()([keras.layers.Flatten()(image), meta])
    h = keras.layers.Dense(8, activation="relu")(h)
    cls = keras.layers.Dense(2, activation="softmax", name="cls")(h)
    reg = keras.layers.Dense(1, name="reg")(h)
    model = keras.Model({"image_in": image, "meta_in": meta}, {"cls": cls, "reg": reg})
    model.compile(
        keras.optimizers.Adam(0.01),
        loss={"cls": "sparse_categorical_crossentropy", "reg": "mse"},
        metrics={"cls": ["accuracy"], "reg": ["mae"]},
    )
    return model


@pytest.mark.parametrize("batch_size", [32, 137])  # 137 rows: a partial last batch, then none
def test_multi_input_multi_output_equal_fit(multi_files, batch_size):
    image, meta, label, score = arrays(multi_files, "image", "meta", "label", "score")
    reference = multi_model()
    expected = reference.fit(
        {"image_in": image, "meta_in": meta}, {"cls": label, "reg": score},
        batch_size=batch_size, epochs=2, shuffle=False, verbose=0,
    )
    model = multi_model()
    source = pipetrain.H5Source(
        multi_files, x={"image_in": "image", "meta_in": "meta"}, y={"cls": "label", "reg": "score"}
    )
    history = pipetrain.train(model, source, epochs=2, batch_size=batch_size, shuffle="none", verbose=0)
    assert_same_history(history.history, expected.history)
    assert_same_weights(model, reference)


def dropout_model(k=1, seed=0):
    """An unseeded Dropout: on PyTorch its masks come from torch's global generator."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dropout(0.3), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(keras.optimizers.Adam(0.01), "binary_crossentropy", metrics=["accuracy"],
                  steps_per_execution=1 if BACKEND == "torch" else k)  # PyTorch's fit takes 1 only
    return model


@pytest.mark.parametrize("k", [1, 3])
def test_a_dropout_model_draws_the_masks_fit_draws(binary_files, k):
    """Same dropout masks as fit, so the same history (validation included) and weights:
    on PyTorch, fit's DataLoader draws from the generator the masks come from, and
    pipetrain draws the same at the same moments (pipetrain.fitlike); before, the masks
    differed from the first batch on."""
    train_paths, val_path = binary_files
    x, y = arrays(train_paths, "x", "y")
    xv, yv = arrays([val_path], "x", "y")
    reference = dropout_model(k)
    expected = reference.fit(x, y, batch_size=32, epochs=3, shuffle=False, validation_data=(xv, yv), verbose=0)
    model = dropout_model()
    history = pipetrain.train(model, pipetrain.H5Source(train_paths, x="x", y="y"), epochs=3, batch_size=32,
                              validation=pipetrain.H5Source(val_path, x="x", y="y"), shuffle="none", verbose=0,
                              steps_per_execution=k)
    assert_same_history(history.history, expected.history)
    assert_same_weights(model, reference)


@pytest.mark.skipif(BACKEND != "torch", reason="a torch Module's training mode is PyTorch's")
def test_a_wrapped_torch_layer_trains_in_torchs_training_mode_as_in_fit(binary_files):
    """fit puts the model in torch's training mode for each epoch (a model evaluated
    before is in evaluation mode): a wrapped torch.nn.Dropout drops as in fit (before,
    pipetrain trained such a model with the dropout off)."""
    import torch

    def wrapped():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(16, activation="relu"),
                                  keras.layers.TorchModuleWrapper(torch.nn.Dropout(0.3)),
                                  keras.layers.Dense(1, activation="sigmoid")])
        model.compile(keras.optimizers.Adam(0.01), "binary_crossentropy", metrics=["accuracy"])
        return model

    train_paths, val_path = binary_files
    x, y = arrays(train_paths, "x", "y")
    xv, yv = arrays([val_path], "x", "y")
    reference = wrapped()  # (each model made just before its run: the seed sets torch's generator too)
    reference.evaluate(xv, yv, verbose=0)  # leaves the Module in evaluation mode
    expected = reference.fit(x, y, batch_size=32, epochs=2, shuffle=False, validation_data=(xv, yv), verbose=0)
    model = wrapped()
    model.evaluate(xv, yv, verbose=0)
    history = pipetrain.train(model, pipetrain.H5Source(train_paths, x="x", y="y"), epochs=2, batch_size=32,
                              validation=pipetrain.H5Source(val_path, x="x", y="y"), shuffle="none", verbose=0)
    assert_same_history(history.history, expected.history)
    assert_same_weights(model, reference)
    assert not model.training  # left in evaluation mode, as fit leaves it

    # A custom loop's validation mid-epoch (fit has none) leaves the model in training mode.
    with pipetrain.Run(pipetrain.H5Source(train_paths, x="x", y="y"), batch_size=32, epochs=1, models=model,
                       verbose=0) as run:
        for epoch in run.epochs():
            for batch in epoch:
                epoch.train_on_batch(model, batch.x, batch.y)
                if batch.index == 1:
                    epoch.evaluate(model, pipetrain.H5Source(val_path, x="x", y="y"))
                    assert model.training
    assert not model.training


@pytest.mark.skipif(BACKEND != "torch", reason="a torch Module's training mode is PyTorch's")
def test_a_models_own_method_named_train_is_never_called(binary_files):
    """The Module's mode is set as torch.nn.Module.train sets it: a model class may have a
    method of its own named train (a GAN's), which pipetrain must not run."""
    class Trainer(keras.Sequential):
        def train(self, *args, **kwargs):
            raise AssertionError("the model's own train() was called")

    train_paths, val_path = binary_files
    keras.utils.set_random_seed(0)
    model = Trainer([keras.Input((10,)), keras.layers.Dense(4, activation="relu"),
                     keras.layers.Dense(1, activation="sigmoid")])
    model.compile("adam", "binary_crossentropy")
    pipetrain.train(model, pipetrain.H5Source(train_paths, x="x", y="y"), epochs=2, batch_size=32,
                    validation=pipetrain.H5Source(val_path, x="x", y="y"), verbose=0)
    assert not model.training


def test_shapes_that_do_not_fit_the_model_are_refused(binary_files):
    train_paths, _ = binary_files
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((11,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    with pytest.raises(pipetrain.SourceError, match=r"dataset 'x' rows are \(10,\) but the model's input .* expects \(11,\)"):
        pipetrain.train(model, pipetrain.H5Source(train_paths, x="x", y="y"), verbose=0)



@pytest.mark.parametrize("size", ["7", 2.5, 10**30])
def test_a_bad_validation_batch_size_is_refused_before_anything_is_trained(binary_files, tmp_path, size):
    """It was taken as given and failed only at the first validation, after a whole epoch
    trained (a TypeError, a batch_size message that did not name it, a producer's
    overflow)."""
    train_paths, val_path = binary_files
    history = tmp_path / "run" / "history.jsonl"
    with pytest.raises(RunError, match=r"validation_batch_size=.* must be a whole number"):
        pipetrain.train(binary_model(), pipetrain.H5Source(train_paths, x="x", y="y"), epochs=1,
                        validation=pipetrain.H5Source(val_path, x="x", y="y"), validation_batch_size=size,
                        history=history, verbose=0)
    assert not history.exists()


def test_validation_targets_shaped_unlike_the_training_targets_are_refused_before_training(binary_files, tmp_path):
    """y rows of (2,) against the training's (): it failed at the first validation, after
    a whole epoch trained (exit 1, no checkpoint, no file named)."""
    train_paths, _ = binary_files
    val = write_h5(tmp_path / "val2.h5", x=np.zeros((20, 10), "float32"), y=np.zeros((20, 2), "float32"))
    history = tmp_path / "run" / "history.jsonl"
    with pytest.raises(pipetrain.SourceError, match=r"val2\.h5: dataset 'y' rows are \(2,\) but the training data's 'y' rows are \(\)"):
        pipetrain.train(binary_model(), pipetrain.H5Source(train_paths, x="x", y="y"), epochs=1,
                        validation=pipetrain.H5Source(val, x="x", y="y"), history=history, verbose=0)
    assert not history.exists()
    # (rows,) and (rows, 1) are the same targets to a loss: still taken
    val1 = write_h5(tmp_path / "val1.h5", x=np.zeros((20, 10), "float32"), y=np.zeros((20, 1), "float32"))
    pipetrain.train(binary_model(), pipetrain.H5Source(train_paths, x="x", y="y"), epochs=1,
                    validation=pipetrain.H5Source(val1, x="x", y="y"), verbose=0)


def test_a_model_whose_loss_needs_targets_refuses_a_source_without_y_before_training(binary_files, tmp_path):
    """It failed at the first batch: "training failed: None values not supported." (exit 1,
    no flag named). A model that computes its own loss may take no targets."""
    train_paths, _ = binary_files
    history = tmp_path / "run" / "history.jsonl"
    with pytest.raises(RunError, match=r"the model's loss \(binary_crossentropy\) needs targets, but the source has none"):
        pipetrain.train(binary_model(), pipetrain.H5Source(train_paths, x="x"), epochs=1, history=history, verbose=0)
    assert not history.exists()

    class OwnLoss(keras.Model):
        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
            return keras.ops.mean(keras.ops.square(y_pred))

    inputs = keras.Input((10,))
    model = OwnLoss(inputs, keras.layers.Dense(1)(inputs))
    model.compile("sgd", "mse")
    assert pipetrain.train(model, pipetrain.H5Source(train_paths, x="x"), epochs=1, verbose=0).history["loss"]

# -- Keras callbacks, driven by hand as fit drives them ------------------------------------


def test_early_stopping_and_reduce_lr_behave_as_in_fit(binary_files, tmp_path):
    train_paths, val_path = binary_files
    x, y = arrays(train_paths, "x", "y")
    vx, vy = arrays([val_path], "x", "y")

    def callbacks(folder):
        return [
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=1, min_delta=0.05),
            keras.callbacks.ReduceLROnPlateau(monitor="loss", patience=0, factor=0.5, min_delta=0.5),
            keras.callbacks.CSVLogger(str(folder / "log.csv")),
        ]

    (tmp_path / "fit").mkdir()
    (tmp_path / "ours").mkdir()
    reference = binary_model()
    expected = reference.fit(x, y, batch_size=32, epochs=30, shuffle=False, validation_data=(vx, vy),
                             callbacks=callbacks(tmp_path / "fit"), verbose=0)
    model = binary_model()
    history = pipetrain.train(
        model, pipetrain.H5Source(train_paths, x="x", y="y"), epochs=30, batch_size=32,
        validation=pipetrain.H5Source(val_path, x="x", y="y"), shuffle="none",
        callbacks=callbacks(tmp_path / "ours"), verbose=0, history=tmp_path / "ours" / "history.jsonl",
    )
    assert len(expected.history["loss"]) < 30  # early stopping did stop
    assert_same_history(history.history, expected.history)  # same epochs, same learning rates
    with open(tmp_path / "fit" / "log.csv") as a, open(tmp_path / "ours" / "log.csv") as b:
        rows_a, rows_b = list(csv.DictReader(a)), list(csv.DictReader(b))
    assert [r["epoch"] for r in rows_a] == [r["epoch"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for key in ra:
            np.testing.assert_allclose(float(rb[key]), float(ra[key]), rtol=RTOL, err_msg=key)
    end = pipetrain.read_history(tmp_path / "ours" / "history.jsonl").end
    assert end["status"] == "stopped" and end["epochs"] == len(expected.history["loss"])


@pytest.mark.model
def test_a_run_early_stopping_ended_names_why_and_its_resume_changes_nothing(binary_files, tmp_path, capsys):
    """The end record says which callback stopped the run and when, the summary names
    the best epoch; resuming it (or a completed run) says "already complete", writes
    nothing and returns its History and weights; more epochs extend it."""
    from pipetrain.outcome import best_epoch
    from pipetrain.progress import RunState, backend_text, summary

    train_paths, val_path = binary_files
    source = pipetrain.H5Source(train_paths, x="x", y="y")
    val = pipetrain.H5Source(val_path, x="x", y="y")
    folder = tmp_path / "es"

    def run(model, epochs, **kwargs):
        return pipetrain.train(model, source, epochs=epochs, batch_size=32, validation=val, shuffle="none",
                               callbacks=[keras.callbacks.EarlyStopping(patience=1, min_delta=0.05)],
                               history=folder / "history.jsonl", **kwargs)

    trained = binary_model()
    first = run(trained, 30, verbose=0)
    n = len(first.history["loss"])
    h = pipetrain.read_history(folder)
    assert 1 < n < 30 and h.end["status"] == "stopped"
    assert h.runs[0]["monitor"] == {"name": "val_loss", "mode": "min"}
    name, _, best = best_epoch(h.epochs, h.runs[0]["monitor"])
    assert name == "val_loss" and best["val_loss"] == min(first.history["val_loss"])
    # (by min_delta, EarlyStopping's own best may be an earlier epoch than the lowest val_loss)
    assert re.fullmatch(rf"EarlyStopping at epoch {n}: val_loss did not improve since epoch \d+", h.end["reason"])
    lines = summary(RunState().extend([*h.runs, *h.epochs, h.end])).splitlines()
    backend = backend_text(h.runs[0]["host"])
    assert backend.startswith(keras.backend.backend())
    assert lines[0] == f"stopped: {n} epoch(s), {n * 7:,} steps on {backend} - {h.end['reason']}"
    assert lines[1] == f"best val_loss {best['val_loss']:.4g} at epoch {best['epoch'] + 1}"
    files = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    capsys.readouterr()

    model = binary_model(seed=5)  # other weights: the resume gives the run's
    again = run(model, 30, verbose=1, resume=True)
    assert f"is already complete (EarlyStopping at epoch {n}:" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == files  # nothing written
    assert again.history == first.history
    assert_same_weights(model, trained)

    assert run(binary_model(), n + 2, verbose=0, resume=True).history == first.history  # still within its 30
    more = run(binary_model(), 31, verbose=0, resume=True)  # more epochs than it had: it goes on
    h = pipetrain.read_history(folder)
    assert len(h.runs) == 2 and len(h.epochs) > n and len(more.history["loss"]) == len(h.epochs)


def test_model_checkpoint_terminate_on_nan_and_tensorboard(binary_files, tmp_path):
    train_paths, _ = binary_files
    source = pipetrain.H5Source(train_paths, x="x", y="y")
    model = binary_model()
    pipetrain.train(
        model, source, epochs=2, batch_size=32, verbose=0,
        callbacks=[
            keras.callbacks.ModelCheckpoint(str(tmp_path / "ckpt-{epoch}.keras")),
            keras.callbacks.TensorBoard(str(tmp_path / "tb"), update_freq="batch"),
        ],
    )
    assert (tmp_path / "ckpt-1.keras").exists() and (tmp_path / "ckpt-2.keras").exists()
    restored = keras.saving.load_model(tmp_path / "ckpt-2.keras")
    assert_same_weights(restored, model)
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)

    # TerminateOnNaN stops on the first non-finite batch loss, as in fit.
    keras.utils.set_random_seed(0)
    exploding = keras.Sequential([keras.Input((10,)), keras.layers.Dense(1)])
    exploding.compile(keras.optimizers.SGD(1e30), "mse")
    history = pipetrain.train(
        exploding, source, epochs=5, batch_size=32, shuffle="none", verbose=0,
        callbacks=[keras.callbacks.TerminateOnNaN()], history=tmp_path / "nan.jsonl",
    )
    h = pipetrain.read_history(tmp_path / "nan.jsonl")
    assert len(history.history["loss"]) == 1
    assert h.end["status"] == "stopped"
    assert h.batches[-1]["loss"] is None  # NaN is written as null: strict JSON
    assert len(h.batches) < 7  # stopped mid-epoch


def test_batch_callbacks_see_running_epoch_metrics_as_in_fit(binary_files):
    train_paths, _ = binary_files
    x, y = arrays(train_paths, "x", "y")

    class Recorder(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.batches = []

        def on_train_batch_end(self, batch, logs=None):
            self.batches.append((batch, dict(logs)))

    theirs, ours = Recorder(), Recorder()
    binary_model().fit(x, y, batch_size=32, epochs=2, shuffle=False, callbacks=[theirs], verbose=0)
    pipetrain.train(binary_model(), pipetrain.H5Source(train_paths, x="x", y="y"), epochs=2,
                    batch_size=32, shuffle="none", callbacks=[ours], verbose=0)
    assert [b for b, _ in ours.batches] == [b for b, _ in theirs.batches]
    for (_, a), (_, b) in zip(ours.batches, theirs.batches, strict=True):
        assert set(a) == set(b)
        for key in b:
            np.testing.assert_allclose(a[key], b[key], rtol=RTOL, err_msg=key)


def test_the_models_own_evaluate_in_a_callback_is_untouched_and_counts_nothing(binary_files):
    """A callback may call ``model.evaluate`` mid-epoch (validating every N batches):
    it gets the model's true metrics, and the epoch's metrics stay those of ``fit``."""
    train_paths, val_path = binary_files
    x, y = arrays(train_paths, "x", "y")
    vx, vy = arrays([val_path], "x", "y")

    class EvaluatesToo(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.pairs = []

        def on_train_batch_end(self, batch, logs=None):
            if batch % 3 == 1:
                self.check()

        def on_epoch_end(self, epoch, logs=None):
            self.check()

        def check(self):
            got = self.model.evaluate(vx, vy, batch_size=16, verbose=0, return_dict=True)
            twin = binary_model()
            twin.set_weights(self.model.get_weights())
            self.pairs.append((got, twin.evaluate(vx, vy, batch_size=16, verbose=0, return_dict=True)))

    expected = binary_model().fit(x, y, batch_size=32, epochs=2, shuffle=False, validation_data=(vx, vy), verbose=0)
    callback = EvaluatesToo()
    history = pipetrain.train(binary_model(), pipetrain.H5Source(train_paths, x="x", y="y"), epochs=2,
                              batch_size=32, validation=pipetrain.H5Source(val_path, x="x", y="y"),
                              shuffle="none", callbacks=[callback], verbose=0)
    assert_same_history(history.history, expected.history)
    assert len(callback.pairs) == 2 * (2 + 1)  # batches 1 and 4 of 7, and the epoch end
    for got, want in callback.pairs:
        assert got["loss"] > 0
        assert_same_history(got, want)


@pytest.mark.one_backend  # its subject is not the backend's: TensorFlow covers it (CI time)
def test_a_resumed_run_continues_its_csv_log(binary_files, tmp_path):
    train_paths, _ = binary_files
    source = pipetrain.H5Source(train_paths, x="x", y="y")

    def run(folder, epochs, resume=False):
        model = binary_model()
        pipetrain.train(model, source, epochs=epochs, batch_size=32, shuffle="none", verbose=0, resume=resume,
                        history=folder / "history.jsonl", callbacks=[keras.callbacks.CSVLogger(str(folder / "log.csv"))])

    run(tmp_path / "straight", 3)
    run(tmp_path / "resumed", 1)
    run(tmp_path / "resumed", 3, resume=True)  # the model is sequential_2 now, not sequential_1: one model, it fits
    straight, resumed = ((tmp_path / f / "log.csv").read_text().splitlines() for f in ("straight", "resumed"))
    assert resumed == straight  # one header, every epoch once, the same values


def test_a_single_models_resume_mid_epoch_does_not_depend_on_its_name(binary_files, tmp_path):
    train_paths, _ = binary_files
    source = pipetrain.H5Source(train_paths, x="x", y="y")

    class StopAt(keras.callbacks.Callback):  # the same callbacks on resume, this one idle then
        def __init__(self, at=None):
            super().__init__()
            self.at = at

        def on_train_batch_end(self, batch, logs=None):
            if batch == self.at:
                self.model.stop_training = True

    straight = pipetrain.train(binary_model(), source, epochs=2, batch_size=32, shuffle="none", verbose=0,
                               history=tmp_path / "a" / "history.jsonl")
    pipetrain.train(binary_model(), source, epochs=2, batch_size=32, shuffle="none", verbose=0,
                    history=tmp_path / "b" / "history.jsonl", callbacks=[StopAt(3)])
    resumed = pipetrain.train(binary_model(), source, epochs=2, batch_size=32, shuffle="none", verbose=0,
                              history=tmp_path / "b" / "history.jsonl", resume=True, callbacks=[StopAt()])
    assert_same_history(resumed.history, {k: v[-len(resumed.history[k]):] for k, v in straight.history.items()})
    a, b = (pipetrain.read_history(tmp_path / f / "history.jsonl") for f in ("a", "b"))
    assert [e["loss"] for e in b.epochs] == [e["loss"] for e in a.epochs]
