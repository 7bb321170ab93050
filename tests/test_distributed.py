"""Data-parallel training on JAX: two processes on 127.0.0.1 (gloo collectives) and one
process with two forced host devices train as one process does; the processes' rows are
disjoint and complete; process 0 alone writes one history holding every process's
samples; a stop on one process stops both at one boundary, and the run resumes on
another number of processes at the exact next batch; a killed process ends the other
with an ``end`` record naming it, and the run resumes to the same weights.

These tests start their processes with KERAS_BACKEND=jax whatever backend the test
session uses (what they test exists only on JAX), so they are not marked ``model``: CI
runs them once. The rest of the distributed code (shares, partitions, coverage) is
proven without processes in tests/test_plan.py.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import pipetrain
from tests.conftest import wait_until, write_h5
from tests.remote_helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
JOB = ROOT / "tests" / "jobs" / "dist_job.py"
ROWS = (160, 95)  # 255 rows: 7 batches of 32 and a partial batch of 31, which cannot split over 2


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(sum(ROWS), 12)).astype("float32")
    y = np.argmax(x[:, :3], axis=1).astype("int64")
    paths, first = [], 0
    for i, n in enumerate(ROWS):
        rows = slice(first, first + n)
        paths.append(str(write_h5(folder / f"part-{i}.h5", chunks=16, x=x[rows], y=y[rows], row=np.arange(first, first + n))))
        first += n
    return ",".join(paths)


def env(**extra) -> dict:
    return {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3", **extra}


def start(out: Path, count: int, own: dict[int, dict] | None = None, **opts) -> list[subprocess.Popen]:
    """``count`` processes of one run (a plain run for 1), each with its own log (and
    ``own[i]``'s settings over ``opts``). The others start once process 0 listens: one
    that cannot reach it would wait in JAX's initialize for five minutes."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    coordinator = f"127.0.0.1:{port}" if count > 1 else "-"

    def process(i: int) -> subprocess.Popen:
        settings = [f"{k}={v}" for k, v in {**opts, **(own or {}).get(i, {})}.items()]
        p = subprocess.Popen([sys.executable, str(JOB), str(out), coordinator, str(count), str(i), *settings],
                             env=env(), stdout=open(out / f"log-{i}", "w"), stderr=subprocess.STDOUT)
        p.log = out / f"log-{i}"
        return p

    first = process(0)
    if count > 1:
        def listening() -> bool:
            with socket.socket() as s:
                return first.poll() is not None or s.connect_ex(("127.0.0.1", port)) == 0
        if not wait_until(listening, timeout=120, poll=0.05) or first.poll() is not None:
            first.kill()
            raise AssertionError(f"process 0 never listened on {coordinator}:\n{first.log.read_text()[-3000:]}")
    return [first, *(process(i) for i in range(1, count))]


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[int]:
    """The processes' exit codes; past ``timeout`` all are killed and their logs shown."""
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(max(1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            shown = "\n".join(f"--- {q.log} (exit {q.wait()})\n{q.log.read_text()[-3000:]}" for q in procs)
            raise AssertionError(f"not finished within {timeout:.0f} s:\n{shown}") from None
    return codes


def logs(out: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(out.glob("log-*")))


def weights(out: Path, process: int = 0) -> list[np.ndarray]:
    with np.load(out / f"weights-{process}.npz") as w:
        return [w[k] for k in sorted(w.files, key=lambda k: int(k.split("_")[1]))]


def rows(out: Path, process: int) -> np.ndarray:
    return np.load(out / f"rows-{process}.npy")


def assert_same_training(a: Path, b: Path, atol: float = 1e-5) -> None:
    """The same epoch metrics and final weights (summation order may differ: 1e-5)."""
    ha, hb = pipetrain.read_history(a / "run"), pipetrain.read_history(b / "run")
    assert [e["samples"] for e in ha.epochs] == [e["samples"] for e in hb.epochs]
    for ea, eb in zip(ha.epochs, hb.epochs, strict=True):
        for name in ("loss", "accuracy", *(("val_loss", "val_accuracy") if "val_loss" in ea else ())):
            assert abs(ea[name] - eb[name]) <= atol, (name, ea[name], eb[name])
    for wa, wb in zip(weights(a), weights(b), strict=True):
        np.testing.assert_allclose(wa, wb, atol=atol)


@pytest.fixture(scope="module")
def plain(data, tmp_path_factory) -> Path:
    """One process, one device, file order: what the others must equal."""
    out = tmp_path_factory.mktemp("plain")
    assert finish(start(out, 1, data=data, val=1)) == [0], logs(out)
    return out


@pytest.fixture(scope="module")
def two(data, tmp_path_factory) -> Path:
    """Two processes, file order, never interrupted."""
    out = tmp_path_factory.mktemp("two")
    assert finish(start(out, 2, data=data, val=1)) == [0, 0], logs(out)
    return out


def test_two_processes_train_as_one_and_share_the_rows(plain, two):
    out = two
    assert_same_training(plain, out)
    for w0, w1 in zip(weights(out, 0), weights(out, 1), strict=True):
        np.testing.assert_array_equal(w0, w1)  # one model, replicated

    r0, r1 = rows(out, 0), rows(out, 1)
    for epoch in (0, 1):
        mine = [r[r[:, 0] == epoch] for r in (r0, r1)]
        assert len(mine[0]) == len(mine[1])  # every process trained as many rows, in as many steps
        assert set(mine[0][:, 1]) == set(mine[1][:, 1]) == set(range(8))
        full = [m[m[:, 1] < 7][:, 2] for m in mine]
        assert not set(full[0]) & set(full[1])  # disjoint shares ...
        assert sorted(np.concatenate(full)) == list(range(224))  # ... covering the full batches once
        last = [sorted(m[m[:, 1] == 7][:, 2]) for m in mine]
        assert last[0] == last[1] == list(range(224, 255))  # 31 rows cannot split: both compute them whole

    # One history, written by process 0, with every process's samples.
    run = out / "run"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint", "history.jsonl", "history.jsonl.index"]
    h = pipetrain.read_history(run)
    assert len(h.runs) == 1 and h.end["status"] == "completed"
    assert h.runs[0]["distributed"]["processes"] == 2
    assert [host["process"] for host in h.runs[0]["distributed"]["hosts"]] == [0, 1]
    assert {s["process"] for s in h.system} == {0, 1}
    assert all("wait_s" in s and s["host"] for s in h.system)
    assert [b["size"] for b in h.batches[:8]] == [32] * 7 + [31]  # global batches
    assert [p["process"] for p in h.epochs[0]["processes"]] == [0, 1]
    assert h.epochs[0]["read_mb"] == pytest.approx(sum(p["read_mb"] for p in h.epochs[0]["processes"]))


def test_one_process_two_devices_trains_as_one_device(data, plain, tmp_path):
    out = tmp_path / "devices"
    assert finish(start(out, 1, data=data, devices=2, val=1)) == [0], logs(out)
    assert_same_training(plain, out)
    assert pipetrain.read_history(out / "run").runs[0]["distributed"]["devices"] == 2


def test_a_stop_on_one_process_stops_both_and_the_run_resumes_on_one(data, tmp_path):
    """The block shuffle: the global batches of two processes are those of one; SIGTERM
    to one process stops both at one batch boundary with a checkpoint; resumed on one
    process, the run goes on at the exact next batch to the weights of a run never
    stopped."""
    settings = {"data": data, "shuffle": "block", "partitions": 4}
    whole, stopped, one = tmp_path / "whole", tmp_path / "stopped", tmp_path / "one"
    procs = start(whole, 1, **settings) + start(stopped, 2, stop="1:0:1", **settings)
    assert finish(procs) == [0, 130, 130], logs(stopped)
    h = pipetrain.read_history(stopped / "run")
    # Signalled after 2 batches: both stop at the next boundary that is a multiple of 4 steps.
    assert h.end["status"] == "interrupted" and h.end["steps"] == 4
    assert h.end["checkpoint"].endswith("ckpt-000000000004.npz")

    expected = rows(whole, 0)
    got = np.concatenate([rows(stopped, 0), rows(stopped, 1)])
    for batch in range(4):  # two processes' shares make the batches one process trains
        assert sorted(got[(got[:, 0] == 0) & (got[:, 1] == batch)][:, 2]) == sorted(
            expected[(expected[:, 0] == 0) & (expected[:, 1] == batch)][:, 2])

    (one / "run").parent.mkdir(parents=True)
    os.symlink(stopped / "run", one / "run")
    assert finish(start(one, 1, resume=1, **settings)) == [0], logs(one)
    resumed = rows(one, 0)
    assert resumed[0].tolist()[:2] == [0, 4]  # the exact next batch
    np.testing.assert_array_equal(resumed, expected[len(expected) - len(resumed):])
    assert_same_training(whole, one)


def test_processes_with_other_epochs_or_other_contents_are_refused(data, tmp_path):
    """Process 1 asked for 4 epochs and read a file of the same rows with other values:
    the run trained on both mixed (or ended in a false 'lost process 0'); now neither
    process starts, each says what differs, and nothing is trained."""
    other = tmp_path / "other"
    other.mkdir()
    first = data.split(",")[0]
    with h5py.File(first) as f:
        write_h5(other / "part-0.h5", chunks=16, x=f["x"][...] + 1, y=f["y"][...], row=f["row"][...])
    mixed = ",".join([str(other / "part-0.h5"), data.split(",")[1]])
    out = tmp_path / "mixed"
    codes = finish(start(out, 2, own={1: {"epochs": 4, "data": mixed}}, data=data))
    assert codes == [1, 1], logs(out)  # dist_job lets the error out (the command line exits 2)
    for i in (0, 1):
        text = (out / f"log-{i}").read_text()
        assert "sees other data or settings" in text and "epochs 4 there, 2 here" in text or \
            "epochs 2 there, 4 here" in text, text
        assert "contents" in text and "part-0.h5:" in text, text
    assert not (out / "weights-0.npz").exists() and len(rows(out, 0)) == 0
    assert not (out / "run" / "history.jsonl").exists()  # nothing written: the corrected run starts afresh


def test_processes_with_other_numbers_of_devices_are_told_so(data, tmp_path):
    """JAX's collectives over processes need as many local devices on each: it failed
    with a bare AssertionError in Keras' seed agreement."""
    out = tmp_path / "devices"
    assert finish(start(out, 2, own={1: {"devices": 2}}, data=data)) == [1, 1], logs(out)
    for i in (0, 1):
        assert "the processes have different numbers of local devices (process 0: 1, process 1: 2)" in \
            (out / f"log-{i}").read_text(), logs(out)


def test_a_killed_process_ends_the_other_and_the_run_resumes(data, two, tmp_path):
    """SIGKILL of process 1 mid-epoch: process 0 writes the end record naming it and
    exits non-zero within a minute; both resume at the exact next batch and end with the
    weights of a run never killed."""
    out = tmp_path / "killed"
    codes = finish(start(out, 2, data=data, every=2, kill="1:1:3", val=1))
    ended = time.time()
    assert codes[1] == -signal.SIGKILL and codes[0] == 1, logs(out)
    assert ended - float((out / "killed-at").read_text()) < 60
    h = pipetrain.read_history(out / "run")
    assert h.end["status"] == "failed" and "lost process 1" in h.end["error"], h.end
    assert h.end["checkpoint"].endswith("ckpt-000000000010.npz")  # epoch 1, batch 2

    assert finish(start(out, 2, data=data, every=2, resume=1, val=1)) == [0, 0], logs(out)
    resumed = rows(out, 0)
    assert resumed[0].tolist()[:2] == [1, 2]
    h = pipetrain.read_history(out / "run")
    assert len(h.runs) == 2 and h.end["status"] == "completed"
    assert_same_training(two, out)


def distributed_history(path: Path) -> Path:
    """A history as a two-process run writes it: process 1 waits for data."""
    t = 1000.0
    records = [{"type": "run", "run": "r", "t": t, "schema": 1, "data": {"rows": 64, "batch_size": 32,
                "steps_per_epoch": 2, "epochs": 1}, "model": {"name": "m", "params": 1},
                "distributed": {"processes": 2, "devices": 2, "hosts": [
                    {"process": 0, "hostname": "alpha", "pid": 1, "devices": ["cpu:0"]},
                    {"process": 1, "hostname": "beta", "pid": 2, "devices": ["cpu:1"]}]}}]
    for i in range(4):
        for process, bound in ((0, 1.0), (1, 40.0 + i)):
            records.append({"type": "system", "run": "r", "t": t + i, "process": process, "host": "x",
                            "rss_mb": 500.0 + 100 * process, "cpu_pct": 50.0, "sys_available_mb": 9000.0,
                            "threads": 9, "wait_s": bound / 100, "batches": 1, "input_bound_pct": bound})
    for b in range(2):
        records.append({"type": "batch", "run": "r", "t": t + 1 + b, "epoch": 0, "batch": b, "step": b,
                        "size": 32, "loss": 1.0, "step_s": 0.5, "wait_s": 0.01, "samples_per_s": 64.0})
    records.append({"type": "epoch", "run": "r", "t": t + 4, "epoch": 0, "loss": 1.0, "samples": 64,
                    "batches": 2, "time_s": 2.0, "samples_per_s": 32.0, "wait_s": 0.86, "input_bound_pct": 43.0,
                    "processes": [{"process": 0, "wait_s": 0.04}, {"process": 1, "wait_s": 0.86}]})
    records.append({"type": "end", "run": "r", "t": t + 5, "status": "completed", "epochs": 1, "steps": 2})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_tail_names_the_process_that_waits_most(tmp_path):
    from rich.console import Console

    from pipetrain.progress import RunState
    from pipetrain.tail import resources

    state = RunState().extend(pipetrain.follow(distributed_history(tmp_path / "h.jsonl"), timeout=0))
    console = Console(width=140, record=True)
    console.print(resources(state))
    text = console.export_text()
    assert "2 processes · most input-bound: process 1 (beta) 43.0%" in text
    assert "largest RSS: process 1 (beta) 600.0 MB" in text
    assert "RSS 500 MB" in text  # memory and CPU lines stay process 0's


def test_plot_draws_a_line_per_process(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from pipetrain.plot import TIME_PANELS, draw, load

    figure = draw(load([distributed_history(tmp_path / "h.jsonl")]), Figure)
    titles = {ax.get_title(loc="left"): ax for ax in figure.axes}
    for panel in ("input_bound", "rss_mb"):
        ax = titles[TIME_PANELS[panel][0]]
        labels = [t.get_text() for t in ax.texts]
        assert labels == ["process 0", "process 1"], (panel, labels)


@pytest.mark.skipif(os.environ.get("KERAS_BACKEND", "tensorflow") == "jax",
                    reason="on JAX a Keras distribution is what a distributed run uses")
def test_a_keras_distribution_off_jax_is_refused_by_run(classification_files):
    import keras

    from pipetrain.distributed import DistributedError

    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=keras.distribution.list_devices()[:1]))
    try:
        with pytest.raises(DistributedError, match="needs KERAS_BACKEND=jax"):
            pipetrain.Run(pipetrain.H5Source(classification_files, x="x", y="y"), batch_size=8)
    finally:
        keras.distribution.set_distribution(None)


def test_a_second_ctrl_c_while_process_0_waits_for_the_others_cuts_the_wait_only():
    """After a stop every process agreed on, process 0 waits briefly for the others' last
    system samples, then writes the end record: a second Ctrl-C in that wait went out of
    it, past the end record (the run's history had none)."""
    from types import SimpleNamespace

    from pipetrain import distributed

    class Channel:  # the coordination service, as a second Ctrl-C finds it mid-wait
        said: list = []

        def set(self, key, value, overwrite=False):
            self.said.append(key)

        def items(self, prefix):
            raise KeyboardInterrupt

    cluster = SimpleNamespace(share=None, is_writer=True, count=2, index=0, channel=Channel(), runs=0,
                              ended_together=False)
    link = distributed.RunLink(cluster, run=None)
    link.stopped_together = True
    try:
        link.finish("interrupted")  # returns: the run writes its end record next
    except KeyboardInterrupt:  # (not left to pytest, which would take it for the user's and stop)
        pytest.fail("the second Ctrl-C went out of the wait, past the end record")
    assert cluster.channel.said == ["run/1/done/0"]


def test_the_guardian_writes_the_end_of_a_killed_writer(tmp_path):
    """Process 0 killed: JAX aborts the other processes at once, so the guardian process 0
    started writes the end record when process 0's pipe closes; after an end record, it
    adds nothing."""
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "ckpt-000000000003.npz").write_bytes(b"")
    records = [{"type": "run", "run": "r1", "t": 1.0}, {"type": "batch", "run": "r1", "t": 2.0, "epoch": 0,
               "batch": 0, "step": 3}, {"type": "epoch", "run": "r1", "t": 3.0, "epoch": 0, "complete": True}]
    history = run / "history.jsonl"
    history.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"type": "batch", "ru')  # torn: killed mid-write

    def guard(run_id="r1"):
        p = subprocess.Popen([sys.executable, "-m", "pipetrain.guardian", str(history), run_id, "process 0 (host h, pid 7)"],
                             stdin=subprocess.PIPE, env=env())
        p.stdin.close()  # what process 0's death does
        assert p.wait(60) == 0

    guard()
    h = pipetrain.read_history(history)
    assert h.skipped == 0  # the torn line was cut
    assert h.end["status"] == "failed" and h.end["error"].startswith("lost process 0 (host h, pid 7)")
    assert (h.end["steps"], h.end["epochs"]) == (4, 1) and h.end["checkpoint"].endswith("ckpt-000000000003.npz")
    size = history.stat().st_size
    guard()
    assert history.stat().st_size == size  # the run has its end record: nothing more
    guard("r2")
    assert history.stat().st_size == size  # a run that wrote nothing (it ended before its run record) has no end


def test_the_guardian_counts_the_epochs_of_a_run_whose_epoch_outgrew_its_tail(tmp_path):
    """The guardian reads the history's last megabyte: in an epoch of more batches than
    that holds, it found no epoch record and wrote 'epochs': null."""
    from pipetrain.guardian import TAIL_BYTES, end_record

    history = tmp_path / "history.jsonl"
    lines = [{"type": "run", "run": "r1", "t": 1.0}, {"type": "epoch", "run": "r1", "t": 2.0, "epoch": 0},
             {"type": "epoch", "run": "r1", "t": 3.0, "epoch": 1}]
    batch = {"type": "batch", "run": "r1", "t": 4.0, "epoch": 2, "batch": 0, "step": 0, "size": 32, "loss": 0.5}
    count = TAIL_BYTES // len(json.dumps(batch)) + 100
    lines += [dict(batch, batch=i, step=20000 + i) for i in range(count)]
    history.write_text("".join(json.dumps(r) + "\n" for r in lines))
    record = end_record(history, "r1", "process 0")
    assert (record["epochs"], record["steps"]) == (2, 20000 + count)


TWO_DEVICES_TRAIN = """
import keras, pipetrain, pipetrain.distributed
pipetrain.distributed.initialize(devices="all")
model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(3, activation="softmax")])
model.compile("sgd", "sparse_categorical_crossentropy")
source = pipetrain.H5Source({files}, x="x", y="y")
try:
    pipetrain.train(model, source, epochs=1, batch_size=32, validation=source, validation_batch_size=3,
                    history="run/history.jsonl", verbose=0)
except pipetrain.errors.InputError as e:
    print("refused:", e)
"""


def test_a_validation_batch_size_that_does_not_split_over_the_devices_is_refused_before_training(data, tmp_path):
    """It was refused at the first validation, after the first epoch had trained."""
    done = subprocess.run([sys.executable, "-c", TWO_DEVICES_TRAIN.format(files=data.split(","))], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env=env(XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == (
        "refused: validation: batch_size=3 must be a multiple of the run's 2 devices (1 process(es) x 2): "
        "each takes an equal share")
    assert not (tmp_path / "run").exists()
