"""The command line end to end: the embedded default job from any folder, and an
existing history that is never clobbered (more bad input in test_failures.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pipetrain.history import read_history
from tests.conftest import keras_backend, write_h5


def pipetrain(*args, cwd, timeout=600):  # a hang guard, for a busy machine
    return subprocess.run([sys.executable, "-m", "pipetrain", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.model
def test_the_default_job_from_any_folder(tmp_path):
    done = pipetrain("train", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    histories = list((tmp_path / "runs").glob("*/history.jsonl"))
    assert len(histories) == 1
    run_dir = histories[0].parent
    assert (run_dir / "model.keras").exists()

    records = [json.loads(line) for line in histories[0].read_text().splitlines()]
    # A 'producers' record too when the machine was so busy that idle producers starved.
    assert {r["type"] for r in records} - {"producers"} == {"run", "batch", "epoch", "system", "end"}
    assert all({"type", "run", "t"} <= r.keys() for r in records)
    h = read_history(histories[0])
    run = h.runs[0]
    assert run["schema"] == 1 and run["resume"] is None
    assert run["data"]["rows"] == 1438 and run["data"]["steps_per_epoch"] == 45
    assert {"hostname", "cpus", "memory_mb", "python", "keras", "backend", "h5py"} <= run["host"].keys()
    assert run["model"]["params"] > 0
    assert len(h.epochs) == 20 and len(h.batches) == 20 * 45
    last = h.epochs[-1]
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "samples_per_s", "wait_s", "input_bound_pct",
            "read_mb_s", "time_s"} <= last.keys()
    assert last["val_accuracy"] >= 0.95
    assert {"epoch", "batch", "step", "size", "loss", "accuracy", "step_s", "wait_s", "samples_per_s"} <= h.batches[-1].keys()
    assert {"rss_mb", "cpu_pct", "sys_available_mb", "threads"} <= h.system[0].keys()
    assert h.end["status"] == "completed" and h.end["epochs"] == 20 and h.end["steps"] == 900
    # The closing summary.
    out = done.stdout
    assert "final val_accuracy" in out and "samples/s" in out and "input-bound" in out
    assert "peak RSS" in out and str(histories[0].relative_to(tmp_path)) in out


@pytest.fixture
def data(tmp_path):
    return write_h5(tmp_path / "d.h5", x=np.zeros((20, 3), np.float32), y=np.zeros(20, np.int64))


def test_an_existing_history_is_never_clobbered(tmp_path, data):
    history = tmp_path / "runs" / "a" / "history.jsonl"
    history.parent.mkdir(parents=True)
    history.write_text('{"type":"run","run":"old","t":0}\n')
    done = pipetrain("train", "--data", "d.h5", "--x", "x", "--y", "y", "--history", str(history), cwd=tmp_path)
    assert done.returncode == 2
    assert "a history exists already; pass --resume" in done.stderr and "--overwrite to replace it" in done.stderr
    assert history.read_text() == '{"type":"run","run":"old","t":0}\n'


@pytest.mark.one_backend  # its subject is the run folder's, not the backend's (CI time)
@pytest.mark.model
def test_a_finished_run_whose_model_was_not_saved_saves_it_from_its_last_checkpoint_on_resume(tmp_path, capsys,
                                                                                               monkeypatch):
    """Killed after its end record, while it saved model.keras (left torn), or after
    an extension's end (an earlier segment's model left): --resume saves the model from
    the last checkpoint, whole, and writes nothing else. (In this process: the command
    line's code is the same, without a new process's imports.)"""
    import keras

    from pipetrain import checkpoint
    from pipetrain.cli import main

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3)).astype(np.float32)
    write_h5(tmp_path / "d.h5", x=x, y=(x[:, 0] > 0).astype(np.int64))
    assert main(["train", "--data", "d.h5", "--x", "x", "--y", "y", "--epochs", "2", "--batch-size", "8",
                 "--name", "m", "--quiet"]) == 0
    capsys.readouterr()
    run_dir = tmp_path / "runs" / "m"
    model_file, latest = run_dir / "model.keras", checkpoint.latest(run_dir / "checkpoint")
    _, arrays = checkpoint.load(latest)
    saved = [arrays[k] for k in sorted((k for k in arrays if k.startswith("model/")), key=lambda k: int(k.rsplit("/", 1)[1]))]
    others = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p != model_file}

    whole = model_file.read_bytes()
    for damage in ("torn", "stale"):
        if damage == "torn":
            model_file.write_bytes(whole[: len(whole) // 3])
        else:  # whole, but older than the last checkpoint: an earlier segment's
            os.utime(model_file, ns=(latest.stat().st_mtime_ns - 10**9,) * 2)
        assert main(["train", "--resume", str(run_dir)]) == 0, damage
        assert capsys.readouterr().out == (
            f"pipetrain: {run_dir} is already complete (all 2 epochs trained), but {model_file} is missing, not "
            "whole or older than the last checkpoint (the run was stopped before it saved it): saving it from the "
            "last checkpoint\n"), damage
        weights = keras.saving.load_model(model_file).get_weights()
        assert len(weights) == len(saved) and all(np.array_equal(a, b) for a, b in zip(weights, saved)), damage
        assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p != model_file} == others
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".model")] == []


def test_a_model_is_saved_whole_or_not_at_all_and_overwrite_removes_the_old_runs(tmp_path):
    """A save that fails midway leaves the earlier model.keras as it was (and no part of
    the new one); --overwrite removes the old run's model with its history."""
    from pipetrain import runfolder

    class Failing:
        def save(self, path):
            path.write_bytes(b"PK half a model")
            raise OSError(28, "No space left on device")

    folder = tmp_path / "runs" / "r"
    folder.mkdir(parents=True)
    (folder / "model.keras").write_bytes(b"the earlier model")
    with pytest.raises(OSError, match="No space"):
        runfolder.save_model(Failing(), folder / "model.keras")
    assert sorted(p.name for p in folder.iterdir()) == ["model.keras"]
    assert (folder / "model.keras").read_bytes() == b"the earlier model"

    (folder / "history.jsonl").write_text('{"type":"run","run":"old","t":0}\n')
    claimed = runfolder.claim(folder / "history.jsonl", folder / "checkpoint")
    try:
        assert claimed.decide(resume=False, overwrite=True) == "new"
        claimed.clear()
    finally:
        claimed.release()
    assert not (folder / "model.keras").exists() and not (folder / "history.jsonl").exists()


@pytest.mark.model  # backend-dependent: TensorFlow and PyTorch take the limit, JAX refuses the flag
def test_compute_threads_limits_the_backend_before_it_starts(tmp_path):
    backend = keras_backend()
    ask = {"tensorflow": "import tensorflow as tf; print(tf.config.threading.get_intra_op_parallelism_threads())",
           "torch": "import torch; print(torch.get_num_threads())"}.get(backend, "")
    code = f"from pipetrain.cli import set_compute_threads; set_compute_threads(1); {ask}"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    if backend in ("tensorflow", "torch"):
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "1"
    else:
        assert done.returncode == 1
        assert f"--compute-threads: only for the TensorFlow and PyTorch backends (this is {backend})" in done.stderr


def test_compute_threads_on_jax_is_refused_before_anything_is_written(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "history.jsonl").write_text('{"type":"run","run":"old","t":0}\n')
    done = subprocess.run([sys.executable, "-m", "pipetrain", "train", "--name", "r", "--overwrite",
                           "--compute-threads", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "KERAS_BACKEND": "jax"})
    assert done.returncode == 2
    assert done.stderr == "pipetrain: --compute-threads: only for the TensorFlow and PyTorch backends (this is jax)\n"
    assert [p.name for p in run_dir.iterdir()] == ["history.jsonl"] and "keras" not in done.stdout
    assert (run_dir / "history.jsonl").read_text() == '{"type":"run","run":"old","t":0}\n'



# In a process on JAX or PyTorch, after a `pipetrain train`: whether it imported
# TensorFlow; what each random source draws after seeding with 7 as pipetrain train seeds,
# then as Keras alone seeds (which imports TensorFlow); a Keras layer made of TensorFlow.
SEEDED = """
import contextlib, json, random, sys
import numpy as np
from pipetrain.cli import main
assert main(["train", "--data", "d.h5", "--x", "x", "--y", "y", "--epochs", "1", "--quiet"]) == 0
imported = "tensorflow" in sys.modules
import keras
from pipetrain.runfolder import tensorflow_left_unimported

def draws(seeding):
    with seeding:
        keras.utils.set_random_seed(7)
    drawn = [random.random(), float(np.random.random()), float(keras.ops.convert_to_numpy(keras.random.normal(())))]
    if keras.backend.backend() == "torch":
        import torch
        drawn.append(float(torch.rand(())))
    return drawn

ours, theirs = draws(tensorflow_left_unimported()), draws(contextlib.nullcontext())
keras.layers.Hashing(num_bins=4)  # (it needs TensorFlow, and imports it)
print(json.dumps([imported, ours, theirs]))
"""


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_a_run_on_jax_or_torch_does_not_import_tensorflow_and_seeds_as_keras_does(tmp_path, data, backend):
    """Keras imports TensorFlow (3-4 s) on every backend, to seed it and to check the
    objects model.save writes; nothing a run on JAX or PyTorch does uses it, and each of
    its processes paid that. Only while seeding and saving is it left out: a layer made
    of TensorFlow still gets it."""
    done = subprocess.run([sys.executable, "-c", SEEDED], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "KERAS_BACKEND": backend})
    assert done.returncode == 0, done.stderr
    imported, ours, theirs = json.loads(done.stdout.strip().splitlines()[-1])
    assert imported is False
    assert len(list((tmp_path / "runs").glob("*/model.keras"))) == 1
    assert ours == theirs  # every other source seeded as Keras seeds it


@pytest.mark.one_backend  # its subject is not the backend's: TensorFlow covers it (CI time)
@pytest.mark.model
def test_val_split_is_kept_and_a_finished_run_resumed_changes_nothing(tmp_path):
    """--val-split validates on the last rows and is recorded; resuming the finished run
    says "already complete" and writes nothing (history, checkpoints and model as they
    were); --val-split cannot change on resume; more --epochs extend the run."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3)).astype(np.float32)
    write_h5(tmp_path / "d.h5", x=x, y=(x[:, 0] > 0).astype(np.int64))
    done = pipetrain("train", "--data", "d.h5", "--x", "x", "--y", "y", "--val-split", "0.25", "--epochs", "2",
                     "--batch-size", "8", "--name", "v", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    run_dir = tmp_path / "runs" / "v"
    h = read_history(run_dir)
    assert h.runs[0]["data"]["rows"] == 30 and h.runs[0]["data"]["row_range"] == [0, 30]
    assert h.runs[0]["config"]["cli"]["val_split"] == 0.25 and "val_loss" in h.epochs[-1]
    files = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}

    again = pipetrain("train", "--resume", str(run_dir), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout == (f"pipetrain: {run_dir} is already complete (all 2 epochs trained); nothing to train "
                            "(--epochs above 2 extends it)\n")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == files
    changed = pipetrain("train", "--resume", str(run_dir), "--val-split", "0.5", cwd=tmp_path)
    assert changed.returncode == 2 and "--val-split cannot change when resuming" in changed.stderr
    same = pipetrain("train", "--resume", str(run_dir), "--val-split", "0.25", "--batch-size", "8",
                     "--data", "d.h5", "--x", "x", "--y", "y", cwd=tmp_path)  # (recorded as an absolute path, 'x')
    assert same.returncode == 0 and "is already complete" in same.stdout, same.stderr  # the same values: no change

    more = pipetrain("train", "--resume", str(run_dir), "--epochs", "3", "--quiet", cwd=tmp_path)
    assert more.returncode == 0, more.stderr
    h = read_history(run_dir)
    assert len(h.runs) == 2 and h.runs[1]["data"]["row_range"] == [0, 30] and len(h.epochs) == 3
    assert h.end["status"] == "completed" and h.epochs[-1]["samples"] == 30 and "val_loss" in h.epochs[-1]


@pytest.mark.one_backend  # the command line's streams and signals, not the backend's (CI time)
@pytest.mark.model
def test_a_reader_that_leaves_closed_streams_and_sigterm_at_start_end_cleanly(tmp_path):
    """`train | head -n 1`: training goes on to its end (it ended 'failed', silently);
    `ls | head -n 1` and commands with stdout and stderr closed exit 0 with nothing said;
    SIGTERM while the job starts (before a run exists) is one line, exit 130, and the
    folder let go."""
    import signal
    import time

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3)).astype(np.float32)
    write_h5(tmp_path / "d.h5", x=x, y=(x[:, 0] > 0).astype(np.int64))
    train = [sys.executable, "-m", "pipetrain", "train", "--data", "d.h5", "--x", "x", "--y", "y", "--batch-size",
             "8", "--epochs", "3"]
    job = subprocess.Popen([*train, "--name", "piped"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    job.stdout.readline()
    job.stdout.close()  # the reader leaves
    assert job.wait(timeout=600) == 0, job.stderr.read()
    run = read_history(tmp_path / "runs" / "piped")
    assert run.end["status"] == "completed" and len(run.epochs) == 3 and (tmp_path / "runs/piped/model.keras").exists()

    listing = subprocess.Popen([sys.executable, "-m", "pipetrain", "ls", "runs"], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    listing.stdout.readline()
    listing.stdout.close()
    assert listing.wait(timeout=60) == 0 and listing.stderr.read() == b""

    def closed():
        os.close(1)
        os.close(2)

    for args in (["ls", "runs"], ["tail", "runs/piped", "--raw"]):
        done = subprocess.run([sys.executable, "-m", "pipetrain", *args], cwd=tmp_path, preexec_fn=closed, timeout=60)
        assert done.returncode == 0, args

    job = subprocess.Popen([*train, "--name", "stopped"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    lock = tmp_path / "runs" / "stopped" / ".pipetrain.lock"
    deadline = time.monotonic() + 120
    while not lock.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=120) == 130
    assert job.stderr.read().strip().splitlines()[-1] == "pipetrain: terminated (SIGTERM)"
    assert not lock.exists()


FACTORIES = """
def notmodel():
    return 42

def twoargs(a, b):
    pass

def exits():
    raise SystemExit(0)
"""


@pytest.mark.parametrize("args, message", [
    (["--name", "../escaped"], "--name '../escaped': a name, not a path (it goes under runs/); give a path with --history"),
    (["--name", "a/b"], "--name 'a/b': a name, not a path"),
    (["--history", "/dev/null"], "/dev/null: a device in /dev, which would be the run folder (its checkpoints and model)"),
    (["--workers", "100000"], "--workers 100000 must be a whole number from 1 to 256"),
    (["--batch-size", str(10**20)], f"--batch-size {10**20} must be a whole number from 1 to {2**63 - 1}"),
    (["--model", "factories:notmodel"], "--model factories:notmodel: gave int, not a Keras model"),
    (["--model", "factories:twoargs"], "--model factories:twoargs: twoargs() takes 2 arguments (a, b); a model "
                                       "function takes none, or the data source"),
    (["--model", "factories:exits"], "--model factories:exits: exits() exited (SystemExit(0)) instead of returning a model"),
    (["--model", "folder.keras"], "folder.keras: a folder, not a model file"),
    (["--x", "a=x", "b=x", "a=y"], "--x/--y: 'a' is named twice (a=x, a=y)"),
], ids=["name-up", "name-path", "dev-null", "workers", "batch-size", "not-a-model", "two-args", "exits", "folder",
        "input-twice"])
def test_flags_a_hostile_review_found_are_bad_input_and_write_nothing(tmp_path, data, monkeypatch, capsys, args,
                                                                      message):
    """Each was taken: --name '../x' wrote outside runs/, --history /dev/null put the run's
    checkpoints and model in /dev, --workers 100000 and --batch-size 10**20 failed in the
    producers (exit 1, a failed run left behind), a factory's SystemExit(0) ended
    pipetrain silently with 0, --x a=x a=y took the last silently, and the others said
    something else."""
    from pipetrain import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "factories.py").write_text(FACTORIES)
    (tmp_path / "folder.keras").mkdir()
    before = set(os.listdir("/dev"))
    assert cli.main(["train", "--data", "d.h5", "--x", "x", "--y", "y", "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists() and not (tmp_path.parent / "escaped").exists()
    assert set(os.listdir("/dev")) == before


def test_resume_of_a_folder_a_run_is_starting_in_says_so(tmp_path, capsys):
    """The run holds the folder's lock but has not written its history yet: --resume said
    'no history file there (is it a run folder?)'."""
    import socket

    from pipetrain import cli
    from pipetrain.runfolder import LOCK_NAME

    folder = tmp_path / "race"
    folder.mkdir()
    (folder / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "now"}))
    assert cli.main(["train", "--resume", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"--resume {folder}: another run is starting in this folder" in err and len(err.strip().splitlines()) == 1


def test_resume_of_a_run_killed_before_its_first_record_says_so(tmp_path, capsys):
    """kill -9 between the history's creation and its run record leaves an empty history
    (no settings, no checkpoint): --resume said '.../checkpoint: no checkpoint to resume
    from', as if the checkpoints were the trouble; a run at the same path starts afresh."""
    from pipetrain import cli

    folder = tmp_path / "early"
    folder.mkdir()
    (folder / "history.jsonl").write_bytes(b"")
    assert cli.main(["train", "--resume", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err == (f"pipetrain: --resume {folder}: {folder / 'history.jsonl'} is empty (the run was stopped before "
                   "its first record): nothing to resume; start the run again\n")
    assert os.listdir(folder) == ["history.jsonl"]


def test_a_second_ctrl_c_while_the_first_is_told_ends_in_one_line(tmp_path, monkeypatch, capsys):
    """Ctrl-C twice quickly during start-up: the second landed in the handler of the first
    (its import of pipetrain.distributed) and printed two tracebacks."""
    import signal

    from pipetrain import cli, distributed

    def interrupted(args):
        raise KeyboardInterrupt

    def second_ctrl_c(code, text):
        os.kill(os.getpid(), signal.SIGINT)  # Python's handler raises KeyboardInterrupt at once

    monkeypatch.setattr(cli, "cmd_train", interrupted)
    monkeypatch.setattr(distributed, "abandon", second_ctrl_c)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert cli.main(["train"]) == 130
    except KeyboardInterrupt:  # (not left to pytest, which would take it for the user's)
        pytest.fail("the second Ctrl-C went out of the first's handler")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert capsys.readouterr().err == "pipetrain: interrupted\n"
    assert signal.getsignal(signal.SIGINT) is previous


def test_a_model_function_that_raises_is_said_in_one_line_naming_it(tmp_path, monkeypatch, capsys):
    """It ended as "training failed: bad layer config" (exit 1), naming neither --model nor
    the function."""
    (tmp_path / "broken_models.py").write_text("def boom():\n    raise ValueError('bad layer config')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    from pipetrain.cli import main

    data = write_h5(tmp_path / "d.h5", x=np.zeros((40, 3), "float32"), y=np.zeros(40, "int64"))
    code = main(["train", "--data", str(data), "--x", "x", "--y", "y", "--model", "broken_models:boom", "--epochs", "1",
                 "--history", str(tmp_path / "run" / "history.jsonl")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.strip() == "pipetrain: --model broken_models:boom: boom() raised ValueError: bad layer config"


@pytest.mark.one_backend  # the command line's settings, not the backend's (CI time)
@pytest.mark.model
def test_a_resume_that_extended_the_run_and_was_killed_before_its_first_checkpoint_keeps_the_extension(
        tmp_path, monkeypatch, capsys):
    """`--resume --epochs 3` of a 2-epoch run, killed before its first checkpoint, leaves its
    run record (epochs 3) after the checkpoint's settings (epochs 2); a plain `--resume`
    then said the run was complete and trained nothing: the extension was lost."""
    from pipetrain import cli

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3)).astype(np.float32)
    write_h5(tmp_path / "d.h5", x=x, y=(x[:, 0] > 0).astype(np.int64))
    assert cli.main(["train", "--data", "d.h5", "--x", "x", "--y", "y", "--epochs", "2", "--batch-size", "8",
                     "--name", "e", "--quiet"]) == 0
    history = tmp_path / "runs" / "e" / "history.jsonl"
    first = json.loads(history.read_text().splitlines()[0])
    # What the killed `--resume --epochs 3` left: its run record, then a batch (no checkpoint yet).
    extended = {**first, "t": first["t"] + 60, "config": {**first["config"], "cli": {**first["config"]["cli"],
                                                                                       "epochs": 3}},
                "resume": {"epoch": 2, "batch": 0, "checkpoint": None}}
    with history.open("a") as f:
        f.write(json.dumps(extended) + "\n")
        f.write(json.dumps({"type": "batch", "run": first["run"], "t": first["t"] + 61, "epoch": 2, "batch": 0,
                            "step": 10, "size": 8, "loss": 0.5, "step_s": 0.01, "wait_s": 0.0}) + "\n")
    capsys.readouterr()
    assert cli.main(["train", "--resume", "runs/e", "--quiet"]) == 0, capsys.readouterr().err
    h = read_history(history)
    assert [e["epoch"] for e in h.epochs] == [0, 1, 2] and h.end["status"] == "completed"
    assert h.runs[-1]["config"]["cli"]["epochs"] == 3
    # A run record edited by hand (a setting of another kind) is not taken for a setting.
    with history.open("a") as f:
        f.write(json.dumps({**extended, "config": {"cli": {"epochs": "4", "workers": [2]}}}) + "\n")
    assert cli.main(["train", "--resume", "runs/e"]) == 0, capsys.readouterr().err
    assert "is already complete (all 3 epochs trained)" in capsys.readouterr().out


@pytest.mark.one_backend  # the command line's output, not the backend's (CI time)
@pytest.mark.model
def test_a_warning_of_pipetrain_on_the_command_line_is_one_line(tmp_path, data, monkeypatch, capsys):
    """A run folder on a file system without locks: the run goes on, with a warning that
    was Python's two lines (pipetrain's file and line, then the source line of the call)."""
    import errno

    from pipetrain import cli, runfolder

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runfolder.fcntl, "flock", no_locks)
    assert cli.main(["train", "--data", "d.h5", "--x", "x", "--y", "y", "--epochs", "1", "--quiet",
                     "--name", "w"]) == 0
    err = capsys.readouterr().err
    assert err == ("pipetrain: warning: runs/w: this file system refuses file locks (No locks available): nothing "
                   "keeps a second run from writing this folder at the same time\n")


@pytest.mark.one_backend  # the command line's run folder, not the backend's (CI time)
@pytest.mark.model
def test_runs_started_in_the_same_second_without_a_name_each_get_a_folder(tmp_path, data, monkeypatch, capsys):
    """The default folder is the start time to the second: a second job started beside
    the first (`for s in 1 2; do pipetrain train --seed $s & done`) found its folder
    locked and exited 2, and one started after a run in that second found its history."""
    import datetime
    import types

    from pipetrain import cli
    from pipetrain.runfolder import FolderLock

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 2, 3, 4, 5, tzinfo=tz)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "_dt", types.SimpleNamespace(datetime=Frozen))
    finished = tmp_path / "runs" / "20260102-030405-2" / "history.jsonl"
    finished.parent.mkdir(parents=True)
    finished.write_text('{"type":"run","run":"old","t":0}\n')
    with FolderLock(tmp_path / "runs" / "20260102-030405"):  # a run starting in the same second
        assert cli.main(["train", "--data", "d.h5", "--x", "x", "--y", "y", "--epochs", "1", "--quiet"]) == 0, \
            capsys.readouterr().err
    assert read_history(tmp_path / "runs" / "20260102-030405-3").end["status"] == "completed"
    assert finished.read_text() == '{"type":"run","run":"old","t":0}\n'


OPTIONAL_ARGUMENTS = """
import keras

def build(units=4):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(units), keras.layers.Dense(2, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    return model

def build_keywords(*, units=4):
    return build(units)
"""


@pytest.mark.one_backend  # the command line's model loading, not the backend's (CI time)
@pytest.mark.model
@pytest.mark.parametrize("factory", ["build", "build_keywords"])
def test_a_model_function_whose_parameters_all_have_defaults_is_called_with_none(tmp_path, data, monkeypatch,
                                                                                 capsys, factory):
    """It was given the data source: `build(units=4)` made Dense(H5Source(...)) and
    `build(*, units=4)` raised TypeError, both said as the function's error (exit 2)."""
    from pipetrain import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "optional_models.py").write_text(OPTIONAL_ARGUMENTS)
    assert cli.main(["train", "--data", "d.h5", "--x", "x", "--y", "y", "--epochs", "1", "--quiet", "--name", "o",
                     "--model", f"optional_models:{factory}"]) == 0, capsys.readouterr().err
    assert read_history(tmp_path / "runs" / "o").end["status"] == "completed"
