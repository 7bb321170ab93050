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
from pipetrain.history import encode
from tests.conftest import wait_until, write_h5

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, cwd, timeout=120, **kwargs):
    return subprocess.run([sys.executable, "-m", "pipetrain", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def with_path(folder: Path) -> dict:
    """The environment with ``folder`` first on PYTHONPATH (the rest kept: it may name the
    pipetrain under test)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """The .keras files of the folder below, saved once (saving takes a while) and copied."""
    where = tmp_path_factory.mktemp("models")
    keras.utils.set_random_seed(0)
    # A model whose input does not fit x's 3 features, and one whose loading would run code.
    wide = keras.Sequential([keras.Input((5,)), keras.layers.Dense(2, activation="softmax")])
    wide.compile("sgd", "sparse_categorical_crossentropy")
    wide.save(where / "wide.keras")
    code = keras.Sequential([keras.Input((3,)), keras.layers.Lambda(lambda t: t * 2),
                             keras.layers.Dense(2, activation="softmax")])
    code.compile("sgd", "sparse_categorical_crossentropy")
    code.save(where / "code.keras")
    four = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="softmax")])
    four.compile("sgd", "sparse_categorical_crossentropy")
    four.save(where / "four.keras")
    return {p.name: p.read_bytes() for p in where.iterdir()}


@pytest.fixture
def folder(tmp_path, model_files):
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
    for name, data in model_files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "junk.keras").write_bytes(b"PK\x03\x04 not really a zip")
    (tmp_path / "eager_model.py").write_text(  # a factory of a model that cannot train k batches a call
        "import keras\n\ndef build():\n    m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)], name='eager')\n"
        "    m.compile('sgd', keras.losses.SparseCategoricalCrossentropy(from_logits=True), run_eagerly=True)\n"
        "    return m\n")
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
    bad_files(tmp_path, x)
    # Run folders a run must not use as they are: a history with ended epochs and no
    # checkpoint left; a file where the checkpoints go; a model the run would replace.
    (tmp_path / "past" / "done").mkdir()
    (tmp_path / "past" / "done" / "history.jsonl").write_bytes(
        encode({"type": "run", "run": "r2", "t": 1.0, "resume": None, "config": {"cli": {}}})
        + encode({"type": "epoch", "run": "r2", "t": 2.0, "epoch": 0, "loss": 0.5, "complete": True})
        + encode({"type": "epoch", "run": "r2", "t": 3.0, "epoch": 1, "loss": 0.4, "complete": True}))
    (tmp_path / "past" / "ckfile").mkdir()
    (tmp_path / "past" / "ckfile" / "checkpoint").write_text("a file where the checkpoint folder goes\n")
    (tmp_path / "past" / "m").mkdir()
    ok = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    ok.compile("sgd", "sparse_categorical_crossentropy")
    ok.save(tmp_path / "past" / "m" / "model.keras")
    (tmp_path / "notes.txt").write_text("my notes, not a history\n")
    (tmp_path / "d2.h5").write_bytes(whole)
    os.mkfifo(tmp_path / "pipe.jsonl")
    (tmp_path / "past" / "sym").mkdir()
    (tmp_path / "past" / "sym" / ".pipetrain.lock").symlink_to("../../notes.txt")
    return tmp_path


def corrupt(path: Path, row: int, name: str = "x") -> None:
    with h5py.File(path, "r") as f:
        info = f[name].id.get_chunk_info_by_coord((row,) + (0,) * (f[name].ndim - 1))
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + 2)
        fh.write(bytes(b ^ 0x5A for b in fh.read(min(40, info.size - 4))))


def patched(path: Path, at: int, value: int, size: int = 8) -> None:
    with open(path, "r+b") as fh:
        fh.seek(at)
        fh.write(value.to_bytes(size, "little"))


def bad_files(tmp_path: Path, x: np.ndarray) -> None:
    """Files that issue 17's round of bad input found, one per case of the table."""
    y = (x[:, 0] > 0).astype("int64")
    with h5py.File(tmp_path / "zw.h5", "w") as f:  # rows of zero width, contiguous and chunked
        f.create_dataset("x", shape=(300, 0), dtype="f4")
        f["y"] = y
    with h5py.File(tmp_path / "zwc.h5", "w") as f:
        f.create_dataset("x", shape=(300, 0), maxshape=(None, None), chunks=(16, 1), dtype="f4")
        f["y"] = y
    write_h5(tmp_path / "f128.h5", chunks=None, x=x.astype(np.longdouble), y=y)
    (tmp_path / "loop.h5").symlink_to(tmp_path / "loop.h5")
    with h5py.File(tmp_path / "null.h5", "w") as f:
        f.create_dataset("x", data=h5py.Empty("f4"))
        f["y"] = y
    with h5py.File(tmp_path / "vlen.h5", "w") as f:
        f.create_dataset("x", data=["a"] * 300, dtype=h5py.string_dtype())
        f["y"] = y
    write_h5(tmp_path / "w.h5", x=x, y=y, w=np.ones((300, 2), np.float32))
    labels = y.copy()
    labels[200] = 9
    write_h5(tmp_path / "lab.h5", x=x, y=labels)
    write_h5(tmp_path / "val9.h5", x=x[:50], y=labels[170:220])  # 9 at row 30
    halves = labels[170:220].astype(np.float32)
    halves[12] = np.nan
    write_h5(tmp_path / "valnan.h5", x=x[:50], y=halves)  # float labels, NaN at row 12
    halves[12] = 0.5
    write_h5(tmp_path / "valhalf.h5", x=x[:50], y=halves)  # 0.5 at row 12
    big = y.copy()
    big[5] = 2**45
    write_h5(tmp_path / "big.h5", x=x, y=big)
    umax = y.astype(np.uint64)
    umax[3] = np.iinfo(np.uint64).max
    write_h5(tmp_path / "umax.h5", x=x, y=umax)
    nan = x.copy()
    nan[7, 1] = np.nan
    write_h5(tmp_path / "nan.h5", x=nan, y=y)
    for name, row in (("first.h5", 0), ("last.h5", 299)):  # corrupt edge chunks (the fast path's self-check)
        write_h5(tmp_path / name, x=x, y=y)
        corrupt(tmp_path / name, row)
    with h5py.File(tmp_path / "f32.h5", "w") as f:  # read by h5py: a fletcher32 checksum failure
        f.create_dataset("x", data=x, chunks=(16, 3), fletcher32=True)
        f["y"] = y
    corrupt(tmp_path / "f32.h5", 160)
    with h5py.File(tmp_path / "so.h5", "w") as f:  # read by h5py: scaleoffset+gzip
        f.create_dataset("x", data=(x * 100).astype("int16"), chunks=(16, 3), scaleoffset=0, compression="gzip")
        f["y"] = y
    corrupt(tmp_path / "so.h5", 160)
    write_h5(tmp_path / "eof.h5", x=x, y=y)  # cut inside a chunk, the superblock's end-of-file address patched
    with h5py.File(tmp_path / "eof.h5", "r") as f:
        info = f["x"].id.get_chunk_info(10)
    os.truncate(tmp_path / "eof.h5", info.byte_offset + info.size // 2)
    patched(tmp_path / "eof.h5", 40, info.byte_offset + info.size // 2)
    write_h5(tmp_path / "key.h5", x=x, y=y)  # a chunk key flipped out of the dataset
    data = (tmp_path / "key.h5").read_bytes()
    node = data.find(b"TREE")
    while data[node + 4] != 1:  # the first raw-data chunk node (x's)
        node = data.find(b"TREE", node + 1)
    patched(tmp_path / "key.h5", node + 24 + 40 + 8, 2**40)  # key 1's row coordinate
    cut = (tmp_path / "d.h5").read_bytes()[:1000]  # the root group's links past the cut
    (tmp_path / "stub.h5").write_bytes(cut)
    patched(tmp_path / "stub.h5", 40, len(cut))


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
                        "code.keras: cannot load the model: it holds Python code (a Lambda layer's function), "
                        "which would run as it loads; if you trust the file, pass --unsafe-model"),
    "model factory": (["--data", "d.h5", "--x", "x", "--y", "y", "--model", "nomodule:f"], "--model nomodule:f: cannot import nomodule"),
    "model eager with steps per execution": (["--data", "d.h5", "--x", "x", "--y", "y", "--model", "eager_model:build",
                                              "--steps-per-execution", "4"],
                                             "--steps-per-execution 4: model 'eager' trains one batch a step"),
    "external link": (["--data", "sub/link.h5", "--x", "x", "--y", "y"], "link.h5: dataset 'x' is an external link to"),
    "epochs": (["--data", "d.h5", "--x", "x", "--epochs", "0"], "--epochs: must be >= 1, got 0"),
    "batch size": (["--data", "d.h5", "--x", "x", "--batch-size", "x"], "--batch-size: expected a whole number, got 'x'"),
    "history under a file": (["--data", "d.h5", "--x", "x", "--y", "y", "--history", "d.h5/h.jsonl"],
                             "d.h5/h.jsonl: cannot write the history here (d.h5 is a file, not a folder)"),
    "history under /sys": (["--data", "d.h5", "--x", "x", "--y", "y", "--history", "/sys/pipetrain-test/history.jsonl"],
                           "/sys/pipetrain-test/history.jsonl: cannot write the history here (/sys"),
    "history in /proc": (["--data", "d.h5", "--x", "x", "--y", "y", "--history", "/proc/pipetrain-test.jsonl"],
                         "/proc/pipetrain-test.jsonl: cannot write the history here (/proc takes no new file"),
    "unwritable history before anything else": (["--data", "nope.h5", "--x", "x", "--model", "nomodule:f",
                                                 "--history", "/proc/pipetrain-test.jsonl"], "cannot write the history here"),
    "history is the data file": (["--data", "d.h5", "--x", "x", "--y", "y", "--history", "d.h5"],
                                 "d.h5: is the data file d.h5 of this run"),
    "overwrite the data file": (["--data", "d.h5", "--x", "x", "--y", "y", "--history", "d.h5", "--overwrite"],
                                "d.h5: is the data file d.h5 of this run"),
    "overwrite the validation file": (["--data", "d.h5", "--val", "d2.h5", "--x", "x", "--y", "y", "--history", "d2.h5",
                                       "--overwrite"], "d2.h5: is the data file d2.h5 of this run"),
    "overwrite another HDF5 file": (["--data", "d.h5", "--x", "x", "--y", "y", "--history", "short.h5", "--overwrite"],
                                    "short.h5: is an HDF5 file, not a pipetrain history (overwrite replaces only a pipetrain history)"),
    "overwrite a text file": (["--data", "d.h5", "--x", "x", "--y", "y", "--history", "notes.txt", "--overwrite"],
                              "notes.txt: is a file with no run record at its start, not a pipetrain history"),
    "history is a model": (["--data", "d.h5", "--x", "x", "--y", "y", "--history", "wide.keras"],
                           "wide.keras: is a zip archive (a .keras model or a checkpoint?), not a pipetrain history"),
    "history is a pipe": (["--data", "d.h5", "--x", "x", "--y", "y", "--history", "pipe.jsonl"],
                          "pipe.jsonl: is a named pipe, not a history file"),
    "checkpoint folder is a file": (["--data", "d.h5", "--x", "x", "--y", "y", "--history", "past/ckfile/history.jsonl"],
                                    "past/ckfile/checkpoint: is a file, where the run keeps its checkpoints"),
    "overwrite what is not a checkpoint": (["--data", "d.h5", "--x", "x", "--y", "y", "--history", "past/old/history.jsonl",
                                            "--overwrite"], "ckpt-000000000004.npz: is not a pipetrain checkpoint"),
    "model the run would replace": (["--data", "d.h5", "--x", "x", "--y", "y", "--model", "past/m/model.keras",
                                     "--history", "past/m/history.jsonl"],
                                    "--model past/m/model.keras: the run saves its model there at its end"),
    "a model the run would replace": (["--data", "d.h5", "--x", "x", "--y", "y", "--history", "past/m/history.jsonl"],
                                      "past/m/model.keras: a model exists already where the run saves its own"),
    "overwrite a model of no run": (["--data", "d.h5", "--x", "x", "--y", "y", "--history", "past/m/history.jsonl",
                                     "--overwrite"], "past/m/model.keras: is not a run's model (no pipetrain history "
                                                     "beside it), and --overwrite replaces only a run's files"),
    "resume ended epochs without checkpoints": (["--resume", "past/done"],
                                                "past/done/checkpoint: no checkpoint to resume from, yet "
                                                "past/done/history.jsonl records finished epochs (were the checkpoints "
                                                "removed?); start afresh with --overwrite instead of --resume"),
    "lock file is a link": (["--data", "d.h5", "--x", "x", "--y", "y", "--history", "past/sym/history.jsonl"],
                            "past/sym/.pipetrain.lock is a symbolic link, where a run keeps its lock file: remove it"),
    "changed data allowed on a new run": (["--data", "d.h5", "--x", "x", "--allow-changed-data"],
                                          "--allow-changed-data is for --resume"),
    "resume nothing": (["--resume", "nowhere"], "--resume nowhere: no such run folder or history file"),
    "resume a corrupt checkpoint": (["--resume", "past/bad"], "ckpt-000000000004.npz: cannot read the checkpoint (not an .npz archive)"),
    "resume a model file": (["--resume", "past/bad/model.keras"],
                            "model.keras: is a zip archive (a .keras model or a checkpoint?), not a pipetrain history: "
                            "nothing to resume"),
    "another run's checkpoints": (["--data", "d.h5", "--x", "x", "--y", "y", "--history", "past/old/history.jsonl"],
                                  "past/old/checkpoint: holds the checkpoints of another run"),
    "history is a folder": (["--data", "d.h5", "--x", "x", "--y", "y", "--history", "past"], "past: is a folder"),
    "seed": (["--data", "d.h5", "--x", "x", "--seed", "-1"], "--seed: must be between 0 and 2**32 - 1, got -1"),
    "partitions beyond any need": (["--data", "d.h5", "--x", "x", "--partitions", "10000000"],
                                   "--partitions: must be at most 65536, got 10000000"),
    "an empty --resume (an unset variable)": (["--resume", ""], "--resume: expected a value, got an empty one"),
    "an empty --model": (["--data", "d.h5", "--x", "x", "--model", ""], "--model: expected a value, got an empty one"),
    "a --model of no module": (["--data", "d.h5", "--x", "x", "--y", "y", "--model", ":"],
                               "--model :: expected FILE.keras or package.module:function"),
    "monitor interval": (["--data", "d.h5", "--x", "x", "--monitor-interval", "-1"],
                         "--monitor-interval: must be a number of seconds above 0 and below a day, got -1"),
    "monitor interval nan": (["--data", "d.h5", "--x", "x", "--monitor-interval", "nan"],
                             "--monitor-interval: must be a number of seconds above 0 and below a day, got nan"),
    "x missing": (["--data", "d.h5"], "--x is required with --data"),
    "negative batch": (["--data", "d.h5", "--x", "x", "--batch-size", "-3"], "--batch-size: must be >= 1, got -3"),
    "shuffle choice": (["--data", "d.h5", "--x", "x", "--shuffle", "random"], "--shuffle: invalid choice"),
    "unknown flag": (["--bogus"], "unrecognized arguments: --bogus"),
    "missing model file": (["--data", "d.h5", "--x", "x", "--y", "y", "--model", "nope.keras"], "nope.keras: no such model file"),
    # issue 17: the second round
    "zero-width x": (["--data", "zw.h5", "--x", "x", "--y", "y"], "zw.h5: dataset 'x' has rows of shape (0,), which hold no values"),
    "zero-width x chunked": (["--data", "zwc.h5", "--x", "x", "--y", "y"], "zwc.h5: dataset 'x' has rows of shape (0,), which hold no values"),
    "float128": (["--data", "f128.h5", "--x", "x", "--y", "y"], "f128.h5: dataset 'x' has dtype float128 (extended precision), which Keras cannot take"),
    "symlink loop": (["--data", "loop.h5", "--x", "x"], "loop.h5: a loop of symbolic links"),
    "null dataspace": (["--data", "null.h5", "--x", "x", "--y", "y"], "null.h5: dataset 'x' has a null dataspace (no values at all)"),
    "vlen strings": (["--data", "vlen.h5", "--x", "x", "--y", "y"], "vlen.h5: dataset 'x' holds variable-length strings; pipetrain needs numbers"),
    "2-D sample weight": (["--data", "w.h5", "--x", "x", "--y", "y", "--sample-weight", "w"],
                          "w.h5: dataset 'w' has rows of shape (2,); sample weights need one number per row"),
    "label out of the model's range": (["--data", "lab.h5", "--x", "x", "--y", "y", "--model", "four.keras", "--history", "runs/l/h.jsonl"],
                                       "lab.h5: dataset 'y' row 200 holds label 9, but the model's output"),
    "validation label out of the default model's range": (["--data", "d.h5", "--val", "val9.h5", "--x", "x", "--y", "y"],
                                                           "val9.h5: dataset 'y' row 30 holds label 9, but the default model has 2 classes"),
    "validation label NaN, default model": (["--data", "d.h5", "--val", "valnan.h5", "--x", "x", "--y", "y"],
                                            "valnan.h5: dataset 'y' row 12 holds label nan, which is not a class number"),
    "validation label 0.5, default model": (["--data", "d.h5", "--val", "valhalf.h5", "--x", "x", "--y", "y"],
                                            "valhalf.h5: dataset 'y' row 12 holds label 0.5, which is not a class number"),
    "validation label out of the model's range": (["--data", "d.h5", "--val", "val9.h5", "--x", "x", "--y", "y", "--model", "four.keras",
                                                   "--batch-size", "100", "--history", "runs/w/h.jsonl"],
                                                  "val9.h5: dataset 'y' row 30 holds label 9, but the model's output"),
    "label 2**45, default model": (["--data", "big.h5", "--x", "x", "--y", "y"],
                                   "big.h5: dataset 'y' row 5 holds label 35184372088832; the default model takes class numbers 0 to 1,048,575"),
    "label uint64 max, default model": (["--data", "umax.h5", "--x", "x", "--y", "y"], "umax.h5: dataset 'y' row 3 holds label 18446744073709551615"),
    "label uint64 max, user model": (["--data", "umax.h5", "--x", "x", "--y", "y", "--model", "four.keras", "--history", "runs/u/h.jsonl"],
                                     "umax.h5: dataset 'y' row 3 holds label 18446744073709551615, but the model's output"),
    "NaN in x, default model": (["--data", "nan.h5", "--x", "x", "--y", "y"], "nan.h5: dataset 'x' row 7 holds nan; the default model standardises its input"),
    "corrupt first chunk": (["--data", "first.h5", "--x", "x", "--y", "y"], "first.h5: dataset 'x' rows 0-16: gzip"),
    "corrupt last chunk": (["--data", "last.h5", "--x", "x", "--y", "y"], "last.h5: dataset 'x' rows 288-300: gzip"),
    "fletcher32 checksum": (["--data", "f32.h5", "--x", "x", "--y", "y"],
                            "f32.h5: dataset 'x' rows 160-176: HDF5 cannot read them"),
    "scaleoffset+gzip corruption": (["--data", "so.h5", "--x", "x", "--y", "y"],
                                    "so.h5: dataset 'x' rows 160-176: HDF5 cannot read them"),
    "cut inside a chunk, end of file patched": (["--data", "eof.h5", "--x", "x", "--y", "y"], "eof.h5: dataset 'x' rows 160-176: its chunk of"),
    "chunk key flipped": (["--data", "key.h5", "--x", "x", "--y", "y"],
                          "key.h5: dataset 'x': the chunk index is damaged (it lists a chunk at (1099511627776, 0), outside the dataset's (300, 3))"),
    "damaged structure": (["--data", "stub.h5", "--x", "x", "--y", "y"], "stub.h5: dataset 'x' cannot be read (damaged file?): RuntimeError"),
    "name and history": (["--data", "d.h5", "--x", "x", "--y", "y", "--name", "a", "--history", "b/h.jsonl"],
                         "pipetrain: --name and --history both place the run (runs/NAME/history.jsonl, or the file "
                         "given): give one"),
    "history ending in a slash": (["--data", "d.h5", "--x", "x", "--y", "y", "--history", "newrun/"],
                                  "--history newrun/: names a folder; give the history file (say newrun/history.jsonl)"),
    "history name too long": (["--data", "d.h5", "--x", "x", "--y", "y", "--history", "h/" + "n" * 300 + ".jsonl"],
                              "n.jsonl: File name too long)"),
    "run name too long": (["--data", "d.h5", "--x", "x", "--y", "y", "--name", "n" * 300],
                          "nnnnnnnn: File name too long)"),
    "make-data one class": (["make-data", "m.h5", "--rows", "10", "--classes", "1"], "pipetrain: --classes 1: must be >= 2"),
    "make-data flag": (["make-data", "m.h5"], "pipetrain: make-data: give either --rows N (one file) or --splits NAME=ROWS"),
}
# Cases that build or load a model (CI runs them on every Keras backend), and cases found
# mid-run: those leave a run folder whose history records the failure; nothing that was
# there before changes.
MODEL_CASES = {"label out of the model's range", "validation label out of the default model's range",
               "validation label NaN, default model", "validation label 0.5, default model",
               "validation label out of the model's range",
               "label 2**45, default model", "label uint64 max, default model", "label uint64 max, user model",
               "NaN in x, default model", "fletcher32 checksum", "scaleoffset+gzip corruption"}
MID_RUN = {"label out of the model's range", "validation label out of the model's range", "label uint64 max, user model"}


def snapshot(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns if p.is_file() else None for p in folder.rglob("*")}


# The cases that load or build a model run on every backend.
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.model)
                                  if c in MODEL_CASES or c.startswith(("model", "missing model")) else c
                                  for c in sorted(BAD_INPUTS)])
def test_bad_input_exits_2_with_one_line_and_changes_nothing(folder, case, capsys, monkeypatch):
    from pipetrain.cli import main

    args, message = BAD_INPUTS[case]
    monkeypatch.chdir(folder)
    before = snapshot(folder)
    t0 = time.monotonic()
    code = main(args if args[0] in ("make-data", "inspect") else ["train", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not err.startswith("pipetrain: pipetrain"), err
    assert time.monotonic() - t0 < 10
    after = snapshot(folder)
    assert {p: t for p, t in after.items() if p in before} == before  # no file touched
    if case in MID_RUN:  # the run's own history records the failure
        history = next(p for p in after if p not in before and p.suffix == ".jsonl")
        end = pipetrain.read_history(history).end
        assert end["status"] == "failed" and message in end["error"], end
    else:
        assert after == before  # no run folder either


def test_bad_input_from_the_real_command(folder):
    done = cli("train", "--data", "short.h5", "--x", "x", "--y", "y", cwd=folder, timeout=60)
    assert done.returncode == 2
    assert done.stderr == "pipetrain: short.h5: dataset 'y' has 19 rows but 'x' has 20; all datasets of a file need the same number of rows\n"


@pytest.mark.one_backend  # its subject is not the backend's: TensorFlow covers it (CI time)
@pytest.mark.model
def test_allow_external_lets_the_link_through(folder):
    done = cli("train", "--data", "sub/link.h5", "--x", "x", "--y", "y", "--allow-external", "--epochs", "1",
               "--quiet", "--history", "runs/ext/history.jsonl", cwd=folder)
    assert done.returncode == 0, done.stderr


@pytest.mark.one_backend  # its subject is not the backend's: TensorFlow covers it (CI time)
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
               env=with_path(folder))
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip()
    assert len(line.splitlines()) == 1 and "d.h5" in line and "'x'" in line and "160" in line
    assert line.count("d.h5: dataset 'x'") == 1, line  # said once, not once per layer
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
    env = with_path(folder)
    done = cli("train", "--data", "d.h5", "--x", "x", "--y", "y", "--model", "explode:model", "--quiet",
               "--history", "runs/n/history.jsonl", cwd=folder, env=env)
    assert done.returncode == 1
    assert "non-finite loss at epoch 1, batch" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    h = pipetrain.read_history(folder / "runs/n/history.jsonl")
    assert h.end["status"] == "failed" and "non-finite loss" in h.end["error"]
    # Before the first checkpoint (which is at the epoch's end): it said "the last checkpoint holds finite weights"
    assert h.end["checkpoint"] is None and "(training stopped; no checkpoint was written)" in done.stderr
    done = cli("train", "--data", "d.h5", "--x", "x", "--y", "y", "--model", "explode:model", "--quiet",
               "--epochs", "2", "--allow-nonfinite", "--history", "runs/m/history.jsonl", cwd=folder, env=env)
    assert done.returncode == 0, done.stderr


@pytest.mark.one_backend  # its subject is not the backend's: TensorFlow covers it (CI time)
@pytest.mark.model
def test_a_full_disk_stops_training_with_a_clear_error(folder):
    (folder / "runs").mkdir()
    os.symlink("/dev/full", folder / "runs" / "history.jsonl")
    done = cli("train", "--data", "d.h5", "--x", "x", "--y", "y", "--quiet", "--history", "runs/history.jsonl", cwd=folder)
    assert done.returncode == 1
    assert "cannot write the history" in done.stderr and "No space left on device" in done.stderr


@pytest.mark.model
# Both on TensorFlow; on JAX and PyTorch a SIGINT and its resume are test_resume's
# "int-batch" point (CI time).
@pytest.mark.one_backend
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
    after = {"epoch": last["epoch"], "batch": last["batch"] + 1}
    if any(e["epoch"] == last["epoch"] for e in h.epochs):  # the signal came at an epoch's last batch
        after = {"epoch": last["epoch"] + 1, "batch": 0}
    assert meta["position"] == after

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


INSPECTED = ["zw.h5", "zwc.h5", "f128.h5", "loop.h5", "null.h5", "vlen.h5", "w.h5", "first.h5", "last.h5", "f32.h5",
             "so.h5", "eof.h5", "key.h5", "stub.h5", "cut.h5", "notes.h5", "sub/link.h5", "empty.h5", "text.h5"]


def test_inspect_describes_or_refuses_every_bad_file_in_one_line(folder, capsys, monkeypatch):
    from pipetrain.cli import main

    monkeypatch.chdir(folder)
    for name in INSPECTED:
        code = main(["inspect", name])
        out, err = capsys.readouterr()
        assert code in (0, 2) and "Traceback" not in out + err, (name, out, err)
        if code == 2:
            assert len(err.strip().splitlines()) == 1 and name in err, (name, err)
        else:
            assert out.startswith(name) and "\n" in out, (name, out)
    main(["inspect", "zw.h5"])
    assert "refused: has rows of shape (0,), which hold no values" in capsys.readouterr().out
    main(["inspect", "null.h5"])
    out = capsys.readouterr().out
    assert "null" in out and "refused: has a null dataspace" in out
    main(["inspect", "first.h5"])
    assert "refused: rows 0-16: gzip" in capsys.readouterr().out
    assert main(["inspect", "loop.h5"]) == 2
    assert capsys.readouterr().err == "pipetrain: loop.h5: a loop of symbolic links\n"


def test_a_blosc2_dataset_without_hdf5plugin_names_the_package_and_the_extra(tmp_path):
    hdf5plugin = pytest.importorskip("hdf5plugin")
    x = np.arange(600, dtype="float32").reshape(200, 3)
    with h5py.File(tmp_path / "b2.h5", "w") as f:
        f.create_dataset("x", data=x, chunks=(16, 3), **hdf5plugin.Blosc2())
        f["y"] = np.zeros(200, np.int64)
    # A fresh interpreter in which hdf5plugin cannot be imported: HDF5 lacks the filter.
    code = "import sys; sys.modules['hdf5plugin'] = None; from pipetrain.cli import main; sys.exit(main())"
    for args in (["train", "--data", "b2.h5", "--x", "x", "--y", "y"], ["inspect", "b2.h5"]):
        done = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        said = done.stderr if args[0] == "train" else done.stdout
        assert "b2.h5" in said and "blosc2" in said and "pip install hdf5plugin, or pip install 'pipetrain[filters]'" in said, done
        if args[0] == "train":
            assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    with pipetrain.H5Source(tmp_path / "b2.h5", x="x") as source:  # with hdf5plugin: read by h5py
        assert source.read(0, 0, 200)[0]["x"].tobytes() == x.tobytes()


@pytest.mark.model
def test_datasets_in_groups_train_with_the_default_model(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype("float32")
    with h5py.File(tmp_path / "g.h5", "w") as f:
        f["a/b/x"] = x
        f["a/b/y"] = (x[:, 0] > 0).astype("int64")
    from pipetrain.cli import main

    code = main(["train", "--data", str(tmp_path / "g.h5"), "--x", "/a/b/x", "--y", "a/b/y", "--epochs", "1",
                 "--quiet", "--history", str(tmp_path / "runs" / "g" / "history.jsonl")])
    assert code == 0
    assert pipetrain.read_history(tmp_path / "runs" / "g" / "history.jsonl").end["status"] == "completed"


@pytest.mark.model
def test_one_number_a_row_trains_with_the_default_model(tmp_path):
    """x of shape (rows,): the source takes it (rows of shape ()), but the default model
    put a Dense on it straight ("expected min_ndim=2, found ndim=1"): training failed."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=200).astype("float32")
    with h5py.File(tmp_path / "one.h5", "w") as f:
        f["x"] = x
        f["y"] = (x > 0).astype("int64")
        f["t"] = 2 * x
    from pipetrain.cli import main

    for y in ("y", "t"):
        history = tmp_path / "runs" / y / "history.jsonl"
        assert main(["train", "--data", str(tmp_path / "one.h5"), "--x", "x", "--y", y, "--epochs", "1",
                     "--quiet", "--history", str(history)]) == 0
        assert pipetrain.read_history(history).end["status"] == "completed"


@pytest.mark.model
def test_unsafe_model_loads_code_with_a_warning_and_the_resume_keeps_it(folder, capsys, monkeypatch):
    from pipetrain.cli import main

    monkeypatch.chdir(folder)
    assert main(["train", "--data", "d.h5", "--x", "x", "--y", "y", "--model", "code.keras", "--unsafe-model",
                 "--epochs", "1", "--quiet", "--history", "runs/u/history.jsonl"]) == 0
    assert "warning: --unsafe-model: loading code.keras runs the Python code stored in it" in capsys.readouterr().err
    assert main(["train", "--resume", "runs/u", "--epochs", "2", "--quiet"]) == 0, capsys.readouterr().err
    assert [e["epoch"] for e in pipetrain.read_history(folder / "runs/u/history.jsonl").epochs] == [0, 1]


@pytest.mark.model
def test_a_model_factory_in_the_current_folder_under_the_console_script(folder, tmp_path, monkeypatch):
    """The `pipetrain` console script runs with its own folder first on sys.path, not the
    current one as `python -m pipetrain` has it: the factory must be found all the same,
    and again by a resume started from another folder (in a new process, as here: the
    module is forgotten and neither folder is on sys.path)."""
    from pipetrain.cli import main

    (folder / "mine_factory.py").write_text(
        "import keras\n"
        "def model():\n"
        "    m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation='softmax')])\n"
        "    m.compile('sgd', 'sparse_categorical_crossentropy')\n"
        "    return m\n"
    )
    as_a_console_script = [p for p in sys.path if p not in ("", os.getcwd(), str(folder), str(tmp_path))]
    monkeypatch.setattr(sys, "path", list(as_a_console_script))
    monkeypatch.chdir(folder)
    assert main(["train", "--data", "d.h5", "--x", "x", "--y", "y", "--model", "mine_factory:model",
                 "--epochs", "1", "--quiet", "--history", "runs/m/history.jsonl"]) == 0
    monkeypatch.setattr(sys, "path", list(as_a_console_script))
    monkeypatch.delitem(sys.modules, "mine_factory")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", str(folder / "runs" / "m"), "--epochs", "2", "--quiet"]) == 0
    assert sys.modules["mine_factory"].__file__ == str(folder / "mine_factory.py")


def test_keras_errors_are_cut_after_a_word_never_inside_one():
    from pipetrain.models import _shorten

    text = "The config of this layer holds a function. " * 20 + "see keras.config.enable_unsafe_deserialization()"
    short = _shorten(text)
    assert len(short) <= 602 and short.endswith(" …") and short[:-2].endswith("function.")
    assert _shorten("short words only") == "short words only"


def test_make_data_names_only_the_setting_that_is_wrong(tmp_path):
    from pipetrain.synth import DataSpecError, make_data

    with pytest.raises(DataSpecError) as info:
        make_data(tmp_path / "m.h5", rows=10, classes=1)
    assert str(info.value) == "classes=1: must be >= 2 (labels of one class teach nothing)"


def test_tensorflow_op_errors_become_the_one_line_that_says_what_failed():
    from pipetrain.errors import one_line

    text = (
        "Graph execution error:\n\nDetected at node compile_loss/x defined at (most recent call last):\n"
        '  File "/tmp/job.py", line 5, in <module>\n\n  File "/keras/nn.py", line 1438, in sparse\n\n'
        "Received a label value of 9 which is outside the valid range of [0, 4).  Label values: "
        + " ".join(["1"] * 40) + "\n\t [[{{node compile_loss/lambda/Sparse}}]] [Op:__inference_one_step_on_data_130]"
    )
    assert one_line(RuntimeError(text), with_type=True) == (
        "RuntimeError: Received a label value of 9 which is outside the valid range of [0, 4). "
        "Label values: 1 1 1 1 1 1 1 1 …"
    )


@pytest.mark.parametrize("settings, message", [
    ({"seed": -1}, "seed=-1 must be a whole number from 0 to 4294967295"),
    ({"seed": 1.5}, "seed=1.5 must be a whole number from 0 to 4294967295"),
    ({"seed": 2**40}, "seed=1099511627776 must be a whole number from 0 to 4294967295"),
    ({"seed": "a"}, "seed='a' must be a whole number from 0 to 4294967295"),
    ({"partitions": 10**7}, "partitions=10000000 must be a whole number from 1 to 65536"),
    ({"shuffle_window": None}, "shuffle_window=None must be a whole number >= 1"),
    ({"shuffle_window": float("inf")}, "shuffle_window=inf must be a whole number >= 1"),
    ({"shuffle_window": -5}, "shuffle_window=-5 must be a whole number >= 1"),
    ({"max_queue_bytes": "1e9"}, "max_queue_bytes='1e9' must be a whole number >= 1"),
])
def test_a_setting_out_of_range_or_of_the_wrong_kind_is_refused_naming_it(tmp_path, settings, message):
    """Before anything is written: a negative seed failed in a producer thread, a huge
    partition count took minutes and gigabytes to plan each epoch, a shuffle window or
    a byte bound of the wrong kind was a TypeError (or an OverflowError) from the plan or
    the pool, a negative window was taken as one block."""
    import re

    path = write_h5(tmp_path / "d.h5", x=np.zeros((20, 2), np.float32))
    with pipetrain.H5Source(path, x="x") as source, pytest.raises(pipetrain.errors.RunError, match=re.escape(message)):
        pipetrain.Run(source, batch_size=4, history=tmp_path / "h.jsonl", **settings)
    assert not (tmp_path / "h.jsonl").exists()


def test_sample_weights_and_class_weights_together_are_refused_before_anything_is_written(tmp_path):
    """As fit refuses them: train() started the run and failed at its first batch, a
    ValueError leaving a failed run in the history."""
    from pipetrain.errors import RunError

    path = write_h5(tmp_path / "d.h5", x=np.zeros((40, 3), np.float32), y=np.zeros(40, np.int64),
                    w=np.ones(40, np.float32))
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    with pipetrain.H5Source(path, x="x", y="y", sample_weight="w") as source, \
            pytest.raises(RunError, match="class_weight=.*sample weights of the source .*'w'.*exclude each other"):
        pipetrain.train(model, source, verbose=0, history=tmp_path / "run" / "history.jsonl", class_weight={0: 2.0})
    assert not (tmp_path / "run").exists()


def test_arguments_of_the_wrong_kind_are_refused_naming_them(tmp_path):
    """What a Python user gets wrong first: a path where a source belongs, a callback or a
    mode where a list or a dict belongs, None or a number where paths or names belong; and
    sample weights named in a list are checked as one named alone."""
    import re

    from pipetrain.errors import RunError
    from pipetrain.source import SourceError

    path = write_h5(tmp_path / "d.h5", x=np.zeros((40, 3), np.float32), y=np.zeros(40, np.int64),
                    w2=np.ones((40, 2), np.float32), w=np.ones(40, np.float32))
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    with pipetrain.H5Source(path, x="x", y="y") as source, \
            pipetrain.H5Source(path, x="x", y="y", sample_weight="w") as weighted:
        # (bad class weights failed at the first batch: a failed run, a raw ValueError or a NaN loss)
        for data, settings, message in [
                (source, {"validation": str(path)}, f"validation='{path}': expected a pipetrain.H5Source"),
                (source, {"callbacks": 5}, "callbacks=5: expected a list of keras.callbacks.Callback"),
                (source, {"class_weight": "balanced"}, "class_weight='balanced': expected a dict"),
                (source, {"class_weight": {0: "x", 1: 1.0}}, "class_weight={0: 'x'}: a weight must be a finite number"),
                (source, {"class_weight": {0: 1.0, 1: None}}, "class_weight={1: None}: a weight must be a finite"),
                (source, {"class_weight": {0: float("inf")}}, "class_weight={0: inf}: a weight must be a finite"),
                (weighted, {"class_weight": {0: 1.0}}, "exclude each other, as in fit: give one")]:
            with pytest.raises(RunError, match=re.escape(message)):
                pipetrain.train(model, data, verbose=0, history=tmp_path / "h.jsonl", **settings)
    with pytest.raises(RunError, match=re.escape(f"source='{path}': expected a pipetrain.H5Source")):
        pipetrain.train(model, str(path), verbose=0)
    assert not (tmp_path / "h.jsonl").exists()
    for args, kwargs, message in [((None,), {"x": "x"}, "paths=None: expected a file, URL or glob"),
                                  ((path,), {"x": 3}, "x=3: expected a dataset name"),
                                  ((path,), {"x": "x", "sample_weight": ["w2"]},
                                   "dataset 'w2' has rows of shape (2,); sample weights need one number per row")]:
        with pytest.raises(SourceError, match=re.escape(message)):
            pipetrain.H5Source(*args, **kwargs)
    with pipetrain.H5Source(bytes(path), x="x") as source, pipetrain.H5Source(tmp_path.glob("d.h5"), x="x") as again:
        assert source.rows == again.rows == 40


@pytest.mark.one_backend  # the message's name for the output, not the backend's (CI time)
@pytest.mark.model
def test_a_label_out_of_a_sequential_models_range_names_its_output_layer():
    """A Sequential model has no output_names in Keras 3: the output was named by its
    symbolic tensor, 'keras_tensor_2', a name found nowhere in the user's code."""
    from pipetrain.labels import sparse_label_limits

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="hidden"),
                              keras.layers.Dense(3, activation="softmax", name="classes")])
    model.compile("adam", "sparse_categorical_crossentropy")
    assert sparse_label_limits(model, "y")["y"].output == "classes"
