"""Custom loops on pipetrain.Run: the GAN of docs/custom-loops.md runs as written, is killed
and resumed exactly; two models' epoch aggregates are right; Keras callbacks see the batches."""

import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import pytest

import pipetrain
from tests.conftest import wait_until, write_h5

pytestmark = pytest.mark.model

ROOT = Path(__file__).resolve().parent.parent


EPOCHS = 4  # the guide trains 10: the tests run it 6 times on every backend (CI time)


def guide_gan() -> str:
    text = (ROOT / "docs" / "custom-loops.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if b.startswith("# gan.py"))
    assert block.count("epochs=10,") == 1
    return block.replace("epochs=10,", f"epochs={EPOCHS},")


def run_script(folder: Path, timeout=180):
    return subprocess.Popen([sys.executable, "gan.py"], cwd=folder, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def batches_in(folder: Path) -> int:
    history = folder / "runs" / "gan" / "history.jsonl"
    return history.read_text().count('"type":"batch"') if history.exists() else 0


@pytest.fixture(scope="module")
def gan_runs(request, tmp_path_factory):
    """The guide's GAN: once straight through, once killed with SIGKILL and run again;
    for the `one_backend` tests among those selected (CI runs them on TensorFlow: a
    signal's handling and the nothing-to-do check are not the backend's), also once
    stopped with Ctrl-C and run again, and the straight run run again (nothing left)."""
    everything = any(item.get_closest_marker("one_backend") and "gan_runs" in getattr(item, "fixturenames", ())
                     for item in request.session.items)
    whole, killed, stopped = (tmp_path_factory.mktemp(name) for name in ("whole", "killed", "stopped"))
    for folder in (whole, killed, stopped):
        (folder / "gan.py").write_text(guide_gan())
    straight = run_script(whole)
    victim = run_script(killed)
    # Each is stopped in its second epoch (after the first epoch's checkpoint), as soon
    # as it gets there: the runs go at their own pace.
    pending = {victim: (killed, signal.SIGKILL)}
    if everything:
        interrupted = run_script(stopped)
        pending[interrupted] = (stopped, signal.SIGINT)

    def stop_those_in_epoch_2() -> bool:
        for process, (folder, signum) in list(pending.items()):
            if batches_in(folder) >= 30:
                assert process.poll() is None, "a run ended before it could be stopped"
                process.send_signal(signum)
                del pending[process]
        return not pending

    assert wait_until(stop_those_in_epoch_2, timeout=600, poll=0.01)
    victim.wait(30)
    if everything:
        stopped_out, stopped_err = interrupted.communicate(timeout=600)
    assert straight.wait(600) == 0, straight.stderr.read()
    resumed = {}
    for folder in (killed, stopped) if everything else (killed,):
        again = run_script(folder)
        out, err = again.communicate(timeout=600)
        assert again.returncode == 0, err
        assert "resuming at epoch" in out
        resumed[folder] = out
    runs = {"whole": whole, "killed": killed, "stopped": stopped, "resumed": resumed}
    if everything:
        before = (whole / "runs" / "gan" / "history.jsonl").read_bytes()
        done = run_script(whole)
        done_out, done_err = done.communicate(timeout=600)
        assert done.returncode == 0, done_err
        assert (whole / "runs" / "gan" / "history.jsonl").read_bytes() == before
        runs.update(ctrl_c=(interrupted.returncode, stopped_out, stopped_err), again=done_out)
    return runs


@pytest.mark.parametrize("how", ["killed", pytest.param("stopped", marks=pytest.mark.one_backend)])
def test_the_guide_gan_is_killed_resumed_and_equals_the_straight_run(gan_runs, how):
    a = pipetrain.read_history(gan_runs["whole"] / "runs" / "gan" / "history.jsonl")
    b = pipetrain.read_history(gan_runs[how] / "runs" / "gan" / "history.jsonl")
    assert len(a.runs) == 1  # running the finished script again added nothing
    assert len(b.runs) == 2 and b.runs[1]["resume"] is not None
    positions = [(r["epoch"], r["batch"]) for r in b.batches]
    assert positions == [(e, i) for e in range(EPOCHS) for i in range(23)]  # each batch once
    assert {"d_loss", "d_accuracy", "g_loss", "step_s", "wait_s"} <= b.batches[0].keys()
    assert {"d_loss", "d_accuracy", "g_loss", "d_auc", "samples_per_s"} <= b.epochs[0].keys()
    for ea, eb in zip(a.epochs, b.epochs, strict=True):
        for key in ("d_loss", "d_accuracy", "g_loss", "d_auc"):
            assert ea[key] == eb[key], (key, ea["epoch"])
    assert [r["g_loss"] for r in a.batches] == [r["g_loss"] for r in b.batches]
    assert b.end["status"] == "completed"


@pytest.mark.one_backend  # a signal's handling is not the backend's: TensorFlow covers it (CI time)
def test_ctrl_c_in_the_custom_loop_ends_it_with_one_line_and_no_traceback(gan_runs):
    """The batch in hand finishes, the checkpoint is written, run.epochs() raises
    pipetrain.Interrupted: uncaught, the script exits 130 without a traceback, the
    closing summary saying where it stopped; run again, it goes on from there."""
    code, out, err = gan_runs["ctrl_c"]
    assert code == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    h = pipetrain.read_history(gan_runs["stopped"] / "runs" / "gan" / "history.jsonl")
    first_end = next(r for r in (json.loads(line) for line in
                                 (gan_runs["stopped"] / "runs" / "gan" / "history.jsonl").read_text().splitlines())
                     if r["type"] == "end")
    assert first_end["status"] == "interrupted" and first_end["reason"] == "SIGINT"
    # The signal lands in a step (stopped after it) or while the loop waits for data.
    stopped = r"stopped by SIGINT (after|while waiting for the data of) epoch (\d+), batch (\d+)/23"
    assert re.fullmatch(stopped + r" \(checkpoint written\)", first_end["error"])
    assert re.search(r"^interrupted: \d+ epoch\(s\), [\d,]+ steps on \w+ \S+ - " + stopped, out, flags=re.M)
    # It went on at the next batch to train, in people's numbers both.
    when, e, b = re.match(stopped, first_end["error"]).groups()
    e, b = int(e), int(b) + (when == "after")
    said = f"resuming at epoch {e}, batch {b}/23" if b <= 23 else f"resuming at the end of epoch {e}"
    assert said in gan_runs["resumed"][gan_runs["stopped"]]
    assert (h.runs[1]["resume"]["epoch"], h.runs[1]["resume"]["batch"]) == (e - 1, b - 1)  # records count from 0


@pytest.mark.one_backend  # decided from the history, before any model: TensorFlow covers it (CI time)
def test_a_finished_custom_loop_run_again_is_already_complete(gan_runs):
    assert f"is already complete (all {EPOCHS} epochs trained); nothing to train" in gan_runs["again"]


def test_tail_and_plot_show_the_custom_loops_history(gan_runs, tmp_path, capsys):
    from pipetrain.cli import main

    run_dir = gan_runs["killed"] / "runs" / "gan"
    assert main(["tail", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "models 'discriminator', 'gan'" in out and "resuming at epoch" in out
    epoch_lines = [line for line in out.splitlines() if line.startswith("Epoch ")]
    # Every epoch, with both models' losses. tail's lines are the history as it was written:
    # an epoch the killed run recorded before its checkpoint landed (the writer is in the
    # background) was trained again after the resume, and is shown twice.
    assert {line.split()[1] for line in epoch_lines} == {f"{e}/{EPOCHS}" for e in range(1, EPOCHS + 1)}
    assert all("d_loss" in line and "g_loss" in line for line in epoch_lines)
    assert f"completed: {EPOCHS} epoch(s)" in out
    pytest.importorskip("matplotlib")
    assert main(["plot", str(run_dir), "-o", str(tmp_path / "gan.png")]) == 0
    assert (tmp_path / "gan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_epoch_values_are_the_batch_size_weighted_means_of_two_models(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 4)).astype("float32")
    path = write_h5(tmp_path / "d.h5", chunks=16, x=x, y=(x[:, 0] > 0).astype("float32"))

    def model(name):
        keras.utils.set_random_seed(1)
        m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")], name=name)
        m.compile("sgd", "binary_crossentropy", metrics=[keras.metrics.AUC(name="auc")])
        return m

    a, b = model("a"), model("b")
    with pipetrain.Run(pipetrain.H5Source(path, x="x", y="y"), batch_size=32, epochs=1, shuffle="none",
                       models=[a, b], verbose=0, history=tmp_path / "run" / "history.jsonl") as run:
        for epoch in run.epochs():
            for batch in epoch:
                epoch.train_on_batch(a, batch.x, batch.y, prefix="a_")
                epoch.train_on_batch(b, batch.x, 1 - batch.y, prefix="b_")
                epoch.record(rows=batch.size, half=0.5 * batch.size)
    h = pipetrain.read_history(tmp_path / "run" / "history.jsonl")
    sizes = [r["size"] for r in h.batches]
    assert sizes == [32, 32, 32, 4]
    e = h.epochs[0]
    # Recorded scalars: means weighted by batch size.
    assert e["rows"] == pytest.approx(sum(s * s for s in sizes) / sum(sizes))
    # Each model's loss is the size-weighted mean of its batch losses, as fit reports it
    # (Keras 3.0-3.1's fit averaged batch losses unweighted); AUC is over all rows.
    weights = sizes if tuple(map(int, keras.__version__.split(".")[:2])) >= (3, 2) else [1] * len(sizes)
    for prefix in ("a_", "b_"):
        losses = [r[prefix + "loss"] for r in h.batches]
        assert e[prefix + "loss"] == pytest.approx(np.dot(losses, weights) / sum(weights), rel=1e-6)
        assert 0.0 <= e[prefix + "auc"] <= 1.0
    assert e["a_loss"] != e["b_loss"]


def test_a_users_batch_callback_works_unchanged_in_a_custom_loop(tmp_path):
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    path = write_h5(tmp_path / "d.h5", chunks=16, x=x, y=(x[:, 0] > 0).astype("float32"))

    class LossPerBatch(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.seen = []

        def on_train_batch_end(self, batch, logs=None):
            self.seen.append((batch, logs["loss"]))

    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
    m.compile("sgd", "binary_crossentropy")
    recorder = LossPerBatch()
    with pipetrain.Run(pipetrain.H5Source(path, x="x", y="y"), batch_size=16, epochs=2, shuffle="none",
                       models=m, callbacks=[recorder], verbose=0) as run:
        for epoch in run.epochs():
            for batch in epoch:
                epoch.train_on_batch(m, batch.x, batch.y)
    assert [b for b, _ in recorder.seen] == [0, 1, 2, 3] * 2
    assert all(np.isfinite(loss) for _, loss in recorder.seen)


def test_leaving_the_batch_loop_early_stops_the_run_resumably(tmp_path):
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    path = write_h5(tmp_path / "d.h5", chunks=16, x=x, y=(x[:, 0] > 0).astype("float32"))

    class Ends(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.ended = False

        def on_train_end(self, logs=None):
            self.ended = True

    def run_loop(resume, leave_at=None, folder="run"):
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")], name="m")
        m.compile("sgd", "binary_crossentropy")
        ends = Ends()
        with pipetrain.Run(pipetrain.H5Source(path, x="x", y="y"), batch_size=8, epochs=2, shuffle="none",
                           models=m, callbacks=[ends], verbose=0, history=tmp_path / folder / "history.jsonl",
                           resume=resume) as run:
            for epoch in run.epochs():
                for batch in epoch:
                    epoch.train_on_batch(m, batch.x, batch.y)
                    if batch.index == leave_at:
                        break
        return run, ends, m

    with pytest.warns(UserWarning, match="epoch 1 left after 4 of 8 batches"):
        run, ends, _ = run_loop(resume=False, leave_at=3)
    assert run.status == "stopped" and ends.ended
    h = pipetrain.read_history(tmp_path / "run" / "history.jsonl")
    assert [(r["epoch"], r["batch"]) for r in h.batches] == [(0, b) for b in range(4)]
    assert len(h.epochs) == 1 and h.epochs[0]["complete"] is False and h.end["status"] == "stopped"
    # Resumed, it goes on at the next batch and ends after two epochs.
    run, ends, model = run_loop(resume=True)
    assert run.status == "completed" and ends.ended
    h = pipetrain.read_history(tmp_path / "run" / "history.jsonl")
    assert [(r["epoch"], r["batch"]) for r in h.batches] == [(e, b) for e in range(2) for b in range(8)]
    # ... exactly as a run that never left: same epoch losses, same weights.
    _, _, straight = run_loop(resume=False, folder="straight")
    s = pipetrain.read_history(tmp_path / "straight" / "history.jsonl")
    assert [e["loss"] for e in h.epochs] == [e["loss"] for e in s.epochs]
    assert all(e["complete"] for e in h.epochs)
    for a, b in zip(model.get_weights(), straight.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_epoch_ended_by_the_loop_itself_resumes_and_completes(tmp_path):
    """A loop that leaves the batches and ends the epoch itself (with its own values):
    the run stops there, and a resume trains the epoch's remaining batches once."""
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    path = write_h5(tmp_path / "d.h5", chunks=16, x=x, y=(x[:, 0] > 0).astype("float32"))

    def run_loop(leave_at=None):
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")], name="m")
        m.compile("sgd", "binary_crossentropy")
        with pipetrain.Run(pipetrain.H5Source(path, x="x", y="y"), batch_size=8, epochs=1, shuffle="none",
                           models=m, verbose=0, history=tmp_path / "run" / "history.jsonl", resume="auto") as run:
            for epoch in run.epochs():
                for batch in epoch:
                    epoch.train_on_batch(m, batch.x, batch.y)
                    if batch.index == leave_at:
                        break
                epoch.end(mine=1.0)
        return run

    with pytest.warns(UserWarning, match="epoch 1 left after 5 of 8 batches"):
        assert run_loop(leave_at=4).status == "stopped"
    assert run_loop().status == "completed"
    h = pipetrain.read_history(tmp_path / "run" / "history.jsonl")
    assert [(r["epoch"], r["batch"]) for r in h.batches] == [(0, b) for b in range(8)]
    assert h.epochs[-1]["complete"] and h.epochs[-1]["batches"] == 8 and h.epochs[-1]["mine"] == 1.0


def test_a_train_step_set_on_the_model_stays_its_own(tmp_path):
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    path = write_h5(tmp_path / "d.h5", chunks=16, x=x, y=(x[:, 0] > 0).astype("float32"))
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
    m.compile("sgd", "binary_crossentropy")
    calls = []
    own = m.train_step

    def mine(*args):  # Keras' train_step takes (data), on JAX (state, data)
        calls.append(1)
        return own(*args)

    m.train_step = mine
    with pipetrain.Run(pipetrain.H5Source(path, x="x", y="y"), batch_size=8, epochs=1, shuffle="none",
                       models=m, verbose=0) as run:
        for epoch in run.epochs():
            for batch in epoch:
                epoch.train_on_batch(m, batch.x, batch.y)
    assert vars(m)["train_step"] is mine and calls  # pipetrain's step wrapped the user's, then gave it back


def _tiny(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    write_h5(tmp_path / "d.h5", x=x, y=(x[:, 0] > 0).astype("int64"))
    write_h5(tmp_path / "v.h5", x=x[:20], y=(x[:20, 0] > 0).astype("int64"))
    return pipetrain.H5Source(tmp_path / "d.h5", x="x", y="y"), pipetrain.H5Source(tmp_path / "v.h5", x="x", y="y")


def _model(cls=keras.Sequential, **compile_options):
    keras.utils.set_random_seed(1)
    model = cls([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2, activation="softmax")])
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy", metrics=["accuracy"], **compile_options)
    return model


def test_a_model_compiled_to_run_eagerly_runs_its_own_step_eagerly_as_fit_does(tmp_path):
    """run_eagerly=True: its train_step runs on every batch (not once, traced), and the
    epoch metrics are fit's."""
    source, _ = _tiny(tmp_path)
    calls = []

    class Counted(keras.Sequential):
        def train_step(self, *args):
            calls.append(1)
            return super().train_step(*args)

    with source:
        x, y = source.read(0, 0, 64)[0].values()
        fitted = _model(Counted, run_eagerly=True).fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        assert len(calls) == 8
        calls.clear()
        trained = pipetrain.train(_model(Counted, run_eagerly=True), source, epochs=2, batch_size=16, shuffle="none",
                                  verbose=0)
    assert len(calls) == 8 and trained.history == fitted.history


@pytest.mark.one_backend  # the loop's bookkeeping, not the backend's: TensorFlow covers it (CI time)
def test_a_custom_loops_mistakes_are_told_and_its_numbers_stay_right(tmp_path):
    """Values recorded under the records' own names (or the model's) are refused, not
    written over them, nor values that are not numbers; a run used outside its `with` is
    refused; an evaluate mid-epoch leaves the epoch's figures whole; a loop
    left between epochs says so; BackupAndRestore (which would load old weights over a
    resumed run's) is refused; a Ctrl-C after the last batch is not swallowed."""
    import os

    source, validation = _tiny(tmp_path)
    for values, message in [({"type": 0.5}, "Epoch.record(type=...): the batch and epoch records' own field"),
                            ({"loss": 1.0}, "Epoch.record(loss=...): the model's train_on_batch reports that"),
                            # (float()'s own ValueError and TypeError named no value)
                            ({"ok": 1.0, "note": "hi"}, "Epoch.record(note=...): expected a number, got str"),
                            ({"per_class": np.ones(3)}, "Epoch.record(per_class=...): expected a number, got ndarray"),
                            ({"pair": [1.0, 2.0]}, "Epoch.record(pair=...): expected a number, got list")]:
        model = _model()
        with pytest.raises(pipetrain.errors.RunError, match=re.escape(message)), \
                pipetrain.Run(source, batch_size=16, epochs=1, models=model, verbose=0) as run:
            for epoch in run.epochs():
                for batch in epoch:
                    epoch.train_on_batch(model, batch.x, batch.y)
                    epoch.record(**values)
    model = _model()
    outside = pipetrain.Run(source, batch_size=16, epochs=1, models=model, verbose=0, history=tmp_path / "o.jsonl")
    with pytest.raises(RuntimeError, match=re.escape("a Run is used in a with statement")):
        outside.epochs()  # it trained, and wrote checkpoints beside no history, outside the folder's lock
    assert not (tmp_path / "checkpoint").exists() and not (tmp_path / "o.jsonl").exists()
    logs = []
    for mid in (False, True):
        model = _model()
        with pipetrain.Run(source, batch_size=16, epochs=1, shuffle="none", models=model, verbose=0) as run:
            for epoch in run.epochs():
                for batch in epoch:
                    epoch.train_on_batch(model, batch.x, batch.y)
                    epoch.record(mine=float(batch.index))
                    if mid and batch.index == 1:
                        epoch.evaluate(model, validation)
                epoch.evaluate(model, validation)
        logs.append(epoch.logs)
    assert logs[0] == logs[1] and logs[0]["mine"] == 1.5
    model = _model()
    with pipetrain.Run(source, batch_size=16, epochs=3, models=model, verbose=0, history=tmp_path / "h.jsonl") as run:
        for epoch in run.epochs():
            for batch in epoch:
                epoch.train_on_batch(model, batch.x, batch.y)
            break
        with pytest.raises(RuntimeError, match=r"run\.epochs\(\) was called already"):
            run.epochs()  # a second loop began training again, on_train_begin included
    assert pipetrain.read_history(tmp_path / "h.jsonl").end["reason"] == "the loop left after 1 of 3 epochs"
    with pytest.raises(pipetrain.errors.RunError, match="BackupAndRestore would load its own backup"):
        pipetrain.train(_model(), source, callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path / "b"))], verbose=0)
    with pytest.raises(KeyboardInterrupt, match="SIGINT after the run's last batch"), \
            pipetrain.Run(source, batch_size=16, epochs=1, models=model, verbose=0) as run:
        for epoch in run.epochs():
            for batch in epoch:
                epoch.train_on_batch(model, batch.x, batch.y)
        os.kill(os.getpid(), signal.SIGINT)
    assert run.status == "completed"
    # Without a history a run keeps no checkpoint: the error does not claim one.
    with pytest.raises(pipetrain.Interrupted) as stopped, \
            pipetrain.Run(source, batch_size=16, epochs=2, models=model, verbose=0) as run:
        for epoch in run.epochs():
            for batch in epoch:
                epoch.train_on_batch(model, batch.x, batch.y)
                os.kill(os.getpid(), signal.SIGINT)
    assert re.fullmatch(r"stopped by SIGINT after epoch 1, batch 1/\d+ \(no checkpoint: the run has no history\)",
                        str(stopped.value))
    signals = pipetrain.run._Signals(checkpoints=False)  # (a second signal stops at once)
    signals._handle(signal.SIGINT, None)
    with pytest.raises(pipetrain.Interrupted, match=r"then SIGTERM\); no checkpoint: the run has no history$"):
        signals._handle(signal.SIGTERM, None)


@pytest.mark.one_backend  # the loop's bookkeeping, not the backend's: TensorFlow covers it (CI time)
@pytest.mark.parametrize("second", ["batches", "groups"])
def test_an_epochs_batches_iterated_a_second_time_are_refused_not_trained_again(tmp_path, second):
    """A second loop over an epoch (after a break, say) would start again at its first
    batch: those batches trained twice, the epoch begun twice, its record wrong."""
    source, _ = _tiny(tmp_path)
    model = _model()
    seen = []
    with pytest.raises(RuntimeError, match="the batches of epoch 1 were handed out already"), \
            pipetrain.Run(source, batch_size=16, epochs=1, shuffle="none", models=model, verbose=0,
                          history=tmp_path / "run" / "history.jsonl") as run:
        for epoch in run.epochs():
            for batch in epoch:
                seen.append(batch.index)
                epoch.train_on_batch(model, batch.x, batch.y)
                if batch.index == 1:
                    break
            for batch in (epoch if second == "batches" else epoch.groups(2)):
                seen.append(batch.index)
                epoch.train_on_batch(model, batch.x, batch.y)
    assert seen == [0, 1]
    h = pipetrain.read_history(tmp_path / "run" / "history.jsonl")
    assert [(r["epoch"], r["batch"]) for r in h.batches] == [(0, 0), (0, 1)] and h.end["status"] == "failed"


@pytest.mark.one_backend  # the loop's bookkeeping, not the backend's: TensorFlow covers it (CI time)
def test_epoch_train_on_batch_outside_the_batch_loop_is_refused_and_trains_nothing(tmp_path):
    """Before or after ``for batch in epoch`` there is no batch to record: the model
    trained, its metrics joined the epoch's, but no record, no count, no check followed."""
    source, _ = _tiny(tmp_path)
    model = _model()
    x, y = np.zeros((4, 3), "float32"), np.zeros(4, "int64")
    with pipetrain.Run(source, batch_size=16, epochs=1, shuffle="none", models=model, verbose=0) as run:
        for epoch in run.epochs():
            before = [w.copy() for w in model.get_weights()]
            for method in (lambda: epoch.train_on_batch(model, x, y),
                           lambda: epoch.train_on_group(model, SimpleNamespace(x=x, y=y, sample_weight=None))):
                with pytest.raises(RuntimeError, match=r"Epoch\.train_on_(batch|group)\(\) is for the batch being "
                                                       "trained: call it inside the batch loop"):
                    method()
            assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))
            for batch in epoch:
                epoch.train_on_batch(model, batch.x, batch.y)
            with pytest.raises(RuntimeError, match="inside the batch loop"):
                epoch.train_on_batch(model, x, y)
    assert epoch.logs["loss"] > 0 and epoch.samples == sum(source.rows_per_file)


def test_ctrl_c_in_a_validation_inside_the_batch_loop_resumes_exactly(tmp_path):
    """A signal during an epoch.evaluate called after the batch in hand was trained: the
    checkpoint must count that batch, or the resume trains it a second time."""
    import os

    source, validation = _tiny(tmp_path)

    def run_loop(history=None, resume=False, interrupt=False):
        model = _model()
        with pipetrain.Run(source, batch_size=16, epochs=2, shuffle="none", models=model, verbose=0,
                           monitor_interval=None, history=history, resume=resume, validation=validation) as run:
            for epoch in run.epochs():
                for batch in epoch:
                    epoch.train_on_batch(model, batch.x, batch.y)
                    if epoch.index == 0 and batch.index == 1:
                        if interrupt:
                            os.kill(os.getpid(), signal.SIGINT)
                        epoch.evaluate(model, validation)
                epoch.evaluate(model, validation)
        return model, epoch

    straight, last = run_loop()
    history = tmp_path / "run" / "history.jsonl"
    with pytest.raises(pipetrain.Interrupted, match="during validation of epoch 1"):
        run_loop(history, interrupt=True)
    h = pipetrain.read_history(history)
    assert [(r["epoch"], r["batch"]) for r in h.batches] == [(0, 0), (0, 1)]
    resumed, resumed_last = run_loop(history, resume=True)
    h = pipetrain.read_history(history)
    assert [(r["epoch"], r["batch"]) for r in h.batches] == [(e, b) for e in range(2) for b in range(4)]
    assert resumed_last.logs == last.logs
    for a, b in zip(resumed.get_weights(), straight.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_unseeded_keras_random_draws_in_the_loop_resume_exactly(tmp_path):
    """keras.random.normal() without a seed draws from Keras' global seed generator, which
    the run makes at its first draw: a resume must go on with its state, not make a new
    one from another seed when it first draws."""
    source, _ = _tiny(tmp_path)

    def run_loop(history=None, resume=False, stop=False):
        model = _model()  # (keras.utils.set_random_seed: no global seed generator yet)
        with pipetrain.Run(source, batch_size=16, epochs=2, shuffle="none", models=model, verbose=0,
                           monitor_interval=None, history=history, resume=resume) as run:
            for epoch in run.epochs():
                for batch in epoch:
                    noisy = batch.x + keras.ops.convert_to_numpy(keras.random.normal(batch.x.shape, stddev=0.5))
                    epoch.train_on_batch(model, noisy, batch.y)
                    if stop and (epoch.index, batch.index) == (1, 1):
                        run.stop()
        return model, epoch

    straight, last = run_loop()
    history = tmp_path / "run" / "history.jsonl"
    run_loop(history, stop=True)
    resumed, resumed_last = run_loop(history, resume=True)
    assert resumed_last.logs == last.logs
    for a, b in zip(resumed.get_weights(), straight.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.one_backend  # the loop's bookkeeping, not the backend's: TensorFlow covers it (CI time)
def test_a_checkpoint_the_loop_asks_for_mid_epoch_resumes_exactly(tmp_path):
    """run.save_checkpoint() mid-epoch (from a batch callback) holds the epoch so far: the
    resume goes on in that epoch, not as a new one of fewer batches that stops the run;
    inside the batch loop, with a trained batch in hand, it is refused."""
    source, _ = _tiny(tmp_path)
    history = tmp_path / "run" / "history.jsonl"

    class SaveAt(keras.callbacks.Callback):
        def __init__(self, save):
            super().__init__()
            self.save = save

        def on_train_batch_end(self, batch, logs=None):
            if self.save and run.epoch == 0 and batch == 1:
                run.save_checkpoint()

    def run_loop(resume=False, fail=False, history=history):
        nonlocal run
        model = _model()
        with pipetrain.Run(source, batch_size=16, epochs=2, shuffle="none", models=model, verbose=0,
                           monitor_interval=None, history=history, resume=resume, checkpoint_every=None,
                           callbacks=[SaveAt(fail)]) as run:
            for epoch in run.epochs():
                for batch in epoch:
                    if fail and batch.index == 3:
                        raise ValueError("the loop fails before its next checkpoint")
                    epoch.train_on_batch(model, batch.x, batch.y)
        return model, epoch

    run = None
    straight, last = run_loop(history=None)
    with pytest.raises(ValueError, match="the loop fails"):
        run_loop(fail=True)
    resumed, resumed_last = run_loop(resume=True)
    assert run.status == "completed" and resumed_last.logs == last.logs
    for a, b in zip(resumed.get_weights(), straight.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    model = _model()
    with pytest.raises(RuntimeError, match=r"run.save_checkpoint\(\) with a trained batch in hand"), \
            pipetrain.Run(source, batch_size=16, models=model, verbose=0, history=tmp_path / "b" / "history.jsonl") as run:
        for epoch in run.epochs():
            for batch in epoch:
                epoch.train_on_batch(model, batch.x, batch.y)
                run.save_checkpoint()


def test_a_checkpoint_a_callback_asks_for_at_an_epochs_end_resumes_at_the_next_epoch(tmp_path):
    """run.save_checkpoint() from on_epoch_end (a callback keeping milestones, say), then a
    kill: the checkpoint named the ended epoch's last batch as the next, so the resume
    began that epoch again with no batch left, stopped there ('epoch 1 left after 0 of 4
    batches') and the weights were not a straight run's."""
    source, _ = _tiny(tmp_path)

    class Killed(Exception):
        pass

    class SaveThenDie(keras.callbacks.Callback):
        def __init__(self, run=None):
            super().__init__()
            self.run = run

        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0 and self.run is not None:
                self.run.save_checkpoint()
                raise Killed  # (the loop's own checkpoint never comes)

    def loop(model, callback, resume):
        with pipetrain.Run(source, batch_size=16, epochs=3, shuffle="none", models=model, verbose=0, resume=resume,
                           history=tmp_path / "run" / "history.jsonl", callbacks=[callback]) as run:
            callback.run = callback.run and run
            for epoch in run.epochs():
                for batch in epoch:
                    epoch.train_on_batch(model, batch.x, batch.y)

    straight = _model()
    pipetrain.train(straight, source, epochs=3, batch_size=16, shuffle="none", verbose=0)
    with pytest.raises(Killed):
        loop(_model(), SaveThenDie(run=True), resume=False)
    resumed = _model()
    loop(resumed, SaveThenDie(), resume=True)
    h = pipetrain.read_history(tmp_path / "run" / "history.jsonl")
    assert [(e["epoch"], e["batches"]) for e in h.epochs] == [(0, 4), (1, 4), (2, 4)] and h.end["status"] == "completed"
    for a, b in zip(resumed.get_weights(), straight.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.one_backend  # the checkpoint's checks, not the backend's: TensorFlow covers it (CI time)
def test_a_resume_with_other_metrics_is_refused_before_anything_is_written(tmp_path):
    source, _ = _tiny(tmp_path)
    model = _model()
    history = tmp_path / "run" / "history.jsonl"
    with pipetrain.Run(source, batch_size=16, epochs=2, models=model, verbose=0, history=history, checkpoint_every=1,
                       metrics=[keras.metrics.Mean(name="mm")]) as run:
        for epoch in run.epochs():
            for batch in epoch:
                epoch.train_on_batch(model, batch.x, batch.y)
                if batch.index == 1:
                    run.stop()
    before = history.read_bytes()
    with pytest.raises(pipetrain.errors.RunError, match="holds 2 variables of metrics=, the run's metrics= have 0"):
        pipetrain.Run(source, batch_size=16, epochs=2, models=_model(), verbose=0, history=history,
                      resume=True).__enter__()
    assert history.read_bytes() == before


@pytest.mark.one_backend  # its subject is the Run's use, not the backend's (CI time)
@pytest.mark.model
def test_a_run_used_without_with_is_refused_before_it_trains(tmp_path):
    """`run = pipetrain.Run(...)` then `for epoch in run.epochs()`, without `with`: it
    trained every batch with no history, no lock and no progress, yet wrote checkpoints,
    which the next run in the folder took for another run's."""
    path = write_h5(tmp_path / "d.h5", x=np.zeros((40, 3), np.float32), y=np.zeros(40, np.int64))
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    with pipetrain.H5Source(path, x="x", y="y") as source:
        run = pipetrain.Run(source, batch_size=8, epochs=1, history=tmp_path / "run" / "history.jsonl",
                            models=model, verbose=0)
        with pytest.raises(RuntimeError, match=re.escape("with pipetrain.Run(...) as run:")):
            run.epochs()
    assert not (tmp_path / "run").exists()
