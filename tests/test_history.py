"""The JSON Lines history: whole lines, strict JSON, a torn last line skipped, one
continuous history across a resumed run, and a follower that never yields half a line."""

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from pipetrain.history import HistoryWriter, follow, read_history, run_records


def lines(path):
    return path.read_bytes().decode().splitlines()


def test_each_record_is_one_line_of_strict_json(tmp_path):
    path = tmp_path / "h.jsonl"
    with HistoryWriter(path) as w:
        w.write({"type": "batch", "run": "r", "t": 1.5, "loss": float("nan"), "acc": np.float32(0.5),
                 "n": np.int64(3), "big": float("inf"), "v": np.arange(3)})
        w.write({"type": "end", "run": "r", "t": 2.0, "status": "completed"})
    text = lines(path)
    assert len(text) == 2
    first = json.loads(text[0], parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert first == {"type": "batch", "run": "r", "t": 1.5, "loss": None, "acc": 0.5, "n": 3, "big": None, "v": [0, 1, 2]}


def test_a_record_reads_back_as_jsonable_makes_it_whatever_its_values(tmp_path):
    """The fast encoder (orjson) and the general one (json of jsonable) write the same values:
    a record orjson refuses goes the general way, one it takes reads back as jsonable's."""
    import datetime
    import enum
    from pathlib import PurePosixPath

    from pipetrain.history import encode, jsonable

    class Colour(enum.Enum):
        RED = "red"

    class Name(str):
        pass

    plain = {"type": "batch", "run": "r", "t": 1764085960.020295, "epoch": 0, "loss": 2.2784635016542927,
             "wait_s": 2.8e-05, "tiny": 5e-324, "huge": 1.7976931348623157e308, "zero": -0.0, "n": 2**63 - 1,
             "none": None, "ok": True, "list": [1, 2.5, "x"], "pair": (1, 2), "nested": {"a": [{"b": 1e16}]},
             "nan": float("nan"), "inf": float("-inf"), "text": "é ü 漢", "colour": Colour.RED}
    odd = [("numpy", np.float32(0.5)), ("numpy int", np.int64(3)), ("path", PurePosixPath("/a/b")),
           ("beyond 64 bits", 2**70), ("int key", {1: 2}), ("surrogate", "\udc80"), ("str subclass", Name("x")),
           ("datetime", datetime.datetime(2026, 11, 30, 12, 0)), ("array", np.arange(3))]
    for record in [plain] + [{**plain, name: value} for name, value in odd]:
        line = encode(record)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        strict = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
        assert strict == json.loads(json.dumps(jsonable(record))), record
        assert math.copysign(1, strict["zero"]) == -1


def test_records_are_visible_at_once_without_close(tmp_path):
    path = tmp_path / "h.jsonl"
    w = HistoryWriter(path)
    w.write({"type": "run", "run": "r", "t": 0})
    assert read_history(path).runs[0]["run"] == "r"  # flushed: no buffer to wait for
    w.close()


def test_a_torn_last_line_is_skipped_and_cut_before_appending(tmp_path):
    path = tmp_path / "h.jsonl"
    path.write_bytes(b'{"type":"run","run":"r","t":0}\n{"type":"batch","run":"r","t":1,"epoch":0,"bat')
    h = read_history(path)
    assert len(h.runs) == 1 and h.batches == [] and h.skipped == 1
    with HistoryWriter(path) as w:  # a resumed run cuts the torn fragment, then appends
        w.write({"type": "end", "run": "r", "t": 2, "status": "completed"})
    assert lines(path) == ['{"type":"run","run":"r","t":0}', '{"type":"end","run":"r","t":2,"status":"completed"}']
    h = read_history(path)
    assert h.end["status"] == "completed" and h.skipped == 0  # strict JSON Lines again


def test_a_whole_last_record_without_its_newline_is_kept_when_appending(tmp_path):
    path = tmp_path / "h.jsonl"
    path.write_bytes(b'{"type":"run","run":"r","t":0}\n{"type":"batch","run":"r","t":1,"epoch":0,"batch":0}')
    assert len(read_history(path).batches) == 1
    with HistoryWriter(path) as w:
        w.write({"type": "end", "run": "r", "t": 2, "status": "completed"})
    assert lines(path)[1:] == ['{"type":"batch","run":"r","t":1,"epoch":0,"batch":0}',
                               '{"type":"end","run":"r","t":2,"status":"completed"}']


def test_a_resumed_run_reads_as_one_continuous_history(tmp_path):
    path = tmp_path / "h.jsonl"
    with HistoryWriter(path) as w:
        w.write({"type": "run", "run": "r", "t": 0, "resume": None})
        for e, n in [(0, 3), (1, 2)]:
            for b in range(n):
                w.write({"type": "batch", "run": "r", "t": 1, "epoch": e, "batch": b, "loss": 1.0})
        w.write({"type": "epoch", "run": "r", "t": 1, "epoch": 0, "loss": 1.0})
        w.write({"type": "end", "run": "r", "t": 2, "status": "interrupted"})
        # The checkpoint was at epoch 1, batch 1: batch (1, 1) is trained again.
        w.write({"type": "run", "run": "r", "t": 3, "resume": {"epoch": 1, "batch": 1}})
        for b in (1, 2):
            w.write({"type": "batch", "run": "r", "t": 4, "epoch": 1, "batch": b, "loss": 0.5})
        w.write({"type": "epoch", "run": "r", "t": 4, "epoch": 1, "loss": 0.7})
    h = read_history(path)
    assert [(b["epoch"], b["batch"]) for b in h.batches] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert [b["loss"] for b in h.batches][-2:] == [0.5, 0.5]
    assert [e["epoch"] for e in h.epochs] == [0, 1]
    assert h.end is None  # the resumed segment is still running
    assert len(h.runs) == 2


def test_follow_yields_whole_records_as_another_process_writes(tmp_path):
    path = tmp_path / "live.jsonl"
    writer = textwrap.dedent(f"""
        import os, time, json
        time.sleep(0.3)  # the follower starts before the file exists
        fd = os.open({str(path)!r}, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        for i in range(200):
            line = (json.dumps({{"type": "batch", "run": "r", "t": i, "batch": i, "pad": "x" * (i % 50)}}) + "\\n").encode()
            # write each line in two pieces, so readers see half lines
            os.write(fd, line[:7]); time.sleep(0.001); os.write(fd, line[7:])
        os.write(fd, b'{{"type":"end","run":"r","t":1,"status":"completed"}}\\n')
    """)
    proc = subprocess.Popen([sys.executable, "-c", writer])
    try:
        records = list(follow(path, poll=0.01, timeout=20))
    finally:
        proc.wait(10)
    assert [r["batch"] for r in records[:-1]] == list(range(200))
    assert records[-1]["type"] == "end"


def test_follow_starts_over_after_truncation_and_replacement(tmp_path):
    path = tmp_path / "h.jsonl"
    path.write_text('{"type":"batch","run":"a","t":0,"batch":0}\n')
    stream = follow(path, poll=0.01, timeout=2)
    assert next(stream)["run"] == "a"
    path.write_text("")  # truncated...
    path.write_text('{"type":"batch","run":"b","t":0,"batch":0}\n')  # ...and rewritten
    assert next(stream)["run"] == "b"
    replacement = tmp_path / "new.jsonl"
    replacement.write_text('{"type":"batch","run":"c","t":0,"batch":0}\n{"type":"end","run":"c","t":1}\n')
    os.replace(replacement, path)  # a new inode
    assert [r["run"] for r in stream] == ["c", "c"]


def test_non_finite_numbers_never_reach_the_file(tmp_path):
    path = tmp_path / "h.jsonl"
    with HistoryWriter(path) as w:
        w.write({"type": "epoch", "run": "r", "t": 0, "loss": -math.inf, "nested": {"x": math.nan}})
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()


def test_an_unwritable_history_is_a_clear_error(tmp_path):
    from pipetrain.history import HistoryWriteError

    (tmp_path / "file").write_text("")
    with pytest.raises(HistoryWriteError, match="cannot write the history"):
        HistoryWriter(tmp_path / "file" / "h.jsonl")


# -- a known history, shared by the tail and plot tests ----------------------------------------

def known_records(epochs_done=2, batches_in_last=0, end="completed", run_id="r1", t0=1000.0):
    """A small, exact history: 3 epochs of 10 batches planned (95 rows, batch 10), with
    ``epochs_done`` finished, then ``batches_in_last`` batches of the next, then an end
    record when ``end`` is given."""
    t = t0
    records = [{
        "type": "run", "run": run_id, "t": t, "schema": 1, "started": "2025-01-01T12:00:00+00:00",
        "config": {"epochs": 3, "batch_size": 10, "workers": 2, "max_queue": 8,
                   "validation": ["/d/val.h5"], "model": "default", "argv": ["train"]},
        "model": {"name": "mlp", "params": 1234},
        "data": {"files": ["/d/train.h5"], "rows": 95, "batch_size": 10, "steps_per_epoch": 10,
                 "shuffle": "block", "seed": 0, "epochs": 3},
        "host": {"hostname": "box", "cpus": 2, "memory_mb": 8000, "python": "3.11.7", "keras": "3.15.1",
                 "backend": "tensorflow", "backend_version": "2.21.0", "h5py": "3.14.0"},
        "resume": None,
    }, {"type": "system", "run": run_id, "t": t, "rss_mb": 500.0, "cpu_pct": 0.0,
        "sys_available_mb": 8000.0, "threads": 8}]

    def batches(epoch, count):
        nonlocal t
        for b in range(count):
            t += 0.0125
            size = 5 if b == 9 else 10
            loss = round(2.0 / (1 + epoch * 10 + b), 4)
            records.append({"type": "batch", "run": run_id, "t": round(t, 4), "epoch": epoch, "batch": b,
                            "step": epoch * 10 + b, "size": size, "accuracy": 0.5, "loss": loss,
                            "step_s": 0.01, "wait_s": 0.0025, "samples_per_s": 800.0})

    for epoch in range(epochs_done):
        batches(epoch, 10)
        t += 0.5
        records.append({"type": "epoch", "run": run_id, "t": round(t, 4), "epoch": epoch,
                        "loss": round(0.5 / (epoch + 1), 4), "accuracy": 0.8 + epoch / 10,
                        "val_loss": round(0.6 / (epoch + 1), 4), "val_accuracy": 0.75 + epoch / 10,
                        "samples": 95, "batches": 10, "time_s": 0.125, "samples_per_s": 760.0,
                        "wait_s": 0.025, "input_bound_pct": 20.0, "read_mb": 0.1, "read_mb_s": 50.0,
                        "disk_mb": 0.05, "val_time_s": 0.5, "complete": True})
        records.append({"type": "system", "run": run_id, "t": round(t, 4), "rss_mb": 520.0 + 10 * epoch,
                        "cpu_pct": 150.0, "sys_available_mb": 7900.0, "threads": 9})
    batches(epochs_done, batches_in_last)
    if end:
        records.append({"type": "end", "run": run_id, "t": round(t + 0.1, 4), "status": end,
                        "epochs": epochs_done, "steps": epochs_done * 10 + batches_in_last,
                        "error": None, "peak_rss_mb": 560.0})
    return records


def write_records(path, records, tail=b""):
    """The records as history lines (the writer's own encoding), then ``tail`` bytes."""
    from pipetrain.history import encode

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(encode(r) for r in records) + tail)
    return path


def resumed_records():
    """Killed in epoch 2 at batch 6 with a checkpoint at (1, 4): epoch 1's record and
    batches (1, 4)... are trained again by the resumed segment."""
    first = known_records(epochs_done=2, batches_in_last=6, end="interrupted")
    second = known_records(epochs_done=3, end="completed", t0=5000.0)
    run = dict(second[0], resume={"epoch": 1, "batch": 4})
    again = [r for r in second[1:] if r["type"] in ("system", "end")
             or (r["type"] == "epoch" and r["epoch"] >= 1)
             or (r["type"] == "batch" and (r["epoch"], r["batch"]) >= (1, 4))]
    return first + [run] + again


# -- reading ------------------------------------------------------------------------------------

def test_superseded_records_are_the_ones_trained_again():
    from pipetrain.history import superseded

    at = (1, 4)
    assert not superseded({"type": "batch", "epoch": 1, "batch": 3}, at)
    assert superseded({"type": "batch", "epoch": 1, "batch": 4}, at)
    assert superseded({"type": "batch", "epoch": 2, "batch": 0}, at)
    assert not superseded({"type": "epoch", "epoch": 0}, at)
    assert superseded({"type": "epoch", "epoch": 1}, at)
    assert not superseded({"type": "system", "epoch": 5}, at)


def test_a_resumed_history_keeps_each_batch_and_epoch_once(tmp_path):
    path = write_records(tmp_path / "h.jsonl", resumed_records())
    h = read_history(path)
    positions = [(b["epoch"], b["batch"]) for b in h.batches]
    assert positions == [(e, b) for e in range(3) for b in range(10)]
    assert [b["t"] >= 5000 for b in h.batches] == [(e, b) >= (1, 4) for e in range(3) for b in range(10)]
    assert [e["epoch"] for e in h.epochs] == [0, 1, 2] and h.epochs[0]["t"] < 5000 < h.epochs[1]["t"]
    assert h.end["status"] == "completed" and len(h.runs) == 2
    assert len(h.system) == 3 + 4  # measurements are kept from both segments


def test_a_run_folder_names_its_history(tmp_path):
    from pipetrain.history import history_file

    path = write_records(tmp_path / "exp1" / "history.jsonl", known_records())
    assert history_file(tmp_path / "exp1") == path
    assert history_file(tmp_path / "later") == tmp_path / "later" / "history.jsonl"
    assert history_file(tmp_path / "later.jsonl") == tmp_path / "later.jsonl"
    assert len(read_history(tmp_path / "exp1").epochs) == 2


def test_to_pandas_gives_the_epoch_batch_and_system_tables(tmp_path):
    pytest.importorskip("pandas")
    tables = read_history(write_records(tmp_path / "h.jsonl", resumed_records())).to_pandas()
    assert tables["epochs"].epoch.tolist() == [0, 1, 2]
    assert len(tables["batches"]) == 30 and tables["batches"].loss.notna().all()
    assert tables["system"].rss_mb.tolist() == [500.0, 520.0, 530.0, 500.0, 520.0, 530.0, 540.0]


def test_pandas_and_jq_read_the_file_as_it_is(tmp_path):
    pd = pytest.importorskip("pandas")
    records = known_records()
    path = write_records(tmp_path / "h.jsonl", records)
    frame = pd.read_json(path, lines=True)
    assert frame.type.tolist() == [r["type"] for r in records]
    epochs = frame[frame.type == "epoch"]
    assert epochs.val_loss.tolist() == pytest.approx([r["val_loss"] for r in records if r["type"] == "epoch"])

    jq = shutil.which("jq")
    if jq is None:
        pytest.skip("jq is not installed")
    out = subprocess.run([jq, "-c", "."], stdin=path.open("rb"), capture_output=True, check=True).stdout
    assert [json.loads(line) for line in out.splitlines()] == records
    query = 'select(.type == "epoch") | {epoch, loss, val_accuracy, samples_per_s, input_bound_pct}'
    out = subprocess.run([jq, "-c", query, str(path)], capture_output=True, check=True, text=True).stdout
    assert json.loads(out.splitlines()[-1]) == {"epoch": 1, "loss": 0.25, "val_accuracy": 0.85,
                                                "samples_per_s": 760.0, "input_bound_pct": 20.0}


# -- following -----------------------------------------------------------------------------------

def test_follower_reads_complete_lines_only_across_reads(tmp_path):
    from pipetrain.history import Follower

    path = tmp_path / "h.jsonl"
    line = b'{"type":"batch","run":"r","t":1,"batch":0}\n'
    with Follower(path, chunk_bytes=16) as follower:
        assert follower.read() == [] and not follower.exists  # not there yet
        path.write_bytes(line[:20])
        assert follower.read() == []  # half a line: nothing yet
        with path.open("ab") as f:
            f.write(line[20:] + line)
        got = []
        while not follower.at_eof or not got:  # small chunks: several reads
            got += follower.read()
        assert [raw for raw, _ in got] == [line, line]
        assert got[0][1] == {"type": "batch", "run": "r", "t": 1, "batch": 0}


def test_follower_notices_a_rewrite_that_grew_past_the_old_end(tmp_path):
    from pipetrain.history import Follower

    path = tmp_path / "h.jsonl"
    write_records(path, known_records(epochs_done=0, batches_in_last=2, run_id="old", end=None))
    with Follower(path) as follower:
        assert {r["run"] for _, r in follower.read()} == {"old"}
        # --overwrite style rewrite in place, longer than before, between two reads
        write_records(path, known_records(epochs_done=1, run_id="new"))
        records = [r for _, r in follower.read()]
    assert follower.restarts == 1
    assert records == known_records(epochs_done=1, run_id="new")


def test_follow_goes_on_after_an_end_that_a_resumed_run_follows(tmp_path):
    path = write_records(tmp_path / "h.jsonl", resumed_records())
    records = list(follow(path, poll=0.01, timeout=5))
    assert records == resumed_records()  # did not stop at the first segment's end


def test_follow_returns_at_once_on_a_finished_history_and_waits_on_a_running_one(tmp_path):
    path = write_records(tmp_path / "h.jsonl", known_records(end=None))
    start = time.monotonic()
    assert len(list(follow(path, poll=0.01, timeout=0.3))) == len(known_records(end=None))
    assert time.monotonic() - start >= 0.3  # no end record: waited for more
    path = write_records(tmp_path / "done.jsonl", known_records())
    start = time.monotonic()
    assert list(follow(path, poll=0.01, timeout=30)) == known_records()
    assert time.monotonic() - start < 5


def test_records_that_break_the_schema_are_skipped_like_torn_lines(tmp_path):
    """A file edited by hand or by another tool: records whose positions, counts or
    times are not numbers would crash every reader; they are skipped and counted."""
    good = [
        {"type": "run", "run": "r", "t": 1.0, "data": {"rows": 10, "steps_per_epoch": 2}, "resume": None},
        {"type": "batch", "run": "r", "t": 2.0, "epoch": 0, "batch": 0, "loss": 0.5, "gpu_mb": {"current": 1.0}},
        {"type": "epoch", "run": "r", "t": 3.0, "epoch": 0, "loss": 0.5, "f1": [0.1, 0.2], "complete": True},
        {"type": "end", "run": "r", "t": 4.0, "status": "completed", "epochs": 1, "steps": 2, "error": None},
    ]
    bad = [
        {"type": "run", "run": "r", "t": 1.5, "data": {"rows": "abc"}},
        {"type": "run", "run": "r", "t": 1.6, "resume": {"epoch": "a"}},
        {"type": "run", "run": "r"},  # no time
        {"type": "batch", "run": "r", "t": 2.5, "epoch": "a", "batch": 1},
        {"type": "epoch", "run": "r", "t": True, "epoch": 0},
        {"type": "end", "run": "r", "t": 4.5, "epochs": "one"},
    ]
    path = tmp_path / "h.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good[:1] + bad + good[1:]))
    h = read_history(path)
    assert h.runs == good[:1] and h.batches == good[1:2] and h.epochs == good[2:3] and h.end == good[3]
    assert h.skipped == len(bad)


def test_run_records_are_those_read_history_finds(tmp_path):
    path = tmp_path / "h.jsonl"
    write_records(path, resumed_records())
    assert len(run_records(path)) == 2 and run_records(path) == read_history(path).runs
    # Written by another tool, keys in another order: read whole, the same records.
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(dict(reversed(list(r.items())))) + "\n" for r in resumed_records()))
    assert run_records(other) == read_history(other).runs and len(run_records(other)) == 2
