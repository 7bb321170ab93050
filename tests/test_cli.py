"""The command line end to end: the embedded default job, and one clear line with exit
code 2 for bad usage and bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest

from pipetrain.history import read_history
from tests.conftest import write_h5


def pipetrain(*args, cwd, timeout=240):
    return subprocess.run([sys.executable, "-m", "pipetrain", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def test_the_default_job_from_any_folder(tmp_path):
    done = pipetrain("train", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    histories = list((tmp_path / "runs").glob("*/history.jsonl"))
    assert len(histories) == 1
    run_dir = histories[0].parent
    assert (run_dir / "model.keras").exists()

    records = [json.loads(line) for line in histories[0].read_text().splitlines()]
    assert {r["type"] for r in records} == {"run", "batch", "epoch", "system", "end"}
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


@pytest.mark.parametrize("args, message", [
    (["train", "--data", "missing.h5", "--x", "x"], "missing.h5: no such file"),
    (["train", "--data", "d.h5", "--x", "nope"], "d.h5: no dataset 'nope' (datasets: x, y)"),
    (["train", "--data", "d.h5"], "--x is required with --data"),
    (["train", "--data", "d.h5", "--x", "x", "--y", "y", "--epochs", "0"], "--epochs: must be >= 1, got 0"),
    (["train", "--data", "d.h5", "--x", "x", "--y", "y", "--batch-size", "-3"], "--batch-size: must be >= 1, got -3"),
    (["train", "--data", "d.h5", "--x", "x", "--y", "y", "--shuffle", "random"], "--shuffle: invalid choice"),
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["train", "--data", "d.h5", "--x", "x", "--y", "y", "--model", "nope.keras"], "nope.keras: no such model file"),
    (["train", "--data", "d.h5", "--x", "x", "--y", "y", "--history", "d.h5/h.jsonl"], "cannot write the history"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, data, args, message):
    done = pipetrain(*args, cwd=tmp_path, timeout=60)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr


def test_an_existing_history_is_never_clobbered(tmp_path, data):
    history = tmp_path / "runs" / "a" / "history.jsonl"
    history.parent.mkdir(parents=True)
    history.write_text('{"type":"run","run":"old","t":0}\n')
    done = pipetrain("train", "--data", "d.h5", "--x", "x", "--y", "y", "--history", str(history), cwd=tmp_path)
    assert done.returncode == 2
    assert "a history exists already; pass --resume to continue that run or --overwrite" in done.stderr
    assert history.read_text() == '{"type":"run","run":"old","t":0}\n'
