"""A run whose data stops coming or cannot fit: an error or a clean stop with a
checkpoint, never a hang; a reason in every interrupted message; producers that starve
raised to normal priority within seconds, and the history says when."""

import os
import re
import signal
import threading

import h5py
import keras
import numpy as np
import pytest

import pipetrain
import pipetrain.trainer
from pipetrain import checkpoint
from pipetrain.cli import main
from pipetrain.run import Run
from tests.conftest import wait_until, write_h5

pytestmark = pytest.mark.model


def producer_threads():
    return [t for t in threading.enumerate() if "-producer-" in t.name]


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 3)).astype("float32")
    write_h5(tmp_path / "d.h5", chunks=16, x=x, y=(x[:, 0] > 0).astype("int64"))
    write_h5(tmp_path / "val.h5", chunks=16, x=x[:32], y=(x[:32, 0] > 0).astype("int64"))
    (tmp_path / "tiny.py").write_text(
        "import keras\n"
        "def model(source):\n"
        "    width = source.fields[source.x].row_shape[0]\n"
        "    m = keras.Sequential([keras.Input((width,)), keras.layers.Dense(2, activation='softmax')])\n"
        "    m.compile('sgd', 'sparse_categorical_crossentropy')\n"
        "    return m\n"
    )
    return tmp_path


def small_model():
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    m.compile("sgd", "sparse_categorical_crossentropy")
    return m


@pytest.mark.parametrize("steps_per_execution", [1, 2])
def test_a_signal_while_the_loop_waits_for_data_stops_at_once_with_a_checkpoint(data, monkeypatch,
                                                                                steps_per_execution):
    source = pipetrain.H5Source(data / "d.h5", x="x", y="y")
    original, released = source.read, threading.Event()

    def stuck(f, a, b, out=None, names=None):  # the disk stops answering at row 64 (batch 4)
        if a >= 64:
            released.wait(30)
        return original(f, a, b, out, names)

    source.read = stuck
    monkeypatch.setattr(source, "block_rows", lambda: [16])  # one read per batch
    close = Run._close_stream
    # The disk answers again when the run closes its stream.
    monkeypatch.setattr(Run, "_close_stream", lambda self: (self._stream and released.set(), close(self)))

    class SignalWhileWaiting(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 3:  # the loop then waits for batch 4, which does not come
                threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()

    history = data / "stall" / "history.jsonl"
    # pipetrain.Interrupted, as after a batch: a script that leaves it uncaught ends with
    # status 130 and no traceback, not Python's death by SIGINT.
    said = "stopped by SIGINT while waiting for the data of epoch 1, batch 5/19 (checkpoint written)"
    with pytest.raises(pipetrain.Interrupted, match=re.escape(said)):
        pipetrain.train(small_model(), source, epochs=2, batch_size=16, shuffle="none", history=history,
                        verbose=0, callbacks=[SignalWhileWaiting()], steps_per_execution=steps_per_execution)
    assert wait_until(lambda: producer_threads() == [])
    h = pipetrain.read_history(history)
    assert [b["batch"] for b in h.batches] == [0, 1, 2, 3][steps_per_execution - 1 :: steps_per_execution]
    assert h.end["status"] == "interrupted" and h.end["error"] == said
    meta, _ = checkpoint.load(checkpoint.latest(history.parent / "checkpoint"))
    assert meta["position"] == {"epoch": 0, "batch": 4}  # resumable at the batch it waited for


def test_the_interrupted_message_always_has_a_reason(data, monkeypatch, capsys):
    # A KeyboardInterrupt without a message (Ctrl-C under Python's own handler).
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipetrain.trainer, "train", interrupted)
    monkeypatch.chdir(data)
    monkeypatch.syspath_prepend(str(data))
    code = main(["train", "--data", "d.h5", "--x", "x", "--y", "y", "--model", "tiny:model", "--quiet",
                 "--history", "runs/i/history.jsonl"])
    err = capsys.readouterr().err
    assert code == 130
    assert err.startswith("pipetrain: interrupted; resume with: pipetrain train --resume runs/i"), err


def test_a_second_signal_says_it_stopped_at_once(data):
    class TwoSignals(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 2:
                os.kill(os.getpid(), signal.SIGINT)
                wait_until(lambda: False, timeout=0.05)  # the first is handled: the run will stop
                os.kill(os.getpid(), signal.SIGINT)
                wait_until(lambda: False, timeout=5)  # the second stops it here

    source = pipetrain.H5Source(data / "d.h5", x="x", y="y")
    with pytest.raises(KeyboardInterrupt, match=r"stopped at once by a second signal \(SIGINT, then SIGINT\)"):
        pipetrain.train(small_model(), source, epochs=1, batch_size=16, verbose=0, callbacks=[TwoSignals()])
    assert wait_until(lambda: producer_threads() == [])


def test_a_batch_size_beyond_the_data_trains_one_batch_an_epoch(data):
    source = pipetrain.H5Source(data / "d.h5", x="x", y="y")
    history = data / "big" / "history.jsonl"
    done = []
    worker = threading.Thread(target=lambda: done.append(pipetrain.train(
        small_model(), source, epochs=2, batch_size=10**10, shuffle="none", history=history, verbose=0,
        monitor_interval=None)), daemon=True)
    worker.start()
    assert wait_until(lambda: not worker.is_alive(), timeout=120), "the run hangs"
    assert done
    h = pipetrain.read_history(history)
    assert [(b["epoch"], b["batch"], b["size"]) for b in h.batches] == [(0, 0, 300), (1, 0, 300)]
    assert h.end["status"] == "completed"


def test_a_batch_the_machine_cannot_hold_exits_2_naming_the_batch_size_and_bytes(data, monkeypatch, capsys):
    with h5py.File(data / "huge.h5", "w") as f:  # 1 TB of rows never written: a tiny file
        f.create_dataset("x", shape=(10**6, 10**6), dtype="uint8", chunks=(4, 10**6))
        f.create_dataset("y", shape=(10**6,), dtype="int64", chunks=(10**5,))
    monkeypatch.chdir(data)
    monkeypatch.syspath_prepend(str(data))
    codes = []
    command = threading.Thread(target=lambda: codes.append(main([
        "train", "--data", "huge.h5", "--x", "x", "--y", "y", "--model", "tiny:model", "--quiet",
        "--shuffle", "none", "--batch-size", "1000000", "--history", "runs/h/history.jsonl"])), daemon=True)
    command.start()
    assert wait_until(lambda: not command.is_alive(), timeout=120), "the command hangs"
    err = capsys.readouterr().err
    assert codes == [2], err
    assert err.startswith("pipetrain: batch_size=1000000: one batch needs 931.3 GiB (1000000 rows of "
                          "1,000,008 bytes), more memory than this machine can allocate"), err
    assert len(err.strip().splitlines()) == 1
    end = pipetrain.read_history(data / "runs/h/history.jsonl").end
    assert end["status"] == "failed" and "batch_size=1000000" in end["error"]


def test_starving_producers_are_raised_and_the_history_says_when(data, monkeypatch, capsys):
    source = pipetrain.H5Source(data / "d.h5", x="x", y="y")
    original = source.read

    def slow(f, a, b, out=None, names=None):  # as if other processes kept the cores busy
        wait_until(lambda: False, timeout=0.2)
        return original(f, a, b, out, names)

    source.read = slow
    monkeypatch.setattr(source, "block_rows", lambda: [16])  # one read per batch
    made = []
    real = pipetrain.run.Prefetcher

    def prefetcher(*args, **kwargs):
        made.append((kwargs["name"], kwargs["priority"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(pipetrain.run, "Prefetcher", prefetcher)
    history = data / "starved" / "history.jsonl"
    validation = pipetrain.H5Source(data / "val.h5", x="x", y="y")
    pipetrain.train(small_model(), source, epochs=1, batch_size=16, shuffle="none", history=history,
                    verbose=0, validation=validation, monitor_interval=None)
    h = pipetrain.read_history(history)
    [raised] = [r for r in h.other if r["type"] == "producers"]
    assert raised["priority"] == "normal" and raised["was"] == "idle" and raised["stream"] == "train"
    # Within the first epoch's 19 batches (on a busy machine, as early as the wait for its first).
    assert raised["epoch"] == 0 and 0 <= raised["batch"] < 19
    assert raised["waited_s"] > 0.3 * raised["window_s"]
    assert made == [("train", "idle"), ("val", "normal")]  # streams made afterwards start raised
    # Readers take the record in their stride.
    assert main(["tail", str(history)]) == 0
    assert "Epoch 1/1" in capsys.readouterr().out
