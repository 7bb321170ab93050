"""A run killed with SIGKILL at any point resumes at the exact next batch and ends with
the same weights, the same epoch metrics and a history in which every batch appears once."""

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest

import pipetrain
from pipetrain import checkpoint
from pipetrain.errors import InputError, RunError
from tests.conftest import keras_backend, write_h5

pytestmark = pytest.mark.model

# Every kill point runs on TensorFlow; JAX and PyTorch (README's test command deselects
# `one_backend`) run a SIGKILL and a Ctrl-C mid-epoch and the callbacks' mid-epoch kill,
# which take the backend-specific paths (weights, optimizer, RNG, metric state) the other
# points take too: each point costs a process, and three backends must fit CI.
ONE_BACKEND = pytest.mark.one_backend

JOB = Path(__file__).parent / "jobs" / "resume_job.py"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for name, n in [("train-0.h5", 200), ("train-1.h5", 110), ("val.h5", 50)]:
        x = rng.normal(size=(n, 12)).astype("float32")
        y = np.argmax(x[:, :3] + 0.3 * rng.normal(size=(n, 3)), axis=1).astype("int64")
        write_h5(folder / name, chunks=16, x=x, y=y)
    return folder


def job(data, run_dir, kill="none", resume=False):
    args = [sys.executable, str(JOB), str(data), str(run_dir), kill] + (["--resume"] if resume else [])
    return subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT)  # a hang guard: JAX compiles slowly on a busy machine


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("whole")
    done = job(data, run_dir)
    assert done.returncode == 0, done.stderr
    return run_dir


def weights(run_dir):
    with np.load(run_dir / "weights.npz") as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


METRICS = ("loss", "accuracy", "top2", "val_loss", "val_accuracy", "val_top2")
VAL_BATCHES = 2  # val.h5's 50 rows in batches of 32


def resumed_at(kill: str) -> tuple[int, int | None]:
    """(epoch, batch or None: any) at which a run killed at ``kill`` resumes."""
    if kill == "write:10":  # that checkpoint never landed: the run goes on from the one before
        return 0, 8
    if kill.startswith("int-val"):  # Ctrl-C during validation: the epoch's batches are all trained
        epoch, batch = map(int, kill.split(":")[1:])
        # In its last batch: the epoch ends (record, checkpoint) and the run stops there.
        return (epoch + 1, 0) if batch == VAL_BATCHES - 1 else (epoch, 10)
    if kill.startswith("int"):  # Ctrl-C: every batch of the epoch was trained
        return int(kill.split(":")[1]), int(kill.split(":")[2]) + 1
    return int(kill.split(":")[1]), None


# Each chain kills a run, resumes it and kills the resumed run at the next point, and so
# on; the last resume runs to the end. (A kill point costs one process, not two, and a
# resumed run is killed too.)
@pytest.mark.parametrize("kills", [
    pytest.param(("batch:1:6",    # mid-epoch, between checkpoints (checkpoints every 4 batches: 10 per epoch)
                  "int-batch:1:9",  # Ctrl-C in the last batch: stops with every batch trained, before validation
                  "int-val:1:0"),  # Ctrl-C in that validation: it runs again (on PyTorch, drawing as fit once)
                 id="mid-epoch,ctrl-c,validation"),
    pytest.param(("write:10",   # writing the epoch-end checkpoint (step 10), training on
                  "batch:1:2",  # right after a checkpoint (the 12th step completed just before)
                  "val:1:1",    # during validation
                  "int-val:1:1",  # Ctrl-C in validation's last batch: the run stops at the epoch's end
                  "batch:2:0"),  # right after the epoch-end checkpoint
                 marks=ONE_BACKEND, id="write,after-checkpoint,validation,ctrl-c-last-val,epoch-end"),
])
def test_killed_and_resumed_equals_uninterrupted(data, uninterrupted, tmp_path, kills):
    for i, kill in enumerate(kills):
        killed = job(data, tmp_path, kill, resume=i > 0)
        # Ctrl-C: pipetrain.Interrupted ends the script with status 130 and no traceback.
        assert killed.returncode == (130 if kill.startswith("int") else -signal.SIGKILL), (kill, killed.stderr)
        assert "Traceback" not in killed.stderr
        assert checkpoint.latest(tmp_path / "checkpoint") is not None
        assert not (tmp_path / "weights.npz").exists()

    resumed = job(data, tmp_path, kill="none", resume=True)
    assert resumed.returncode == 0, resumed.stderr

    for ours, theirs in zip(weights(tmp_path), weights(uninterrupted), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    ours, theirs = pipetrain.read_history(tmp_path / "history.jsonl"), pipetrain.read_history(uninterrupted / "history.jsonl")
    assert len(ours.epochs) == len(theirs.epochs) == 3
    for a, b in zip(ours.epochs, theirs.epochs, strict=True):
        for key in METRICS:
            assert a[key] == b[key], (key, a["epoch"])
        assert a["samples"] == b["samples"] == 310 and a["batches"] == b["batches"] == 10
    positions = [(r["epoch"], r["batch"]) for r in ours.batches]
    assert positions == [(e, b) for e in range(3) for b in range(10)]  # every batch exactly once
    assert [r["loss"] for r in ours.batches] == [r["loss"] for r in theirs.batches]
    assert len(ours.runs) == len(kills) + 1
    for run, kill in zip(ours.runs[1:], kills, strict=True):
        epoch, batch = resumed_at(kill)
        assert run["resume"]["epoch"] == epoch and batch in (None, run["resume"]["batch"]), (kill, run["resume"])
    assert ours.end["status"] == "completed" and ours.end["steps"] == 30


def test_killed_before_its_first_checkpoint_starts_again_and_equals_uninterrupted(data, uninterrupted, tmp_path):
    """Killed at batch 3, before the first checkpoint (every 4 batches): a resume starts
    the run again from its first batch; the earlier records are superseded."""
    killed = job(data, tmp_path, "batch:0:3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert checkpoint.latest(tmp_path / "checkpoint") is None
    resumed = job(data, tmp_path, resume=True)
    assert resumed.returncode == 0, resumed.stderr
    for ours, theirs in zip(weights(tmp_path), weights(uninterrupted), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    ours, theirs = pipetrain.read_history(tmp_path / "history.jsonl"), pipetrain.read_history(uninterrupted / "history.jsonl")
    assert len(ours.runs) == 2 and ours.runs[1]["resume"]["checkpoint"] is None
    assert [(r["epoch"], r["batch"]) for r in ours.batches] == [(e, b) for e in range(3) for b in range(10)]
    assert [r["loss"] for r in ours.batches] == [r["loss"] for r in theirs.batches]
    assert ours.end["status"] == "completed"


def _writer_left(before: set) -> list:
    """Writer threads started since ``before`` that have not ended (a moment after the run's end)."""
    started = [t for t in set(threading.enumerate()) - before if t.name == checkpoint.Writer.THREAD]
    for thread in started:
        thread.join(5)
    return [t for t in started if t.is_alive()]


def _small_run(data, tmp_path, **settings):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(3, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    settings = {"epochs": 2, **settings}
    return pipetrain.train(model, pipetrain.H5Source(f"{data}/train-*.h5", x="x", y="y"),
                           batch_size=32, history=tmp_path / "history.jsonl", checkpoint_every=4, verbose=0,
                           **settings)


@pytest.mark.one_backend  # its subject is the run's checks, not the backend's: TensorFlow covers it (CI time)
def test_a_resume_with_other_callbacks_is_refused_before_anything_is_written(data, tmp_path):
    """Like every other refusal of a resume: the history gains no run or end record and
    the callbacks never begin (no CSV log made)."""
    _small_run(data, tmp_path)
    before = (tmp_path / "history.jsonl").read_bytes()
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(3, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    with pytest.raises(RunError, match="the callbacks differ from the checkpoint's"):
        pipetrain.train(model, pipetrain.H5Source(f"{data}/train-*.h5", x="x", y="y"), epochs=3, batch_size=32,
                        history=tmp_path / "history.jsonl", checkpoint_every=4, verbose=0, resume=True,
                        callbacks=[keras.callbacks.CSVLogger(str(tmp_path / "log.csv"))])
    assert (tmp_path / "history.jsonl").read_bytes() == before and not (tmp_path / "log.csv").exists()


@pytest.mark.one_backend  # its subject is the checkpoint writer, not the backend's: TensorFlow covers it (CI time)
def test_a_checkpoint_that_fails_in_the_background_fails_the_run_and_keeps_the_one_before(data, tmp_path, monkeypatch):
    """Checkpoints are written while training goes on: a write that fails (a full disk)
    ends the run, failed, with its error, by the next checkpoint; the checkpoint before
    it stays, and a resume goes on from there."""
    write = checkpoint._write

    def full_disk(folder, step, fill):
        if step == 8:
            raise checkpoint.CheckpointError(f"{folder}: cannot write a checkpoint: No space left on device")
        return write(folder, step, fill)

    monkeypatch.setattr(checkpoint, "_write", full_disk)
    with pytest.raises(checkpoint.CheckpointError, match="No space left on device"):
        _small_run(data, tmp_path)
    history = pipetrain.read_history(tmp_path / "history.jsonl")
    assert history.end["status"] == "failed" and "No space left on device" in history.end["error"]
    assert history.end["checkpoint"].endswith("ckpt-000000000004.npz")
    assert checkpoint.latest(tmp_path / "checkpoint").name == "ckpt-000000000004.npz"
    assert 8 <= max(r["step"] for r in history.batches) <= 9  # trained on until the epoch's end checkpoint

    monkeypatch.setattr(checkpoint, "_write", write)
    _small_run(data, tmp_path, resume=True)
    history = pipetrain.read_history(tmp_path / "history.jsonl")
    assert history.runs[-1]["resume"]["batch"] == 4 and history.end["status"] == "completed"
    assert [(r["epoch"], r["batch"]) for r in history.batches] == [(e, b) for e in range(2) for b in range(10)]


@pytest.mark.one_backend  # its subject is the background writer, not the backend's: TensorFlow covers it (CI time)
def test_the_history_is_synced_in_the_background_before_the_checkpoint_that_follows(data, tmp_path, monkeypatch):
    """The history's fsync at an epoch's end runs in the checkpoint writer's thread, while
    training goes on, and before the epoch-end checkpoint is written: on disk, a checkpoint
    never runs ahead of its epoch's record. One thread writes every checkpoint and ends
    with the run."""
    from pipetrain.history import HistoryWriter

    events = []
    sync, write = HistoryWriter._fsync, checkpoint._write

    def slow_sync(self, fd):
        size = os.fstat(fd).st_size
        time.sleep(0.5)
        events.append(("sync", threading.current_thread().name, size, os.fstat(fd).st_size))
        return sync(self, fd)

    def recorded_write(folder, step, fill):
        events.append(("write", threading.current_thread().ident, step))
        return write(folder, step, fill)

    monkeypatch.setattr(HistoryWriter, "_fsync", slow_sync)
    monkeypatch.setattr(checkpoint, "_write", recorded_write)
    before = set(threading.enumerate())
    _small_run(data, tmp_path)
    assert not _writer_left(before)

    text = (tmp_path / "history.jsonl").read_bytes()
    epoch_ends = [text.index(b"\n", text.index(b'{"type":"epoch","run"')) + 1]
    epoch_ends.append(text.index(b"\n", text.index(b'{"type":"epoch","run"', epoch_ends[0])) + 1)
    syncs = [e for e in events[:-1] if e[0] == "sync"]  # the last: the history's close, at the run's end
    assert [e[1] for e in syncs] == [checkpoint.Writer.THREAD] * 2 and events[-1][0] == "sync"
    assert [e[2] for e in syncs] == epoch_ends  # each synced up to its epoch's record...
    assert syncs[0][3] > syncs[0][2]  # ...while the loop went on writing the next epoch's batches
    order = [e[0] if e[0] == "sync" else e[2] for e in events[:-1]]
    assert order == [4, 8, "sync", 10, 12, 16, "sync", 20]
    assert len({e[1] for e in events if e[0] == "write"}) == 1


@pytest.mark.one_backend  # its subject is the background writer alone
def test_the_writer_runs_jobs_in_order_in_one_thread_and_after_close_in_the_callers():
    writer, done = checkpoint.Writer(), []
    release = threading.Event()
    writer.later(lambda: (release.wait(5), done.append(("slow", threading.current_thread().name))))
    ticket = writer.later(lambda: done.append(("next", threading.current_thread().name)))
    assert done == []  # queued behind the slow one, the caller not held up
    release.set()
    writer.join(ticket)
    assert done == [("slow", checkpoint.Writer.THREAD), ("next", checkpoint.Writer.THREAD)]
    writer.later(lambda: 1 / 0)
    writer.later(lambda: done.append("dropped"))  # after a failure, nothing more
    with pytest.raises(ZeroDivisionError):
        writer.wait()
    assert "dropped" not in done
    writer.close()
    writer.later(lambda: done.append(("closed", threading.current_thread().name)))
    assert done[-1] == ("closed", threading.current_thread().name)
    writer._thread.join(5)
    assert not writer._thread.is_alive()


@pytest.mark.one_backend  # its subject is the background writer alone
@pytest.mark.parametrize("small", [True, False])
def test_a_submitted_checkpoint_is_the_state_at_submit_and_a_small_one_is_packed_by_the_caller(
        small, tmp_path, monkeypatch):
    """A small state is packed by the caller (Python work under the GIL, ~20 us an array,
    that a writing thread would take from the training step again and again), and the
    thread only writes its bytes; a large one is copied by the caller and packed by the
    thread. Either way, what the caller changes after submitting (weights trained on,
    the meta) is not in the checkpoint, and the arrays are let go of as they are packed."""
    packed_in, members = set(), checkpoint._members

    def recorded(*args):
        for member in members(*args):
            packed_in.add(threading.current_thread().name)
            yield member

    monkeypatch.setattr(checkpoint, "_members", recorded)
    monkeypatch.setattr(checkpoint, "PACK_HERE_BYTES", 48 if small else 47)  # the state: 6 float64
    writer, release = checkpoint.Writer(), threading.Event()
    writer.later(lambda: release.wait(5))  # holds the thread until the state changed
    weights, meta = np.arange(6.0), {"epoch": 1}
    arrays = {"w": weights[:]}  # a view, as of a tensor's memory
    path = writer.submit(tmp_path, 7, meta, arrays)
    assert arrays == {}
    weights[:] = -1.0
    meta["epoch"] = 2
    release.set()
    writer.wait()
    assert packed_in == {threading.current_thread().name if small else checkpoint.Writer.THREAD}
    with np.load(path) as saved:  # (checkpoint.load wants a run's whole meta)
        assert json.loads(saved["__meta__"].tobytes()) == {"epoch": 1}
        assert np.array_equal(saved["w"], np.arange(6.0))
    assert writer.latest == path
    writer.close()


@pytest.mark.one_backend  # its subject is the background writer, not the backend's: TensorFlow covers it (CI time)
def test_a_history_sync_that_fails_in_the_background_fails_the_run_and_no_checkpoint_follows(data, tmp_path,
                                                                                             monkeypatch):
    """An fsync of the history that fails at an epoch's end (a disk error) ends the run
    with its error by the next checkpoint; the epoch's checkpoint, which would run ahead
    of a history not on disk, is not written."""
    from pipetrain.history import HistoryWriteError, HistoryWriter

    sync, failed = HistoryWriter._fsync, []

    def failing_once(self, fd):
        if not failed:
            failed.append(fd)
            time.sleep(0.3)  # slow: the epoch's checkpoint is queued behind it before it fails
            raise HistoryWriteError(f"{self.path}: cannot sync the history: Input/output error")
        return sync(self, fd)

    monkeypatch.setattr(HistoryWriter, "_fsync", failing_once)
    before = set(threading.enumerate())
    with pytest.raises(HistoryWriteError, match="history.jsonl: cannot sync the history: Input/output error"):
        _small_run(data, tmp_path)
    assert checkpoint.latest(tmp_path / "checkpoint").name == "ckpt-000000000008.npz"
    history = pipetrain.read_history(tmp_path / "history.jsonl")
    assert [(r["epoch"], r["batch"]) for r in history.batches][:10] == [(0, b) for b in range(10)]
    assert not _writer_left(before)


@pytest.mark.one_backend  # its subject is the run's ending, not the backend's: TensorFlow covers it (CI time)
def test_ctrl_c_while_the_run_waits_for_its_last_checkpoint_still_ends_the_history(data, tmp_path):
    """The run's end waits for the checkpoint being written; a Ctrl-C during that wait
    lets the write land (it takes milliseconds), ends the run as interrupted with its end
    record naming that checkpoint, and leaves the folder free to resume."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(3, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")

    def ctrl_c():
        raise KeyboardInterrupt

    source = pipetrain.H5Source(f"{data}/train-*.h5", x="x", y="y")
    with pytest.raises(KeyboardInterrupt):
        with pipetrain.Run(source, batch_size=32, history=tmp_path / "history.jsonl", models=model,
                           verbose=0) as run:
            for epoch in run.epochs():
                for batch in epoch:
                    epoch.train_on_batch(model, batch.x, batch.y)
            run._checkpoints.wait = ctrl_c
    history = pipetrain.read_history(tmp_path / "history.jsonl")
    assert history.end is not None and history.end["status"] == "interrupted"
    assert history.end["checkpoint"].endswith("ckpt-000000000010.npz")
    again = pipetrain.Run(source, batch_size=32, history=tmp_path / "history.jsonl", models=model, verbose=0,
                          resume=True)
    with again:  # the folder's lock was released
        assert again.complete is not None


@pytest.mark.one_backend  # its subject is a message, not the backend's: TensorFlow covers it (CI time)
def test_nothing_to_resume_is_a_clear_error(data, tmp_path):
    done = job(data, tmp_path, resume=True)
    assert done.returncode != 0
    assert "no checkpoint to resume from" in done.stderr


@pytest.mark.one_backend  # its subject is not the backend's: TensorFlow covers it (CI time)
def test_the_command_line_resumes_from_anywhere_with_the_flags_it_was_started_with(data, tmp_path):
    """Relative data paths, a history file of another name, flags that are not data:
    `pipetrain train --resume` from another folder finds and keeps them all."""
    start = tmp_path / "start"
    start.mkdir()
    for name in ("train-0.h5", "val.h5"):
        (start / name).symlink_to(data / name)

    def train(*args, cwd):
        return subprocess.run([sys.executable, "-m", "pipetrain", "train", "--quiet", *args],
                              capture_output=True, text=True, timeout=600, cwd=cwd)

    threads = None if keras_backend() == "jax" else 1  # --compute-threads: TensorFlow and PyTorch
    first = train("--data", "train-0.h5", "--val", "val.h5", "--x", "x", "--y", "y", "--epochs", "1",
                  "--batch-size", "64", "--history", "h2/foo.jsonl", "--allow-nonfinite",
                  *(["--compute-threads", str(threads)] if threads else []), cwd=start)
    assert first.returncode == 0, first.stderr
    history = start / "h2" / "foo.jsonl"
    recorded = checkpoint.load_meta(checkpoint.latest(start / "h2" / "checkpoint"))["config"]["cli"]
    assert recorded["data"] == [str(start / "train-0.h5")] and recorded["val"] == [str(start / "val.h5")]
    assert recorded["allow_nonfinite"] is True and recorded["compute_threads"] == threads
    again = train("--resume", str(history), "--epochs", "2", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    h = pipetrain.read_history(history)
    assert [e["epoch"] for e in h.epochs] == [0, 1] and h.end["status"] == "completed"
    assert h.runs[-1]["config"]["cli"]["allow_nonfinite"] is True
    assert h.runs[-1]["config"]["cli"]["compute_threads"] == threads
    # The folder alone names the run too, when it holds one history.
    third = train("--resume", str(start / "h2"), "--epochs", "3", cwd=tmp_path)
    assert third.returncode == 0, third.stderr
    assert [e["epoch"] for e in pipetrain.read_history(history).epochs] == [0, 1, 2]


# -- stateful Keras callbacks across a kill ---------------------------------------------------


def callback_job(data, run_dir, kill="none", resume=False):
    args = [sys.executable, str(JOB), str(data), str(run_dir), kill, "--callbacks"] + (["--resume"] if resume else [])
    return subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT)  # a hang guard


@pytest.fixture(scope="module")
def uninterrupted_with_callbacks(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("whole-callbacks")
    done = callback_job(data, run_dir)
    assert done.returncode == 0, done.stderr
    return run_dir


def h5_arrays(path):
    import h5py

    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return arrays


def tensorboard_scalars(logdir):
    """(run, tag, step) -> value over every event file, the later file winning a step
    written twice, as TensorBoard shows a run that restarted from a checkpoint."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    scalars = {}
    for path in sorted(logdir.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                array = tensor_util.make_ndarray(value.tensor)
                if array.ndim == 0 and array.dtype.kind in "fiu":  # not the model graph
                    scalars[(path.parent.name, value.tag, event.step)] = float(array)
    return scalars


def test_stateful_callbacks_resume_as_if_never_killed(data, uninterrupted_with_callbacks, tmp_path):
    """LearningRateScheduler, ReduceLROnPlateau, EarlyStopping, ModelCheckpoint (each
    epoch, best only, every 7 batches), CSVLogger and TensorBoard: killed mid-epoch and
    resumed, the final weights and learning rate, the CSV file, the TensorBoard scalars
    and the ModelCheckpoint files are those of the run that was never killed."""
    whole = uninterrupted_with_callbacks
    # Mid-epoch: on_epoch_begin must not run again where the checkpoint holds its effect.
    # Then, on TensorFlow (CI time: the kill point is not the backend's), the resumed run
    # is killed as epoch 1 has ended (CSV row, TensorBoard, ModelCheckpoint written)
    # before its checkpoint.
    kills = ["batch:1:6"] + (["end:1:0"] if keras_backend() == "tensorflow" else [])
    for i, kill in enumerate(kills):
        killed = callback_job(data, tmp_path, kill, resume=i > 0)
        assert killed.returncode == -signal.SIGKILL, (kill, killed.stderr)
    resumed = callback_job(data, tmp_path, resume=True)
    assert resumed.returncode == 0, resumed.stderr

    final = json.loads((tmp_path / "final.json").read_text())
    assert final == json.loads((whole / "final.json").read_text())  # LR halved once per epoch, reduced on plateau
    for ours, theirs in zip(weights(tmp_path), weights(whole), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    assert (tmp_path / "log.csv").read_text() == (whole / "log.csv").read_text()
    saved = sorted(p.name for p in (whole / "mc").iterdir())
    assert sorted(p.name for p in (tmp_path / "mc").iterdir()) == saved and "best.weights.h5" in saved
    for name in saved:
        ours, theirs = h5_arrays(tmp_path / "mc" / name), h5_arrays(whole / "mc" / name)
        assert ours.keys() == theirs.keys(), name
        for key in ours:
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=f"{name}: {key}")
    ours, theirs = tensorboard_scalars(tmp_path / "tb"), tensorboard_scalars(whole / "tb")
    assert ours.keys() == theirs.keys()
    assert {k: v for k, v in ours.items() if "steps_per_second" not in k[1]} == \
           {k: v for k, v in theirs.items() if "steps_per_second" not in k[1]}


def other_backend() -> str:
    return "jax" if keras_backend() != "jax" else "torch"


def relabel(folder: Path, backend: str | None) -> Path:
    """The newest checkpoint in ``folder`` rewritten as if written under ``backend`` (None:
    as a checkpoint that predates the field)."""
    path = checkpoint.latest(folder)
    meta, arrays = checkpoint.load(path)
    meta.pop("backend")
    if backend is not None:
        meta["backend"] = backend
    return checkpoint.save(folder, int(path.stem.split("-")[1]), meta, arrays)


@ONE_BACKEND  # its subject is the archive's format alone
def test_a_small_state_packed_in_memory_is_the_archive_zipfile_writes(tmp_path, monkeypatch):
    """The archive a small checkpoint gets in the loop's thread (written without zipfile,
    for speed) holds what ``zipfile`` writes for it, member by member and byte for
    byte, and numpy, zipfile and unpack read it: names not ASCII, a 0-d array, an empty
    one, an extended type. (A Fortran-ordered array is stored in C order: the same
    values.)"""
    import ml_dtypes

    arrays = {"model/m/0": np.arange(12, dtype="float32").reshape(3, 4), "opt/iterations": np.array(7, "int64"),
              "empty": np.zeros((0, 3)), "modèle/ü": np.arange(3, dtype="uint8"), "flags": np.array([True, False]),
              "bf16": np.linspace(-1, 1, 5).astype(ml_dtypes.bfloat16), "fortran": np.asfortranarray(np.eye(3)[:, :2])}
    meta = {"run_id": "r", "note": "é"}
    fast = checkpoint.pack(meta, dict(arrays))
    reference = io.BytesIO()
    checkpoint.pack_into(reference, json.dumps(meta).encode(), dict(arrays))
    ours, theirs = zipfile.ZipFile(io.BytesIO(fast)), zipfile.ZipFile(reference)
    assert ours.testzip() is None and ours.namelist() == theirs.namelist()
    # Made on Unix with mode 0600, as zipfile's (Info-ZIP's unzip reads UTF-8 names only then).
    assert [(i.create_system, i.external_attr, i.flag_bits & 0x800) for i in ours.infolist()] == \
        [(i.create_system, i.external_attr, i.flag_bits & 0x800) for i in theirs.infolist()]
    for name in ours.namelist():
        if name != "fortran.npy":
            assert ours.read(name) == theirs.read(name), name
    with np.load(io.BytesIO(fast)) as f:
        assert np.array_equal(f["fortran"], arrays["fortran"]) and f["opt/iterations"].shape == ()
    back_meta, back = checkpoint.unpack(io.BytesIO(fast))
    assert back_meta == meta and set(back) == set(arrays)
    for name, array in arrays.items():
        assert back[name].dtype == array.dtype and back[name].shape == array.shape, name
        assert back[name].tobytes() == array.tobytes(), name
    # A state beyond what fits without ZIP64 records (its bytes, or its members' count: 16
    # bits in the end record) goes through zipfile: the same members.
    for limit, value in (("_ZIP32_BYTES", 100), ("_ZIP32_MEMBERS", len(arrays))):
        with monkeypatch.context() as patched:
            patched.setattr(checkpoint, limit, value)
            large = zipfile.ZipFile(io.BytesIO(checkpoint.pack(meta, dict(arrays))))
        assert [i.filename for i in large.infolist()] == theirs.namelist(), limit
        assert all(large.read(name) == theirs.read(name) for name in theirs.namelist()), limit
    # An object array is refused as before; a masked one (whose mask would be lost) is not plain data.
    with pytest.raises(ValueError, match="Object arrays cannot be saved"):
        checkpoint.pack(meta, {"o": np.array([None, 1], dtype=object)})

    class Masking(keras.callbacks.Callback):
        def get_state(self):
            return {"kept": np.ma.masked_array([1.0, 2.0], mask=[True, False])}

        def set_state(self, state):
            pass

    with pytest.raises(checkpoint.CheckpointError, match="state 'kept' is not plain data \\(MaskedArray\\)"):
        checkpoint.callback_state([Masking()])


@ONE_BACKEND  # its subject is the archive's format alone
def test_arrays_of_ml_dtypes_types_come_back_with_their_type_and_bits(tmp_path):
    """bfloat16, float8 and int4 arrays (a model's variables may be such) come back as
    they went, not as raw bytes (``|V2``); numpy's own types are stored as before."""
    import ml_dtypes

    arrays = {"bf16": np.linspace(-3, 3, 7).astype(ml_dtypes.bfloat16),
              "f8": np.linspace(-2, 2, 5).astype(ml_dtypes.float8_e4m3fn).reshape(5, 1),
              "i4": np.arange(-8, 8).astype(ml_dtypes.int4), "f32": np.arange(3, dtype="float32"),
              "raw": np.zeros(2, dtype="V2")}
    path = checkpoint.save(tmp_path, 1, {"run_id": "r"}, arrays)
    with np.load(path) as f:  # still an .npz any numpy reads
        assert f["f32"].dtype == np.float32 and f["bf16"].dtype == np.uint16
    _, back = checkpoint.unpack(path)
    assert set(back) == set(arrays)
    for name, array in arrays.items():
        assert back[name].dtype == array.dtype and back[name].shape == array.shape, name
        assert back[name].tobytes() == array.tobytes(), name


def test_a_bfloat16_model_resumed_ends_as_if_never_stopped(data, tmp_path):
    """A model whose variables are bfloat16 resumes on every backend (its checkpoint
    came back as raw bytes, which no backend would assign), with the weights and epoch
    metrics of the run that was never stopped."""
    def bf16_run(folder, **settings):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(8, activation="relu", dtype="bfloat16"),
                                  keras.layers.Dense(3, activation="softmax", dtype="float32")])
        model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
        pipetrain.train(model, pipetrain.H5Source(f"{data}/train-*.h5", x="x", y="y"), batch_size=32,
                        history=folder / "history.jsonl", checkpoint_every=4, verbose=0, **settings)
        return model, pipetrain.read_history(folder / "history.jsonl")

    whole, whole_history = bf16_run(tmp_path / "whole", epochs=2)
    bf16_run(tmp_path / "cut", epochs=1)
    resumed, resumed_history = bf16_run(tmp_path / "cut", epochs=2, resume=True)
    assert str(resumed.weights[0].dtype) == "bfloat16"
    for a, b in zip(whole.weights, resumed.weights, strict=True):
        assert np.asarray(a.numpy()).tobytes() == np.asarray(b.numpy()).tobytes(), a.path
    assert [e["loss"] for e in resumed_history.epochs] == [e["loss"] for e in whole_history.epochs]


class Counting(keras.callbacks.Callback):
    """A callback with its own state (``get_state``/``set_state``): batches seen, and the
    losses of the batches as an array."""

    def __init__(self, extra=None):
        super().__init__()
        self.seen, self.losses, self.extra, self.restored = 0, [], extra, None

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        self.losses.append(logs["loss"])

    def get_state(self):
        state = {"seen": self.seen, "losses": np.asarray(self.losses, dtype="float64")}
        return state if self.extra is None else {**state, "extra": self.extra}

    def set_state(self, state):
        self.restored = state
        self.seen, self.losses = state["seen"], list(state["losses"])


@ONE_BACKEND  # its subject is the checkpoint's callback state, not the backend's
def test_a_callbacks_own_state_comes_back_on_resume_as_it_gave_it(data, tmp_path):
    """A callback with ``get_state``/``set_state`` gets back, on resume, the state it gave
    at the checkpoint: plain values and arrays, exactly."""
    first = Counting()
    _small_run(data, tmp_path, callbacks=[first], epochs=1)
    assert first.seen == 10
    again = Counting()
    _small_run(data, tmp_path, callbacks=[again], resume=True)
    assert again.restored["seen"] == 10
    np.testing.assert_array_equal(again.restored["losses"], np.asarray(first.losses, dtype="float64"))
    assert again.seen == 20 and again.losses[:10] == first.losses


@ONE_BACKEND  # its subject is the checkpoint's callback state, not the backend's
@pytest.mark.parametrize("extra, shown", [(object(), "object"),
                                          (np.array(["a", None], dtype=object), "an array of Python objects")])
def test_a_callback_state_that_is_not_plain_data_fails_the_run_in_one_line_naming_it(data, tmp_path, extra, shown):
    """At the first checkpoint, naming the callback and the key (an array of Python
    objects cannot be read back without a pickle, which a checkpoint never holds); the
    history ends failed with that error and keeps every batch trained."""
    with pytest.raises(checkpoint.CheckpointError,
                       match=rf"^callback Counting: state 'extra' is not plain data \({shown}\)$"):
        _small_run(data, tmp_path, callbacks=[Counting(extra)])
    history = pipetrain.read_history(tmp_path / "history.jsonl")
    assert history.end["status"] == "failed" and "state 'extra' is not plain data" in history.end["error"]
    assert [r["batch"] for r in history.batches] == [0, 1, 2, 3]
    assert checkpoint.latest(tmp_path / "checkpoint") is None


def test_a_checkpoint_of_another_backend_is_refused_in_one_line_and_nothing_changes(data, tmp_path, capsys):
    """A checkpoint's arrays would load on another backend, but that backend draws other
    random numbers from the same seed states and rounds differently: no exact resume, so
    the command line and Python both refuse it, naming the backend to resume with."""
    from pipetrain.cli import main

    args = ["train", "--data", str(data / "train-0.h5"), "--x", "x", "--y", "y", "--epochs", "1", "--quiet",
            "--batch-size", "64", "--history", str(tmp_path / "run" / "history.jsonl")]
    assert main(args) == 0
    ours = keras_backend()
    meta, _ = checkpoint.load(checkpoint.latest(tmp_path / "run" / "checkpoint"))
    assert meta["backend"] == ours
    theirs = other_backend()
    saved = relabel(tmp_path / "run" / "checkpoint", theirs)
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}

    assert main(["train", "--resume", str(tmp_path / "run"), "--epochs", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert f"cannot resume {saved}: it was written under Keras' {theirs} backend and this is {ours}" in err
    assert f"resume it with KERAS_BACKEND={theirs}" in err

    source = pipetrain.H5Source(data / "train-0.h5", x="x", y="y")
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(3, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    with pytest.raises(InputError, match=f"written under Keras' {theirs} backend and this is {ours}"):
        pipetrain.train(model, source, epochs=2, batch_size=64, history=tmp_path / "run" / "history.jsonl",
                        resume=True, verbose=0)
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before

    # A checkpoint written before checkpoints named their backend: the history's run record says.
    relabel(tmp_path / "run" / "checkpoint", None)
    history = tmp_path / "run" / "history.jsonl"
    history.write_text(history.read_text().replace(f'"backend":"{ours}"', f'"backend":"{theirs}"'))
    assert main(["train", "--resume", str(tmp_path / "run"), "--epochs", "2", "--quiet"]) == 2
    assert f"written under Keras' {theirs} backend" in capsys.readouterr().err


@pytest.mark.one_backend  # the run's own check, not the backend's
def test_a_resume_with_another_class_weight_or_dtype_policy_is_refused(tmp_path):
    """Both change what each batch computes, outside the batch order: the resume went on
    and mixed two weightings (or two precisions) in one run."""
    from tests.test_train import binary_model

    rng = np.random.default_rng(1)
    x = rng.normal(size=(96, 10)).astype("float32")
    source = pipetrain.H5Source(write_h5(tmp_path / "d.h5", x=x, y=(x[:, 0] > 0).astype("float32")), x="x", y="y")
    history = tmp_path / "run" / "history.jsonl"

    def train(model, epochs, **kwargs):
        return pipetrain.train(model, source, epochs=epochs, batch_size=32, verbose=0, history=history,
                               monitor_interval=None, **kwargs)

    train(binary_model(), 1, class_weight={0: 1.0, 1: 2.0})
    with pytest.raises(RunError, match=r"class_weight was \{'0': 1.0, '1': 2.0\}, now \{'0': 1.0, '1': 5.0\}"):
        train(binary_model(), 2, class_weight={0: 1.0, 1: 5.0}, resume=True)
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        mixed = binary_model()
    finally:
        keras.config.set_dtype_policy("float32")
    with pytest.raises(RunError, match=r"trained under the dtype policy 'float32', now 'mixed_bfloat16'"):
        train(mixed, 2, class_weight={0: 1.0, 1: 2.0}, resume=True)
    train(binary_model(), 2, class_weight={0: 1.0, 1: 2.0}, resume=True)  # as it was: it goes on
    assert [e["epoch"] for e in pipetrain.read_history(history).epochs] == [0, 1]
