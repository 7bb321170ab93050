"""The JSON Lines history: whole lines, strict JSON, a torn last line skipped, one
continuous history across a resumed run, and a follower that never yields half a line."""

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from pipetrain.history import HistoryWriter, follow, read_history


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


def test_records_are_visible_at_once_without_close(tmp_path):
    path = tmp_path / "h.jsonl"
    w = HistoryWriter(path)
    w.write({"type": "run", "run": "r", "t": 0})
    assert read_history(path).runs[0]["run"] == "r"  # flushed: no buffer to wait for
    w.close()


def test_a_torn_last_line_is_skipped_and_ended_before_appending(tmp_path):
    path = tmp_path / "h.jsonl"
    path.write_bytes(b'{"type":"run","run":"r","t":0}\n{"type":"batch","run":"r","t":1,"epoch":0,"bat')
    h = read_history(path)
    assert len(h.runs) == 1 and h.batches == [] and h.skipped == 1
    with HistoryWriter(path) as w:  # a resumed run appends after the torn line
        w.write({"type": "end", "run": "r", "t": 2, "status": "completed"})
    h = read_history(path)
    assert h.end["status"] == "completed" and h.skipped == 1
    assert lines(path)[-1] == '{"type":"end","run":"r","t":2,"status":"completed"}'


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
