"""make-data writes a learnable file of any size in constant memory; inspect shows the
datasets and the read path pipetrain will use."""

import os
import re
import stat

import h5py
import numpy as np
import pytest

from pipetrain.cli import main
from pipetrain.synth import DataSpecError, make_data, parse_shape


def test_make_data_is_deterministic_blockwise_and_learnable(tmp_path):
    a = make_data(tmp_path / "a.h5", rows=20_000, features=(6, 4), classes=3, seed=1, chunk_rows=100)
    b = make_data(tmp_path / "b.h5", rows=20_000, features=(6, 4), classes=3, seed=1, chunk_rows=100)
    with h5py.File(a) as fa, h5py.File(b) as fb:
        assert fa["x"].shape == (20_000, 6, 4) and fa["x"].chunks == (100, 6, 4) and fa["x"].compression == "gzip"
        np.testing.assert_array_equal(fa["x"][...], fb["x"][...])
        x, y = fa["x"][...].reshape(20_000, -1), fa["y"][...]
    assert set(np.unique(y)) == {0, 1, 2}
    # Learnable: nearest class mean, fitted on half, beats chance by far on the other half.
    means = np.stack([x[:10_000][y[:10_000] == c].mean(axis=0) for c in range(3)])
    guess = np.argmin(((x[10_000:, None, :] - means) ** 2).sum(axis=2), axis=1)
    assert (guess == y[10_000:]).mean() > 0.6


def test_make_data_command_and_its_errors(tmp_path, capsys):
    out = tmp_path / "img.h5"
    assert main(["make-data", str(out), "--rows", "300", "--features", "8x8x3", "--dtype", "uint8",
                 "--compression", "lzf", "--shuffle-filter", "--chunk-rows", "64"]) == 0
    with h5py.File(out) as f:
        assert f["x"].dtype == np.uint8 and f["x"].shape == (300, 8, 8, 3)
        assert f["x"].compression == "lzf" and f["x"].shuffle
    assert main(["make-data", str(out), "--rows", "10"]) == 2
    assert "exists already; pass --overwrite" in capsys.readouterr().err
    assert main(["make-data", str(tmp_path / "n.h5"), "--rows", "10", "--features", "8xq"]) == 2
    assert "--features '8xq'" in capsys.readouterr().err
    assert main(["make-data", str(tmp_path / "n.h5"), "--rows", "10", "--compression", "rar"]) == 2
    assert "--compression 'rar'" in capsys.readouterr().err
    for bad in ("gzip:99", "gzip:x", "zstd:0", "lz4:3"):
        assert main(["make-data", str(tmp_path / "n.h5"), "--rows", "10", "--compression", bad]) == 2
        assert f"--compression '{bad}'" in capsys.readouterr().err
    assert not (tmp_path / "n.h5").exists()  # nothing left behind
    # --overwrite with bad settings, or interrupted, keeps the file that was there.
    before = out.read_bytes()
    assert main(["make-data", str(out), "--rows", "10", "--compression", "gzip:99", "--overwrite"]) == 2
    assert out.read_bytes() == before
    with pytest.raises(KeyboardInterrupt):
        make_data(out, rows=20_000, features=(4,), progress=lambda done, total: (_ for _ in ()).throw(KeyboardInterrupt))
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.h5"]  # no partial file either


def test_make_data_refuses_what_memory_cannot_hold_and_names_that_are_not_datasets(tmp_path, capsys):
    for args, message in [(["--features", "100000x100000"], "GiB of memory to write"),
                          (["--classes", "1000000000"], "--classes 1000000000 with --features of 784 values a row"),
                          (["--x-name", "/"], "--x-name '/' --y-name 'y': two different, non-empty dataset names"),
                          (["--x-name", "/y"], "two different, non-empty dataset names"),
                          # HDF5 reads "." as the group itself, and cannot nest a dataset in one:
                          # these failed while writing (exit 1, "make-data failed: ... already exists")
                          (["--x-name", "."], "--x-name '.' --y-name 'y': two different, non-empty dataset names"),
                          (["--x-name", "y/./."], "two different, non-empty dataset names"),
                          (["--x-name", "a", "--y-name", "a/b"], "--x-name 'a' --y-name 'a/b': neither can hold"),
                          (["--x-name", "a/b", "--y-name", "a"], "neither can hold the other"),
                          (["--features", "x".join(["1"] * 32)], "at most 31 dimensions")]:
        assert main(["make-data", str(tmp_path / "n.h5"), "--rows", "10", *args]) == 2, args
        assert message in capsys.readouterr().err, args
    assert list(tmp_path.iterdir()) == []


def test_make_data_overwrite_replaces_only_an_hdf5_file(tmp_path, capsys):
    """`make-data train.py --rows 10 --overwrite` (a name completed wrongly) replaced the
    script, `make-data runs/a/history.jsonl --overwrite` a run's history, with HDF5, and
    as root `make-data /dev/null --overwrite` replaced the device with a file."""
    script = tmp_path / "train.py"
    script.write_text("print('mine')\n")
    history = tmp_path / "history.jsonl"
    history.write_text('{"type":"run","run":"a","t":0}\n')
    device = tmp_path / "null"  # /dev/null's node: the file written was renamed over it
    if os.geteuid() == 0:
        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    for path, what in [(script, "a file with no run record at its start"), (history, "a pipetrain history"),
                       *([(device, "a character device")] if device.exists() else [])]:
        assert main(["make-data", str(path), "--rows", "10", "--overwrite"]) == 2
        assert capsys.readouterr().err.strip() == (f"pipetrain: {path}: is {what}, not an HDF5 file; --overwrite "
                                                   "replaces only an HDF5 file")
    assert script.read_text() == "print('mine')\n" and history.read_text() == '{"type":"run","run":"a","t":0}\n'
    out = tmp_path / "d.h5"
    assert main(["make-data", str(out), "--rows", "10", "--quiet"]) == 0
    assert main(["make-data", str(out), "--rows", "20", "--overwrite", "--quiet"]) == 0
    with h5py.File(out) as f:
        assert f["x"].shape[0] == 20


def test_make_data_stopped_by_sigterm_leaves_no_partial_file(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    job = subprocess.Popen([sys.executable, "-m", "pipetrain", "make-data", str(tmp_path / "big.h5"), "--rows",
                            "100000000000", "--features", "8", "--quiet"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".big.h5.partial-*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(tmp_path.glob(".big.h5.partial-*")), "make-data never began writing"
        job.send_signal(signal.SIGTERM)
        assert job.wait(timeout=60) == 130
    finally:
        job.kill()
    assert list(tmp_path.iterdir()) == [] and job.stderr.read().strip() == "pipetrain: terminated (SIGTERM)"


def nearest_mean_accuracy(train, test, x="x", y="y") -> float:
    """A nearest-class-mean classifier fitted on ``train``, scored on ``test``."""
    with h5py.File(train) as a, h5py.File(test) as b:
        xa, ya = a[x][...].reshape(len(a[y]), -1), a[y][...]
        xb, yb = b[x][...].reshape(len(b[y]), -1), b[y][...]
    means = np.stack([xa[ya == c].mean(axis=0) for c in range(int(ya.max()) + 1)])
    return float((np.argmin(((xb[:, None, :] - means) ** 2).sum(axis=2), axis=1) == yb).mean())


def test_held_out_files_are_the_same_task_with_other_rows(tmp_path, capsys, monkeypatch):
    """--splits writes train/val/test of one task in one call (rows never repeated);
    --seed draws other rows of the same task, --task-seed another task."""
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)  # the progress line, as on a terminal
    common = ["--features", "32", "--classes", "4", "--chunk-rows", "64", "--x-name", "images", "--y-name", "labels"]
    assert main(["make-data", str(tmp_path / "d"), "--splits", "train=3000", "val=500", "test=500", *common]) == 0
    out = capsys.readouterr().out
    assert re.search(r"train\.h5  \d[\d,]*/4,000 rows  [\d,]+ rows/s  ETA \d+:\d\d:\d\d", out)  # rate and ETA
    assert "wrote " + str(tmp_path / "d" / "val.h5") + ": images (500, 32) float32, labels (500,) int64" in out
    d = tmp_path / "d"
    rows = []
    for name in ("train", "val", "test"):
        with h5py.File(d / f"{name}.h5") as f:
            assert set(f) == {"images", "labels"}
            rows += [r.tobytes() for r in f["images"][...]]
    assert len(set(rows)) == len(rows) == 4000  # no row in two files
    assert nearest_mean_accuracy(d / "train.h5", d / "val.h5", "images", "labels") > 0.6
    assert nearest_mean_accuracy(d / "train.h5", d / "test.h5", "images", "labels") > 0.6
    # The train split is the one-file call with the same seed; another seed, other rows of the task.
    assert main(["make-data", str(tmp_path / "same.h5"), "--rows", "3000", *common, "--quiet"]) == 0
    assert main(["make-data", str(tmp_path / "seed1.h5"), "--rows", "500", "--seed", "1", *common, "--quiet"]) == 0
    assert main(["make-data", str(tmp_path / "task1.h5"), "--rows", "500", "--task-seed", "1", *common, "--quiet"]) == 0
    with h5py.File(d / "train.h5") as a, h5py.File(tmp_path / "same.h5") as b, h5py.File(tmp_path / "seed1.h5") as c:
        np.testing.assert_array_equal(a["images"][...], b["images"][...])
        assert not set(rows) & {r.tobytes() for r in c["images"][...]}
    assert nearest_mean_accuracy(d / "train.h5", tmp_path / "seed1.h5", "images", "labels") > 0.6
    assert nearest_mean_accuracy(d / "train.h5", tmp_path / "task1.h5", "images", "labels") < 0.45  # chance is 0.25
    for bad, message in ((["--rows", "5", "--splits", "a=1"], "either --rows N"), (["--splits", "a=1", "a=2"], "named twice"),
                         (["--splits", "a=0"], "expected NAME=ROWS"), (["--rows", "5", "--x-name", "y"], "two different")):
        target = tmp_path / "bad" if "--splits" in bad else tmp_path / "bad.h5"
        assert main(["make-data", str(target), *bad]) == 2
        assert message in capsys.readouterr().err
    assert main(["make-data", str(d), "--splits", "val=10"]) == 2  # never over a file there
    assert "val.h5: exists already" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.h5").exists()


def test_parse_shape():
    assert parse_shape("784") == (784,) and parse_shape("28x28x1") == (28, 28, 1)
    with pytest.raises(DataSpecError):
        parse_shape("0x3")


def test_inspect_shows_layout_filters_and_read_path(tmp_path, capsys):
    path = tmp_path / "mixed.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("fast", data=np.zeros((100, 3), np.float32), chunks=(10, 3), compression="gzip", shuffle=True)
        f.create_dataset("checksummed", data=np.zeros((100, 3)), chunks=(10, 3), fletcher32=True)
        f["plain"] = np.zeros((10, 3))
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in out[2:]}
    assert "(10, 3)" in rows["fast"] and "shuffle+gzip(4)" in rows["fast"] and "raw chunks" in rows["fast"]
    assert "h5py read" in rows["checksummed"] and "fletcher32" in rows["checksummed"]
    assert "contiguous" in rows["plain"] and "h5py read" in rows["plain"]
    assert main(["inspect", str(tmp_path / "none.h5")]) == 2


def test_inspect_lists_datasets_reached_through_links_and_links_that_lead_nowhere(tmp_path):
    """Training reads through external and soft links: inspect lists those datasets, and
    a dangling link with why training refuses it, instead of "(no datasets)"."""
    from pipetrain.inspect import describe

    with h5py.File(tmp_path / "target.h5", "w") as f:
        f["x"], f["y"] = np.zeros((200, 8), np.float32), np.zeros(200, np.int64)
    with h5py.File(tmp_path / "links.h5", "w") as f:
        f["x"], f["y"] = h5py.ExternalLink("target.h5", "x"), h5py.ExternalLink("target.h5", "y")
        f["labels"] = h5py.SoftLink("/y")
        f["gone"] = h5py.ExternalLink("missing.h5", "x")
    rows = {row["dataset"]: row for row in describe(tmp_path / "links.h5")}
    assert sorted(rows) == ["gone", "labels", "x", "y"]
    assert rows["x"]["shape"] == "(200, 8)" and rows["labels"]["shape"] == "(200,)"
    assert not rows["x"]["read path"].startswith("refused") and rows["gone"]["read path"].startswith("refused")


def test_inspect_of_a_file_with_a_loop_of_soft_links_lists_it_and_the_rest(tmp_path, capsys):
    """Two soft links naming each other: h5py's open of one raises RuntimeError ("too many
    links"), and the whole inspect failed as "cannot be opened as HDF5 (truncated or
    corrupted?)", the file's good datasets unseen."""
    with h5py.File(tmp_path / "loop.h5", "w") as f:
        f["a"], f["b"] = h5py.SoftLink("/b"), h5py.SoftLink("/a")
        f["x"] = np.zeros((10, 2), np.float32)
    assert main(["inspect", str(tmp_path / "loop.h5")]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert sorted(lines) == ["a", "b", "x"]
    assert "refused: is a loop of soft links" in lines["a"] and "raw chunks" not in lines["a"]
    assert "(10, 2)" in lines["x"] and "refused" not in lines["x"]
