"""Interrupts, failures and bad input: a clear line, the right exit code and end record,
a checkpoint to resume from, and nothing already on disk lost or changed."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

import pipetrain
from pipetrain import checkpoint
from tests.conftest import wait_until, write_h5

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, cwd, timeout=120, **kwargs):
    return subprocess.run([sys.executable, "-m", "pipetrain", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, **kwargs)


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 3)).astype("float32")
    write_h5(tmp_path / "d.h5", chunks=16, x=x, y=(x[:, 0] > 0).astype("int64"))
    write_h5(tmp_path / "short.h5", x=x[:20], y=np.zeros(19, np.int64))
    write_h5(tmp_path / "empty.h5", chunks=None, x=np.zeros((0, 3), np.float32), y=np.zeros(0, np.int64))
    with h5py.File(tmp_path / "text.h5", "w") as f:
        f["x"] = np.array([b"a"] * 4)
        f["y"] = np.zeros(4, np.int64)
    (tmp_path / "notes.h5").write_text("not HDF5\n" * 50)
    whole = (tmp_path / "d.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(whole[: len(whole) // 4])
    # A model whose input does not fit x's 3 features, and one whose loading would run code.
    keras.utils.set_random_seed(0)
    wide = keras.Sequential([keras.Input((5,)), keras.layers.Dense(2, activation="softmax")])
    wide.compile("sgd", "sparse_categorical_crossentropy")
    wide.save(tmp_path / "wide.keras")
    code = keras.Sequential([keras.Input((3,)), keras.layers.Lambda(lambda t: t * 2), keras.layers.Dense(2)])
    code.compile("sgd", "mse")
    code.save(tmp_path / "code.keras")
    (tmp_path / "junk.keras").write_bytes(b"PK\x03\x04 not really a zip")
    # An external link pointing outside the data folder.
    (tmp_path / "sub").mkdir()
    with h5py.File(tmp_path / "sub" / "link.h5", "w") as f:
        f["x"] = h5py.ExternalLink("../d.h5", "x")
        f["y"] = np.zeros(300, np.int64)
    # A folder with another run's checkpoint and no history; a run whose checkpoint is junk.
    (tmp_path / "past" / "old" / "checkpoint").mkdir(parents=True)
    (tmp_path / "past" / "old" / "checkpoint" / "ckpt-000000000004.npz").write_bytes(b"left behind")
    (tmp_path / "past" / "bad" / "checkpoint").mkdir(parents=True)
    (tmp_path / "past" / "bad" / "history.jsonl").write_text('{"type": "run", "run": "r1", "t": 1.0}\n')
    (tmp_path / "past" / "bad" / "checkpoint" / "ckpt-000000000004.npz").write_bytes(b"not a zip")
    (tmp_path / "past" / "bad" / "model.keras").write_bytes(b"PK\x03\x04 a model, not a history")
    return tmp_path


BAD_INPUTS = {
    "missing file": (["--data", "nope.h5", "--x", "x"], "nope.h5: no such file"),
    "not HDF5": (["--data", "notes.h5", "--x", "x"], "notes.h5: not an HDF5 file"),
    "truncated HDF5": (["--data", "cut.h5", "--x", "x"], "cut.h5: cannot be opened as HDF5 (truncated or corrupted?)"),
    "missing dataset": (["--data", "d.h5", "--x", "images"], "d.h5: no dataset 'images' (datasets: x, y)"),
    "x and y lengths": (["--data", "short.h5", "--x", "x", "--y", "y"], "short.h5: dataset 'y' has 19 rows but 'x' has 20"),
    "non-numeric": (["--data", "text.h5", "--x", "x", "--y", "y"], "text.h5: dataset 'x' has dtype |S1; pipetrain needs numbers"),
    "empty dataset": (["--data", "empty.h5", "--x", "x", "--y", "y"], "empty.h5: dataset 'x' is empty (0 rows)"),
    "model input shape": (["--data", "d.h5", "--x", "x", "--y", "y", "--model", "wide.keras"],
                          "d.h5: dataset 'x' rows are (3,) but the model's input"),
    "model file junk": (["--data", "d.h5", "--x", "x", "--y", "y", "--model", "junk.keras"], "junk.keras: cannot load the model"),
    "model runs code": (["--data", "d.h5", "--x", "x", "--y", "y", "--model", "code.keras"],
                        "code.keras: cannot load the model: loading it would run code stored in the file"),
    "model factory": (["--data", "d.h5", "--x", "x", "--y", "y", "--model", "nomodule:f"], "--model nomodule:f: cannot import nomodule"),
    "external link": (["--data", "sub/link.h5", "--x", "x", "--y", "y"], "link.h5: dataset 'x' is an external link to"),
    "epochs": (["--data", "d.h5", "--x", "x", "--epochs", "0"], "--epochs: must be >= 1, got 0"),
    "batch size": (["--data", "d.h5", "--x", "x", "--batch-size", "x"], "--batch-size: expected a whole number, got 'x'"),
    "history unwritable": (["--data", "d.h5", "--x", "x", "--y", "y", "--history", "d.h5/h.jsonl"], "cannot write the history"),
    "resume nothing": (["--resume", "nowhere"], "--resume nowhere: no such run folder or history file"),
    "resume a corrupt checkpoint": (["--resume", "past/bad"], "ckpt-000000000004.npz: cannot read the checkpoint (not an .npz archive)"),
    "resume a model file": (["--resume", "past/bad/model.keras"], "model.keras is not a pipetrain history"),
    "another run's checkpoints": (["--data", "d.h5", "--x", "x", "--y", "y", "--history", "past/old/history.jsonl"],
                                  "past/old/checkpoint: holds the checkpoints of another run"),
    "history is a folder": (["--data", "d.h5", "--x", "x", "--y", "y", "--history", "past"], "past: is a folder"),
    "seed": (["--data", "d.h5", "--x", "x", "--seed", "-1"], "--seed: must be between 0 and 2**32 - 1, got -1"),
    "monitor interval": (["--data", "d.h5", "--x", "x", "--monitor-interval", "-1"],
                         "--monitor-interval: must be a number of seconds above 0 and below a day, got -1"),
    "monitor interval nan": (["--data", "d.h5", "--x", "x", "--monitor-interval", "nan"],
                             "--monitor-interval: must be a number of seconds above 0 and below a day, got nan"),
    "x missing": (["--data", "d.h5"], "--x is required with --data"),
    "negative batch": (["--data", "d.h5", "--x", "x", "--batch-size", "-3"], "--batch-size: must be >= 1, got -3"),
    "shuffle choice": (["--data", "d.h5", "--x", "x", "--shuffle", "random"], "--shuffle: invalid choice"),
    "unknown flag": (["--bogus"], "unrecognized arguments: --bogus"),
    "missing model file": (["--data", "d.h5", "--x", "x", "--y", "y", "--model", "nope.keras"], "nope.keras: no such model file"),
}


def snapshot(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


# The cases that load or build a model run on every backend.
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.model) if c.startswith(("model", "missing model"))
                                  else c for c in sorted(BAD_INPUTS)])
def test_bad_input_exits_2_with_one_line_and_changes_nothing(folder, case, capsys, monkeypatch):
    from pipetrain.cli import main

    args, message = BAD_INPUTS[case]
    monkeypatch.chdir(folder)
    before = snapshot(folder)
    t0 = time.monotonic()
    code = main(["train", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert time.monotonic() - t0 < 10
    assert snapshot(folder) == before  # no run folder, no file touched


def test_bad_input_from_the_real_command(folder):
    done = cli("train", "--data", "short.h5", "--x", "x", "--y", "y", cwd=folder, timeout=60)
    assert done.returncode == 2
    assert done.stderr == "pipetrain: short.h5: dataset 'y' has 19 rows but 'x' has 20; all datasets of a file need the same number of rows\n"


@pytest.mark.model
def test_allow_external_lets_the_link_through(folder):
    done = cli("train", "--data", "sub/link.h5", "--x", "x", "--y", "y", "--allow-external", "--epochs", "1",
               "--quiet", "--history", "runs/ext/history.jsonl", cwd=folder)
    assert done.returncode == 0, done.stderr


@pytest.mark.model
def test_a_corrupt_chunk_mid_run_is_bad_input_with_where(folder):
    path = folder / "d.h5"
    with h5py.File(path, "r") as f:
        info = f["x"].id.get_chunk_info(10)  # rows 160-176
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset)
        fh.write(b"\x00\xff" * (info.size // 2))
    (folder / "tiny.py").write_text(
        "import keras\n"
        "def model():\n"
        "    m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation='softmax')])\n"
        "    m.compile('sgd', 'sparse_categorical_crossentropy')\n"
        "    return m\n"
    )
    done = cli("train", "--data", "d.h5", "--x", "x", "--y", "y", "--shuffle", "none", "--quiet",
               "--model", "tiny:model", "--history", "runs/c/history.jsonl", cwd=folder,
               env={**os.environ, "PYTHONPATH": str(folder)})
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip()
    assert len(line.splitlines()) == 1 and "d.h5" in line and "'x'" in line and "160" in line
    end = pipetrain.read_history(folder / "runs/c/history.jsonl").end
    assert end["status"] == "failed" and "d.h5" in end["error"]


@pytest.mark.model
def test_a_non_finite_loss_fails_clearly_unless_allowed(folder):
    factory = folder / "explode.py"
    factory.write_text(
        "import keras\n"
        "def model():\n"
        "    m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])\n"
        "    m.compile(keras.optimizers.SGD(1e30), 'mse')\n"
        "    return m\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)}
    done = cli("train", "--data", "d.h5", "--x", "x", "--y", "y", "--model", "explode:model", "--quiet",
               "--history", "runs/n/history.jsonl", cwd=folder, env=env)
    assert done.returncode == 1
    assert "non-finite loss at epoch 1, batch" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    h = pipetrain.read_history(folder / "runs/n/history.jsonl")
    assert h.end["status"] == "failed" and "non-finite loss" in h.end["error"]
    done = cli("train", "--data", "d.h5", "--x", "x", "--y", "y", "--model", "explode:model", "--quiet",
               "--epochs", "2", "--allow-nonfinite", "--history", "runs/m/history.jsonl", cwd=folder, env=env)
    assert done.returncode == 0, done.stderr


@pytest.mark.model
def test_a_full_disk_stops_training_with_a_clear_error(folder):
    (folder / "runs").mkdir()
    os.symlink("/dev/full", folder / "runs" / "history.jsonl")
    done = cli("train", "--data", "d.h5", "--x", "x", "--y", "y", "--quiet", "--history", "runs/history.jsonl", cwd=folder)
    assert done.returncode == 1
    assert "cannot write the history" in done.stderr and "No space left on device" in done.stderr


@pytest.mark.model
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_at_the_next_batch_with_a_checkpoint_and_exit_130(folder, sig):
    history = folder / "runs" / "s" / "history.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipetrain", "train", "--data", "d.h5", "--x", "x", "--y", "y", "--epochs", "1000",
         "--batch-size", "8", "--checkpoint-every", "1000000", "--quiet", "--history", str(history)],
        cwd=folder, stderr=subprocess.PIPE, text=True,
    )
    wait_until(lambda: history.exists() and history.read_text().count('"batch"') >= 50, timeout=300, poll=0.05)
    proc.send_signal(sig)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=30)
    # Seconds, not an epoch's worth of work or a hang (the checkpoint position below
    # shows it stopped at the next batch); generous, for a busy machine.
    assert time.monotonic() - t0 < 20
    assert proc.returncode == 130, err
    assert f"stopped by {sig.name}" in err and "resume with: pipetrain train --resume" in err
    h = pipetrain.read_history(history)
    assert h.end["status"] == "interrupted"
    last = h.batches[-1]
    meta, _ = checkpoint.load(checkpoint.latest(history.parent / "checkpoint"))
    assert meta["position"] == {"epoch": last["epoch"], "batch": last["batch"] + 1}

    done = cli("train", "--resume", str(history.parent), "--epochs", str(last["epoch"] + 2), "--quiet", cwd=folder)
    assert done.returncode == 0, done.stderr
    h = pipetrain.read_history(history)
    positions = [(b["epoch"], b["batch"]) for b in h.batches]
    assert positions == sorted(set(positions)) and h.end["status"] == "completed"
    assert len(positions) == (last["epoch"] + 2) * 38


def producer_threads():
    return [t for t in threading.enumerate() if "-producer-" in t.name]


def small_model():
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    m.compile("sgd", "sparse_categorical_crossentropy")
    return m


class SignalAt(keras.callbacks.Callback):
    def __init__(self, batch, times=1):
        super().__init__()
        self.batch, self.times = batch, times

    def on_train_batch_begin(self, batch, logs=None):
        if batch == self.batch:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)


@pytest.mark.model
def test_in_python_sigint_stops_at_the_batch_boundary_and_stops_every_thread(folder):
    source = pipetrain.H5Source(folder / "d.h5", x="x", y="y")
    history = folder / "py" / "history.jsonl"
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt, match="stopped by SIGINT after epoch 1, batch 5/"):
        pipetrain.train(small_model(), source, epochs=3, batch_size=16, history=history, verbose=0,
                        callbacks=[SignalAt(4)], workers=3)
    assert producer_threads() == []
    assert signal.getsignal(signal.SIGINT) is before  # the handler the run found is back
    h = pipetrain.read_history(history)
    assert [b["batch"] for b in h.batches] == [0, 1, 2, 3, 4]  # batch 4 completes, then it stops
    assert h.end["status"] == "interrupted"


@pytest.mark.model
def test_in_python_a_second_sigint_stops_at_once(folder):
    source = pipetrain.H5Source(folder / "d.h5", x="x", y="y")
    history = folder / "py2" / "history.jsonl"
    with pytest.raises(KeyboardInterrupt):
        pipetrain.train(small_model(), source, epochs=3, batch_size=16, history=history, verbose=0,
                        callbacks=[SignalAt(2, times=2)])
    h = pipetrain.read_history(history)
    assert [b["batch"] for b in h.batches] == [0, 1]  # batch 2 never finished
    assert h.end["status"] == "interrupted"
    assert producer_threads() == []


@pytest.mark.model
def test_in_python_a_producer_io_error_fails_the_run_with_where(folder, monkeypatch):
    from pipetrain.pipeline import PipelineError

    source = pipetrain.H5Source(folder / "d.h5", x="x", y="y")
    real = source._readers[0]["x"]

    class FailingDisk:  # a reader in h5py's place whose disk fails at row 128
        def read_direct(self, dest, source_sel):
            if source_sel.start >= 128:
                raise OSError(5, "Input/output error")
            real.read(source_sel.start, source_sel.stop, out=dest)

    source._readers[0]["x"] = FailingDisk()
    monkeypatch.setattr(source, "block_rows", lambda: [16])
    history = folder / "io" / "history.jsonl"
    with pytest.raises(PipelineError, match=r"d\.h5: dataset 'x' rows 128-144: .*Input/output error") as info:
        pipetrain.train(small_model(), source, epochs=1, batch_size=16, shuffle="none", history=history, verbose=0)
    assert isinstance(info.value.__cause__, OSError)
    h = pipetrain.read_history(history)
    assert h.end["status"] == "failed" and "rows 128-144" in h.end["error"]
    assert len(h.batches) == 8  # every batch before the failing rows was trained and recorded
    assert producer_threads() == []


@pytest.mark.model
def test_a_sigint_ignored_by_the_parent_stays_ignored(folder):
    seen = []

    class Look(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            seen.append((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)))

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as under nohup
    try:
        pipetrain.train(small_model(), pipetrain.H5Source(folder / "d.h5", x="x", y="y"), epochs=1,
                        batch_size=64, verbose=0, callbacks=[Look()])
        assert {s[0] for s in seen} == {signal.SIG_IGN}  # not taken over
        assert all(callable(s[1]) for s in seen)  # SIGTERM is handled at batch boundaries
    finally:
        signal.signal(signal.SIGINT, previous)
