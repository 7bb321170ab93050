"""A run folder has one writer at a time, is checked writable before anything loads, is
never replaced unless it is pipetrain's, restarts a run killed before its first
checkpoint, and refuses a resume over data that changed."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import pipetrain
from pipetrain import checkpoint, fingerprint
from pipetrain.cli import main
from pipetrain.errors import RunError
from pipetrain.history import HistoryWriter, encode
from pipetrain.runfolder import LOCK_NAME, FolderBusy, FolderLock
from tests.conftest import wait_until, write_h5

ROOT = Path(__file__).resolve().parent.parent
RACER = Path(__file__).parent / "jobs" / "lock_racer.py"


def racer(*args, **kwargs):
    return subprocess.Popen([sys.executable, str(RACER), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, **kwargs)


def cli(*args, cwd, timeout=180, **kwargs):
    return subprocess.run([sys.executable, "-m", "pipetrain", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def data_file(path, rows=300, seed=0, **kwargs):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 3)).astype("float32")
    return write_h5(path, x=x, y=(x[:, 0] > 0).astype("int64"), **kwargs)


def tiny_model():
    import keras

    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    m.compile("sgd", "sparse_categorical_crossentropy")
    return m


# -- one writer at a time ----------------------------------------------------------------------


def test_two_processes_racing_to_start_one_folder_exactly_one_wins_every_time(tmp_path):
    """Both are told to go at the same instant, 90 times: into a folder that exists,
    into one neither has made yet, and past a lock file a killed run left behind."""
    a, b = racer("rounds"), racer("rounds")
    try:
        for i in range(90):
            folder = tmp_path / ["same", f"new-{i}/run", f"stale-{i}"][i % 3]
            if i % 3 == 2:  # the note of a killed run, here or on another machine
                folder.mkdir()
                host = socket.gethostname() if i % 2 else "elsewhere"
                (folder / LOCK_NAME).write_text(json.dumps({"pid": 2**22 + 1, "host": host, "since": "yesterday"}))
            for p in (a, b):
                p.stdin.write(f"go {folder}\n")
                p.stdin.flush()
            answers = {p.pid: p.stdout.readline().strip() for p in (a, b)}
            assert sorted(answer.split(" ")[0] for answer in answers.values()) == ["lost", "won"], (i, answers)
            winner = next(pid for pid, answer in answers.items() if answer == "won")
            lost = next(answer for answer in answers.values() if answer != "won")
            assert f"{folder}: another run is writing this folder (pid {winner} on " in lost, lost
            for p in (a, b):
                p.stdin.write("release\n")
                p.stdin.flush()
                assert p.stdout.readline().strip() == "released"
            assert not (folder / LOCK_NAME).exists()
    finally:
        for p in (a, b):
            p.stdin.close()
            p.wait(30)
    assert not list(tmp_path.rglob(LOCK_NAME))


def test_no_two_holders_at_once_while_runs_come_and_go(tmp_path):
    """Three processes take and release one folder's lock as fast as they can (the lock
    file is removed on release and made again): never two holders at once."""
    folder = tmp_path / "runs" / "busy"
    procs = [racer("churn", str(folder), "300") for _ in range(3)]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    wins, collisions = np.array([[int(n) for n in out.split()] for out, _ in results]).sum(axis=0)
    assert collisions == 0 and wins > 0


def test_a_lock_left_by_a_killed_process_is_no_lock(tmp_path):
    folder = tmp_path / "run"
    holder = racer("hold", str(folder))
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(FolderBusy, match=f"pid {holder.pid} on "):
        FolderLock(folder)
    holder.send_signal(signal.SIGKILL)
    holder.wait(30)
    assert f'"pid": {holder.pid}' in (folder / LOCK_NAME).read_text()  # the file stays; its lock does not
    with FolderLock(folder) as lock:
        assert lock.held and f'"pid": {os.getpid()}' in (folder / LOCK_NAME).read_text()
    # A run folder holding nothing but that file is a new run's to take.
    holder = racer("hold", str(folder))
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait(30)
    source = pipetrain.H5Source(data_file(tmp_path / "d.h5"), x="x", y="y")
    with pipetrain.Run(source, batch_size=100, history=folder / "history.jsonl", verbose=0, monitor_interval=None) as run:
        for epoch in run.epochs():
            for _ in epoch:
                epoch.record(v=1.0)
    assert len(pipetrain.read_history(folder).batches) == 3 and not (folder / LOCK_NAME).exists()


def test_a_lock_file_left_by_a_killed_run_whose_pid_is_taken_again_is_not_held(tmp_path):
    """A run killed -9 leaves its lock file (pid, host, since); a process started later
    under that pid (pids are reused, soon in a container) does not hold the folder: tail
    --follow waited on such a run for ever (a killed run 'alive', a finished one not done)."""
    from pipetrain.history import Follower
    from pipetrain.runfolder import held

    history = tmp_path / "run" / "history.jsonl"
    history.parent.mkdir()
    history.write_text('{"type":"end","run":"r","t":1.0,"status":"completed"}\n')
    note = {"pid": os.getpid(), "host": socket.gethostname(), "since": "2001-09-09T01:46:40+00:00"}
    (history.parent / LOCK_NAME).write_text(json.dumps(note))  # this process started long after
    assert not held(history)
    with Follower(history) as follower:
        follower.read()
        assert follower.finished
    with FolderLock(history.parent):  # the holder itself, whose note is its own
        assert held(history)


def test_a_signal_while_the_lock_is_taken_leaves_no_lock_file(tmp_path, monkeypatch):
    """SIGTERM (as the command line turns it into an exception) arriving after the lock
    file is made but before its owner is recorded: raised once the lock is held, which
    is then let go, file and folder (CI once saw `train` killed at start leave it)."""
    from pipetrain import runfolder

    class Stop(Exception):
        pass

    stops = []

    def stop(signum, frame):
        stops.append(signum)
        raise Stop

    def flock_then_signal(fd, folder):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered here, between the file and its lock, without the fix
        return real_flock(fd, folder)

    real_flock = runfolder._flock
    monkeypatch.setattr(runfolder, "_flock", flock_then_signal)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(Stop):
            runfolder.claim(tmp_path / "run" / "history.jsonl")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stops == [signal.SIGTERM]  # once: the handler sees one signal, as sent
    assert not (tmp_path / "run").exists()  # nor its lock file
    monkeypatch.setattr(runfolder, "_flock", real_flock)
    runfolder.claim(tmp_path / "run" / "history.jsonl").lock.release()  # and the next run takes the folder


@pytest.mark.one_backend  # its subject is not the backend's: TensorFlow covers it (CI time)
@pytest.mark.model
def test_a_second_train_on_a_running_folder_is_refused_and_touches_nothing(tmp_path, monkeypatch, capsys):
    """A run is training: a second `train` into its folder (new, --overwrite, --resume)
    exits 2 naming the folder and the holder, and the run goes on untouched; tail,
    read_history and follow read it meanwhile without waiting."""
    data_file(tmp_path / "d.h5")
    history = tmp_path / "runs" / "r1" / "history.jsonl"
    first = subprocess.Popen(
        [sys.executable, "-m", "pipetrain", "train", "--data", "d.h5", "--x", "x", "--y", "y", "--epochs", "1000",
         "--batch-size", "8", "--checkpoint-every", "5", "--quiet", "--history", str(history)],
        cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: history.exists() and history.read_text().count('"type":"batch"') >= 20,
                          timeout=120, poll=0.05), first.stderr.read() if first.poll() is not None else ""
        monkeypatch.chdir(tmp_path)
        for args in (["--data", "d.h5", "--x", "x", "--y", "y", "--history", str(history), "--overwrite"],
                     ["--data", "d.h5", "--x", "x", "--y", "y", "--history", str(history)],
                     ["--resume", str(history.parent)],
                     ["--name", "r1", "--data", "d.h5", "--x", "x", "--y", "y", "--overwrite"]):
            assert main(["train", *args]) == 2
            err = capsys.readouterr().err
            assert err.strip().splitlines() == [err.strip()]
            assert f"runs/r1: another run is writing this folder (pid {first.pid} on " in err
        # Readers take no lock.
        seen = pipetrain.read_history(history)
        assert len(seen.runs) == 1 and seen.end is None
        assert main(["tail", str(history.parent)]) == 0
        followed = pipetrain.follow(history)
        assert next(followed)["type"] == "run"
        followed.close()
        count = len(seen.batches)
        assert wait_until(lambda: history.read_text().count('"type":"batch"') > count + 10, timeout=60, poll=0.05)
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(60)
    assert first.returncode == 130
    h = pipetrain.read_history(history)
    assert len(h.runs) == 1 and h.end["status"] == "interrupted"
    positions = [(b["epoch"], b["batch"]) for b in h.batches]
    assert positions == [(e, b) for e in range(positions[-1][0] + 1) for b in range(38)][: len(positions)]
    assert not (history.parent / LOCK_NAME).exists()


@pytest.mark.model
def test_python_runs_hold_the_same_lock(tmp_path):
    source = pipetrain.H5Source(data_file(tmp_path / "d.h5"), x="x", y="y")
    history = tmp_path / "run" / "history.jsonl"
    with pipetrain.Run(source, batch_size=100, history=history, verbose=0, monitor_interval=None) as run:
        other = cli("train", "--data", "d.h5", "--x", "x", "--y", "y", "--history", str(history), "--overwrite",
                    cwd=tmp_path, timeout=60)
        assert other.returncode == 2 and f"another run is writing this folder (pid {os.getpid()} on " in other.stderr
        with pytest.raises(FolderBusy, match=r"run: another run is writing this folder \(this process"):
            pipetrain.train(tiny_model(), source, history=history, overwrite=True, verbose=0)
        for epoch in run.epochs():
            for _ in epoch:
                epoch.record(v=1.0)
    h = pipetrain.read_history(history)
    assert len(h.runs) == 1 and h.end["status"] == "completed" and len(h.batches) == 3
    pipetrain.train(tiny_model(), source, history=history, overwrite=True, verbose=0)  # free again


def test_a_history_given_through_a_symbolic_link_is_locked_where_it_is(tmp_path):
    """``--history latest.jsonl`` (a link to runs/exp1/history.jsonl) writes exp1's
    history: it must take exp1's lock, not one in the link's folder, or it would write
    into a live run's history."""
    from pipetrain.runfolder import claim

    real = tmp_path / "runs" / "exp1" / "history.jsonl"
    real.parent.mkdir(parents=True)
    (tmp_path / "latest.jsonl").symlink_to(real)
    folder = claim(real)
    try:
        with pytest.raises(FolderBusy, match="another run is writing this folder"):
            claim(tmp_path / "latest.jsonl")
        assert not (tmp_path / LOCK_NAME).exists()
    finally:
        folder.release()
    claim(tmp_path / "latest.jsonl").release()  # free again


# -- a place that can be written -------------------------------------------------------------------


DROP_ROOT_OVERRIDE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for cap in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
    if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP: gone after the exec below
        sys.exit(f"prctl: {os.strerror(ctypes.get_errno())}")
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


def without_root_override() -> list[str]:
    """Read-only folders stop everyone but root: as root, the command starts through a
    launcher that gives up the capabilities that let root write anywhere (it stays root,
    owning the files)."""
    if os.geteuid() != 0:
        return []
    launcher = [sys.executable, "-c", DROP_ROOT_OVERRIDE]
    if subprocess.run([*launcher, "-c", "pass"], capture_output=True).returncode != 0:  # pragma: no cover
        pytest.skip("running as root without the right to drop capabilities: no folder is read-only to us")
    return launcher


@pytest.fixture
def read_only(tmp_path):
    made = []

    def make(path: Path, mode: int = 0o555) -> Path:
        path.chmod(mode)
        made.append(path)
        return path

    yield make
    for path in made:
        path.chmod(0o755)


def test_read_only_folders_are_bad_input_before_anything_loads(tmp_path, read_only):
    data_file(tmp_path / "d.h5")
    (tmp_path / "ro").mkdir()
    (tmp_path / "rw" / "checkpoint").mkdir(parents=True)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "history.jsonl").write_bytes(encode({"type": "run", "run": "r", "t": 1.0, "resume": None}))
    read_only(tmp_path / "ro")
    read_only(tmp_path / "rw" / "checkpoint")
    read_only(tmp_path / "old" / "history.jsonl", 0o444)
    launcher = without_root_override() or [sys.executable]
    cases = {  # --model names no module: the folder is refused before the model would load
        "ro/run/history.jsonl": "ro/run/history.jsonl: cannot write the history here (ro/run: Permission denied)",
        "rw/history.jsonl": "rw/checkpoint: cannot write checkpoints (",
    }

    def cli(*args):
        return subprocess.run([*launcher, "-m", "pipetrain", *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=60)

    for history, message in cases.items():
        done = cli("train", "--data", "d.h5", "--x", "x", "--y", "y", "--model", "nomodule:f", "--history", history)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    done = cli("train", "--resume", "old")
    assert done.returncode == 2 and "old/history.jsonl: cannot write the history (" in done.stderr, done.stderr
    assert sorted(p.name for p in (tmp_path / "rw").iterdir()) == ["checkpoint"]
    assert not any((tmp_path / "ro").iterdir()) and sorted(p.name for p in (tmp_path / "old").iterdir()) == ["history.jsonl"]


@pytest.mark.parametrize("history, message", [
    ("/proc/pipetrain-test/history.jsonl", "/proc/pipetrain-test/history.jsonl: cannot write the history here"),
    ("/sys/history.jsonl", "/sys/history.jsonl: cannot write the history here (/sys takes no new file"),
    ("d.h5/history.jsonl", "d.h5/history.jsonl: cannot write the history here (d.h5 is a file, not a folder)"),
])
def test_from_python_an_unwritable_history_is_bad_input_before_the_first_batch(tmp_path, monkeypatch, history, message):
    monkeypatch.chdir(tmp_path)
    source = pipetrain.H5Source(data_file(tmp_path / "d.h5"), x="x", y="y")
    with pytest.raises(RunError) as info:
        pipetrain.Run(source, batch_size=100, history=history, verbose=0).__enter__()
    assert message in str(info.value)


# -- what a run may replace, and messages to Python callers --------------------------------------------


@pytest.mark.model
def test_overwrite_never_replaces_the_data_and_python_errors_name_python_arguments(tmp_path):
    data = data_file(tmp_path / "d.h5")
    before = data.read_bytes()
    source = pipetrain.H5Source(data, x="x", y="y")
    with pytest.raises(RunError, match="d.h5: is the data file .*d.h5 of this run"):
        pipetrain.train(tiny_model(), source, history=data, overwrite=True, verbose=0)
    validation = pipetrain.H5Source(data_file(tmp_path / "v.h5", rows=40), x="x", y="y")
    with pytest.raises(RunError, match="v.h5: is the data file .*v.h5 of this run"):
        pipetrain.train(tiny_model(), source, validation=validation, history=tmp_path / "v.h5", overwrite=True,
                        verbose=0)
    assert data.read_bytes() == before
    history = tmp_path / "run" / "history.jsonl"
    pipetrain.train(tiny_model(), source, history=history, verbose=0)
    with pytest.raises(RunError) as info:
        pipetrain.train(tiny_model(), source, history=history, verbose=0)
    assert "a history exists already; pass resume=True to continue that run or overwrite=True" in str(info.value)
    assert "--" not in str(info.value)


@pytest.mark.one_backend  # its subject is the run folder's, not the backend's (CI time)
@pytest.mark.model
def test_overwrite_of_a_new_history_never_replaces_the_checkpoints_of_another_history_in_its_folder(tmp_path):
    """`--history runs/a/h2.jsonl --overwrite` beside a run of `runs/a/h1.jsonl`: the new
    run removed h1's checkpoints (h1 could no longer be resumed); on the command line
    h1's model.keras stopped it with "is not a run's model (no pipetrain history beside it)"."""
    source = pipetrain.H5Source(data_file(tmp_path / "d.h5", rows=40), x="x", y="y")
    first = tmp_path / "run" / "h1.jsonl"
    pipetrain.train(tiny_model(), source, epochs=1, batch_size=8, history=first, verbose=0)
    kept = sorted((tmp_path / "run" / "checkpoint").iterdir())
    with pytest.raises(RunError, match=r"checkpoint: holds the checkpoints of the run of .*h1\.jsonl, not of .*h2\.jsonl"):
        pipetrain.train(tiny_model(), source, epochs=1, batch_size=8, history=tmp_path / "run" / "h2.jsonl",
                        overwrite=True, verbose=0)
    assert sorted((tmp_path / "run" / "checkpoint").iterdir()) == kept and not (tmp_path / "run" / "h2.jsonl").exists()
    pipetrain.train(tiny_model(), source, epochs=2, batch_size=8, history=first, resume=True, verbose=0)


# -- a run killed before its first checkpoint --------------------------------------------------------


def killed_before_a_checkpoint(history: Path, source) -> None:
    """What a run killed at batch 3, before its first checkpoint, leaves: its run
    record, three batch records and half a line."""
    with HistoryWriter(history) as w:
        w.write({"type": "run", "run": "killed", "t": 1.0, "resume": None, "data": {"steps_per_epoch": 3}})
        for i in range(3):
            w.write({"type": "batch", "run": "killed", "t": 2.0 + i, "epoch": 0, "batch": i, "step": i, "size": 100})
    with open(history, "ab") as f:
        f.write(b'{"type":"batch","run":"kil')


@pytest.mark.parametrize("resume", ["auto", True])
def test_a_run_killed_before_its_first_checkpoint_starts_again_as_one_history(tmp_path, resume):
    source = pipetrain.H5Source(data_file(tmp_path / "d.h5"), x="x", y="y")
    history = tmp_path / "run" / "history.jsonl"
    killed_before_a_checkpoint(history, source)
    (history.parent / "checkpoint").mkdir()
    (history.parent / "checkpoint" / ".ckpt-x1y2.tmp").write_bytes(b"half a checkpoint")  # killed while writing one
    with pipetrain.Run(source, batch_size=100, epochs=2, history=history, verbose=0, monitor_interval=None,
                       resume=resume) as run:
        for epoch in run.epochs():
            for _ in epoch:
                epoch.record(v=1.0)
    h = pipetrain.read_history(history)
    assert len(h.runs) == 2 and h.runs[1]["resume"]["epoch"] == 0 and h.runs[1]["resume"]["batch"] == 0
    assert h.runs[1]["resume"]["checkpoint"] is None and "superseded" in h.runs[1]["resume"]["restart"]
    assert [(b["epoch"], b["batch"]) for b in h.batches] == [(e, b) for e in range(2) for b in range(3)]
    assert [b["run"] for b in h.batches] == [h.runs[1]["run"]] * 6  # the old records are superseded
    assert h.end["status"] == "completed" and h.skipped == 0
    assert not list((history.parent / "checkpoint").glob(".ckpt-*.tmp"))


def test_a_history_with_ended_epochs_but_no_checkpoint_is_not_restarted(tmp_path):
    source = pipetrain.H5Source(data_file(tmp_path / "d.h5"), x="x", y="y")
    history = tmp_path / "run" / "history.jsonl"
    history.parent.mkdir()
    history.write_bytes(encode({"type": "run", "run": "r", "t": 1.0, "resume": None})
                        + encode({"type": "epoch", "run": "r", "t": 2.0, "epoch": 0, "complete": True})
                        + encode({"type": "epoch", "run": "r", "t": 3.0, "epoch": 1, "complete": True}))
    before = history.read_bytes()
    with pytest.raises(RunError, match=r"no checkpoint to resume from, yet .* records finished epochs .* "
                                       r"start afresh with overwrite=True \(and resume=False\)"):
        pipetrain.Run(source, batch_size=100, history=history, verbose=0, resume="auto").__enter__()
    assert history.read_bytes() == before and not (history.parent / LOCK_NAME).exists()


KILLED_AT_BATCH_3 = """
import os, signal, sys
from pipetrain import history
write = history.HistoryWriter.write
def write_then_die(self, record):
    write(self, record)
    if record.get("type") == "batch" and record.get("batch") == 3:  # before any checkpoint
        os.kill(os.getpid(), signal.SIGKILL)
history.HistoryWriter.write = write_then_die
from pipetrain.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.one_backend  # its subject is not the backend's: TensorFlow covers it (CI time)
@pytest.mark.model
def test_a_run_killed_between_its_first_epochs_record_and_checkpoint_starts_again(tmp_path, monkeypatch):
    """The first checkpoint lands after epoch 0's record (never ahead of it): a kill -9
    between the two left a history that no resume would take ("were the checkpoints
    removed?"), not even a script's resume="auto"."""
    data_file(tmp_path / "d.h5")
    history = tmp_path / "runs" / "k" / "history.jsonl"
    killer = KILLED_AT_BATCH_3.replace('record.get("type") == "batch" and record.get("batch") == 3',
                                       'record.get("type") == "epoch" and record.get("epoch") == 0')
    victim = subprocess.run([sys.executable, "-c", killer, "train", "--data", "d.h5", "--x", "x", "--y", "y",
                             "--epochs", "2", "--batch-size", "8", "--quiet", "--history", str(history)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert victim.returncode == -signal.SIGKILL, victim.stderr
    assert checkpoint.latest(history.parent / "checkpoint") is None and '"type":"epoch"' in history.read_text()
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", str(history.parent), "--quiet"]) == 0
    h = pipetrain.read_history(history)
    assert len(h.runs) == 2 and h.runs[1]["resume"]["checkpoint"] is None and "restart" in h.runs[1]["resume"]
    assert [(b["epoch"], b["batch"]) for b in h.batches] == [(e, b) for e in range(2) for b in range(38)]
    assert [e["epoch"] for e in h.epochs] == [0, 1] and h.end["status"] == "completed"


@pytest.mark.one_backend  # its subject is not the backend's: TensorFlow covers it (CI time)
@pytest.mark.model
def test_the_command_line_resumes_a_run_killed_before_its_first_checkpoint(tmp_path, monkeypatch):
    data_file(tmp_path / "d.h5")
    history = tmp_path / "runs" / "k" / "history.jsonl"
    victim = subprocess.run([sys.executable, "-c", KILLED_AT_BATCH_3, "train", "--data", "d.h5", "--x", "x", "--y", "y",
                             "--epochs", "2", "--batch-size", "8", "--quiet", "--history", str(history)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert victim.returncode == -signal.SIGKILL, victim.stderr
    assert checkpoint.latest(history.parent / "checkpoint") is None and '"type":"epoch"' not in history.read_text()
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", str(history.parent), "--quiet"]) == 0
    h = pipetrain.read_history(history)
    assert len(h.runs) == 2 and h.runs[1]["resume"]["checkpoint"] is None
    assert [(b["epoch"], b["batch"]) for b in h.batches] == [(e, b) for e in range(2) for b in range(38)]
    assert h.runs[1]["config"]["cli"] == h.runs[0]["config"]["cli"] and h.end["status"] == "completed"
    assert (history.parent / "model.keras").exists()


# -- a run without models --------------------------------------------------------------------------


@pytest.mark.model
def test_a_run_without_models_ends_its_epochs_and_callbacks_may_stop_it(tmp_path):
    import keras

    class StopAfterFirstEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.model.stop_training = True

    source = pipetrain.H5Source(data_file(tmp_path / "d.h5"), x="x", y="y")
    with pipetrain.Run(source, batch_size=100, epochs=3, history=tmp_path / "run" / "history.jsonl", verbose=0,
                       callbacks=[StopAfterFirstEpoch()]) as run:
        for epoch in run.epochs():
            for batch in epoch:
                epoch.record(mean_x=float(batch.x.mean()))
    assert [e["epoch"] for e in pipetrain.read_history(tmp_path / "run").epochs] == [0]
    assert run.history.history["mean_x"] and run.status == "stopped"


# -- data that changed under a resume ------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["gzip chunks", "raw chunks", "contiguous"])
def test_a_fingerprint_tells_regenerated_or_edited_data_from_a_copy(tmp_path, layout):
    kwargs = {"gzip chunks": {}, "raw chunks": {"compression": None}, "contiguous": {"chunks": None}}[layout]

    def fp(path):
        with pipetrain.H5Source(path, x="x", y="y") as source:
            return source.fingerprint(0)

    path = data_file(tmp_path / "d.h5", rows=5000, **kwargs)
    first = fp(path)
    assert fingerprint.changes(first, fp(path)) is None
    shutil.copy2(path, tmp_path / "kept.h5")  # a copy that keeps the modification time
    assert fingerprint.changes(first, fp(tmp_path / "kept.h5")) is None
    shutil.copy(path, tmp_path / "copy.h5")
    os.utime(tmp_path / "copy.h5", ns=(first["mtime_ns"] + 10**9, first["mtime_ns"] + 10**9))
    assert "though its size, layout and sampled bytes are the same" in fingerprint.changes(first, fp(tmp_path / "copy.h5"))
    data_file(path, rows=5000, seed=1, **kwargs)  # regenerated: a new seed, the same rows
    os.utime(path, ns=(first["mtime_ns"], first["mtime_ns"]))  # even with the old time
    assert fingerprint.changes(first, fp(path)) in ("its bytes differ at sampled places",
                                                    "its datasets' shape, chunks or chunk index differ")
    data_file(path, rows=5000, **kwargs)
    os.utime(path, ns=(first["mtime_ns"], first["mtime_ns"]))
    with h5py.File(path, "r+") as f:  # a label fixed in place
        f["y"][2345] = 1 - f["y"][2345]
    assert fingerprint.changes(first, fp(path)) is not None


@pytest.mark.parametrize("how", ["external link", "virtual dataset"])
def test_data_regenerated_behind_a_link_changes_the_fingerprint(tmp_path, how):
    """A file whose datasets are external links (or virtual datasets) into another file
    of the data folder: the other file regenerated with a new seed, the same layout,
    left this file's size, layout, samples and time as they were, and a resume went on
    "exactly" over the new rows."""
    def fp():
        with pipetrain.H5Source(tmp_path / "index.h5", x="x", y="y") as source:
            return source.fingerprint(0), source.read(0, 0, 50)[0]["x"].copy()

    data_file(tmp_path / "part.h5", rows=50, compression=None)
    with h5py.File(tmp_path / "index.h5", "w") as f:
        for name in ("x", "y"):
            if how == "external link":
                f[name] = h5py.ExternalLink("part.h5", name)
            else:  # (shape and dtype from the file)
                with h5py.File(tmp_path / "part.h5", "r") as part:
                    shape, dtype = part[name].shape, part[name].dtype
                layout = h5py.VirtualLayout(shape, dtype)
                layout[:] = h5py.VirtualSource("part.h5", name, shape)
                f.create_virtual_dataset(name, layout)
    first, rows = fp()
    assert fingerprint.changes(first, fp()[0]) is None
    data_file(tmp_path / "part.h5", rows=50, seed=1, compression=None)
    again, new_rows = fp()
    assert not np.array_equal(rows, new_rows)
    assert fingerprint.changes(first, again) == (
        "part.h5, which its datasets are read from, changed (its size or sampled bytes differ)")
    moved = tmp_path / "moved"  # the data folder moved: the same data
    moved.mkdir()
    for name in ("index.h5", "part.h5"):
        shutil.copy2(tmp_path / name, moved / name)
    with pipetrain.H5Source(moved / "index.h5", x="x", y="y") as source:
        assert fingerprint.changes(again, source.fingerprint(0)) is None


@pytest.mark.model
def test_a_resume_over_changed_data_is_refused_unless_allowed(tmp_path):
    paths = [data_file(tmp_path / "a.h5", rows=200), data_file(tmp_path / "b.h5", rows=100, seed=5)]
    history = tmp_path / "run" / "history.jsonl"

    def train(epochs, **kwargs):
        with pipetrain.H5Source(paths, x="x", y="y") as source:
            return pipetrain.train(tiny_model(), source, epochs=epochs, batch_size=32, history=history, verbose=0,
                                   monitor_interval=None, **kwargs)

    train(1)
    data_file(paths[1], rows=100, seed=6)  # regenerated with a new seed, the same row count
    before = history.read_bytes()
    with pytest.raises(RunError) as info:
        train(2, resume=True)
    message = str(info.value)
    assert f"{paths[1]} changed since the run read it (" in message and "a.h5" not in message
    assert "pass allow_changed_data=True to resume on the data as it is now" in message and "--" not in message
    assert history.read_bytes() == before
    train(2, resume=True, allow_changed_data=True)
    h = pipetrain.read_history(history)
    assert [e["epoch"] for e in h.epochs] == [0, 1]
    assert h.runs[-1]["resume"]["changed_data"] == [message.split(": ", 1)[1].split("; pass")[0]]
    train(3, resume=True)  # the checkpoints now hold the new data's fingerprints
    assert [e["epoch"] for e in pipetrain.read_history(history).epochs] == [0, 1, 2]


@pytest.mark.model
def test_the_command_line_names_its_flag_for_changed_data(tmp_path, monkeypatch, capsys):
    data_file(tmp_path / "d.h5")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", "d.h5", "--x", "x", "--y", "y", "--epochs", "1", "--quiet", "--name", "c"]) == 0
    data_file(tmp_path / "d.h5", seed=3)
    capsys.readouterr()
    assert main(["train", "--resume", "runs/c", "--epochs", "2", "--quiet"]) == 2
    line = capsys.readouterr().err.strip()
    assert len(line.splitlines()) == 1 and "d.h5 changed since the run read it" in line
    assert line.endswith("pass --allow-changed-data to resume on the data as it is now")
    assert main(["train", "--resume", "runs/c", "--epochs", "2", "--quiet", "--allow-changed-data"]) == 0
    h = pipetrain.read_history(tmp_path / "runs" / "c")
    assert "d.h5 changed since the run read it" in h.runs[-1]["resume"]["changed_data"][0]


def test_a_resumed_csv_log_drops_only_its_own_rows_trained_again(tmp_path):
    """The rows at the end of the file for epochs the resumed run trains again go; the
    rows of another run earlier in a file appended to stay."""
    import keras

    log = tmp_path / "log.csv"
    rows = ["epoch,loss\n"] + [f"{e},{e / 10}\n" for e in range(6)] + [f"{e},{e / 100}\n" for e in range(4)]
    log.write_text("".join(rows))
    logger = keras.callbacks.CSVLogger(str(log), append=True)
    checkpoint.continue_csv_logs([logger], epoch=2)
    assert log.read_text() == "".join(rows[:-2]) and logger.append


@pytest.mark.model
def test_an_object_written_again_under_a_resume_is_refused_by_its_version(tmp_path, monkeypatch):
    """An object in a bucket is fingerprinted by its size, version (ETag) and layout, as
    opened: no request made. Written again with the same size and layout, its new ETag
    refuses the resume."""
    from tests.remote_helpers import start_moto
    from tests.test_buckets import FAST, Bucket

    monkeypatch.setenv("PIPETRAIN_CACHE", str(tmp_path / "cache"))
    server, endpoint = start_moto()
    try:
        bucket = Bucket(endpoint)
        url = bucket.put(data_file(tmp_path / "d.h5", compression=None))
        history = tmp_path / "run" / "history.jsonl"

        def train(epochs, **kwargs):
            with pipetrain.H5Source(url, x="x", y="y", storage_options=bucket.options(), fetch=FAST) as source:
                return pipetrain.train(tiny_model(), source, epochs=epochs, batch_size=64, history=history,
                                       verbose=0, monitor_interval=None, **kwargs)

        train(1)
        recorded = pipetrain.read_history(history).runs[0]["data"]["fingerprints"]
        assert [f["file"] for f in recorded] == [url]
        assert {"size", "version", "layout"} == recorded[0]["fingerprint"].keys()
        bucket.put(data_file(tmp_path / "d.h5", seed=4, compression=None))
        with pytest.raises(RunError, match=f"{url} changed since the run read it \\(its version went from "):
            train(2, resume=True)
        train(2, resume=True, allow_changed_data=True)
        assert [e["epoch"] for e in pipetrain.read_history(history).epochs] == [0, 1]
    finally:
        server.stop()


def test_a_history_path_ending_in_a_slash_is_refused_not_written_as_a_file_beside_a_run_in_the_working_folder(tmp_path, monkeypatch):
    """Path() drops the slash: history="new/" wrote a history file "new" and put the run's
    checkpoint/ (and, from the command line, model.keras) in the working folder."""
    source = pipetrain.H5Source(data_file(tmp_path / "d.h5"), x="x")
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(RunError, match=r"history='new/': names a folder; give the history file \(say new/history.jsonl\)"):
        with pipetrain.Run(source, batch_size=32, epochs=1, history="new/", verbose=0) as run:
            for epoch in run.epochs():
                for _ in epoch:
                    pass
    assert sorted(p.name for p in tmp_path.iterdir()) == before
