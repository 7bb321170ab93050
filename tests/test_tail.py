"""`pipetrain tail` and the console view of a run: the same state, lines and bar whether
drawn by the training process or by a watcher of its history; exact text for a known
history; raw lines exactly as written; a live watcher started before a real run exits 0
by itself when the run ends."""

import io
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from rich.console import Console

import pipetrain
from pipetrain import cli
from pipetrain.history import encode, read_history
from pipetrain.progress import Progress, RunState, epoch_line, lines_for
from pipetrain.tail import dashboard, tail_live, tail_once, updates
from tests.conftest import wait_until
from tests.test_history import known_records, resumed_records, write_records

PLAIN_FINISHED = """\
pipetrain: model 'mlp' (1,234 params) on 95 rows from 1 file(s), batch 10, 10 steps/epoch, shuffle block
Epoch 1/3  loss 0.5  accuracy 0.8  val_loss 0.6  val_accuracy 0.75  0.125 s  760 samples/s  input-bound 20.0%
Epoch 2/3  loss 0.25  accuracy 0.9  val_loss 0.3  val_accuracy 0.85  0.125 s  760 samples/s  input-bound 20.0%
completed: 2 epoch(s), 20 steps on tensorflow 2.21.0
best val_loss 0.3 at epoch 2
final val_accuracy 0.85
760 samples/s, input-bound 20.0%
peak RSS 560 MB
history: runs/done/history.jsonl
"""

DASHBOARD_RUNNING = """\
╭─ running  r1 ────────────────────────────────────────────────────────────────────────────────────╮
│ model    mlp (1,234 params)                                                                      │
│ data     95 rows in train.h5 · batch 10 · 10 steps/epoch · shuffle block (seed 0) · validation   │
│          val.h5                                                                                  │
│ config   workers 2 · max_queue 8 · model default                                                 │
│ host     box · 2 CPUs · 8,000 MB · python 3.11.7 · keras 3.15.1 · tensorflow 2.21.0              │
│ started  2025-01-01T12:00:00+00:00 · elapsed 0:00:01                                             │
╰───────────────────────────────────────────────────────────────────── runs/running/history.jsonl ─╯
Epoch 3/3 ━━━━━━━━━━╸                 4/10 ETA 0:00:00 loss 0.0891  800 samples/s  input-bound 20.0%
run ETA 0:00:00
no new record for 0:01:30
best val_loss 0.3 at epoch 2
last batch  epoch 3, batch 4/10, step 24:  accuracy 0.5  loss 0.0833  step 10.0 ms, waited 2.5 ms
Finished epochs
┏━━━━━━━┳━━━━━━┳━━━━━━━━━━┳━━━━━━━━━━┳━━━━━━━━━━━━━━┳━━━━━━━━┳━━━━━━━━━━━┳━━━━━━━━━━━━━┓
┃ epoch ┃ loss ┃ accuracy ┃ val_loss ┃ val_accuracy ┃   time ┃ samples/s ┃ input-bound ┃
┡━━━━━━━╇━━━━━━╇━━━━━━━━━━╇━━━━━━━━━━╇━━━━━━━━━━━━━━╇━━━━━━━━╇━━━━━━━━━━━╇━━━━━━━━━━━━━┩
│     1 │  0.5 │      0.8 │      0.6 │         0.75 │ 0.12 s │       760 │       20.0% │
│     2 │ 0.25 │      0.9 │      0.3 │         0.85 │ 0.12 s │       760 │       20.0% │
└───────┴──────┴──────────┴──────────┴──────────────┴────────┴───────────┴─────────────┘
throughput  now 800 samples/s · last epoch 760 samples/s · input-bound 20.0% · read 50.0 MB/s
memory      RSS 530 MB (peak 530 MB, +30 MB since start) · system available 7,900 MB
cpu         150% of one core · 9 threads
"""


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """runs/done (finished), runs/running (in epoch 3), runs/resumed, in a fresh folder."""
    monkeypatch.chdir(tmp_path)
    write_records(tmp_path / "runs" / "done" / "history.jsonl", known_records())
    write_records(tmp_path / "runs" / "running" / "history.jsonl",
                  known_records(epochs_done=2, batches_in_last=4, end=None))
    write_records(tmp_path / "runs" / "resumed" / "history.jsonl", resumed_records())
    return tmp_path / "runs"


def text_of(renderable, width=100) -> str:
    console = Console(width=width, file=io.StringIO(), color_system=None, record=True)
    console.print(renderable)
    return "\n".join(line.rstrip() for line in console.export_text().splitlines()) + "\n"


def epoch_column(text: str) -> list[str]:
    """The first column of the rows of the finished-epochs table."""
    return [line.split()[1] for line in text.splitlines() if line.count("│") > 5]


def state_of(records) -> RunState:
    return RunState().extend(records)


# -- the state ----------------------------------------------------------------------------------

def test_the_state_knows_where_a_running_job_is():
    state = state_of(known_records(epochs_done=2, batches_in_last=4, end=None))
    assert (state.current_epoch, state.batches_done, state.steps, state.epochs_total) == (2, 4, 10, 3)
    assert state.eta_s == pytest.approx(6 * 10 / 800)  # 6 batches of 10 at 800 samples/s
    assert state.run_eta_s == pytest.approx(state.eta_s)  # the last epoch
    assert state.means["loss"] == pytest.approx(sum(2.0 / (21 + b) for b in range(4)) / 4, abs=1e-4)
    assert state.input_bound_pct == pytest.approx(20.0)
    assert state.batch["batch"] == 3 and state.end is None


def test_a_resumed_run_continues_the_state_as_read_history_does(runs):
    records = resumed_records()
    resume_at = next(i for i, r in enumerate(records) if r["type"] == "run" and r["resume"])
    state = state_of(records[: resume_at + 1])
    assert state.end is None and state.position == (1, 4)  # the resumed segment goes on
    assert [e["epoch"] for e in state.epochs] == [0]  # epoch 1 is trained again
    assert state.batch is None  # the last batch (2, 5) was superseded
    state.extend(records[resume_at + 1:])
    assert state.epochs == read_history(runs / "resumed").epochs
    assert state.end["status"] == "completed" and state.peak_rss_mb == 560.0


def test_memory_shown_is_the_running_processes_and_the_peak_the_whole_runs():
    """A resumed segment runs in new processes: its memory and its "+N MB since start"
    are its own, the processes shown are its own (one fewer here), and the peak is the
    run's - the most any sample shown says, its RSS or the kernel's peak in it."""
    sample = lambda t, rss, process, peak=None: {  # noqa: E731
        "type": "system", "run": "r", "t": t, "rss_mb": rss, "process": process,
        **({} if peak is None else {"peak_rss_mb": peak})}
    first = {"type": "run", "run": "r", "t": 0.0, "distributed": {"processes": 3}, "resume": None}
    state = state_of([first, sample(1.0, 400.0, 2), sample(1.5, 500.0, 0, peak=900.0), sample(2.0, 450.0, 1),
                      sample(3.0, 600.0, 0, peak=600.0), sample(3.5, 300.0, 1)])
    assert list(state.processes) == [0, 1, 2]  # in process order, not the order their samples came in
    assert (state.system["rss_mb"], state.first_rss_mb, state.peak_rss_mb) == (600.0, 500.0, 900.0)
    resumed = {"type": "run", "run": "r", "t": 10.0, "distributed": {"processes": 2}, "resume": {"epoch": 0,
                                                                                               "batch": 3}}
    state.extend([resumed])
    assert state.system is None and state.processes == {} and state.first_rss_mb is None
    assert "memory" not in text_of(dashboard(state, Path("h.jsonl")))  # nothing of the processes gone
    state.extend([sample(11.0, 200.0, 1), sample(11.5, 250.0, 0, peak=260.0), sample(12.0, 280.0, True)])
    assert list(state.processes) == [0, 1] and state.processes[1]["rss_mb"] == 280.0  # True is process 1
    assert (state.system["rss_mb"], state.first_rss_mb, state.peak_rss_mb) == (250.0, 250.0, 900.0)
    assert "RSS 250 MB (peak 900 MB, +0 MB since start)" in text_of(dashboard(state, Path("h.jsonl")))
    assert "2 processes" in text_of(dashboard(state, Path("h.jsonl")))
    state.extend([{"type": "end", "run": "r", "t": 13.0, "status": "completed", "peak_rss_mb": 950.0}])
    assert state.peak_rss_mb == 950.0


def test_unknown_record_types_and_fields_are_ignored():
    records = known_records()
    records.insert(3, {"type": "note", "run": "r1", "t": 1000.01, "text": "hello"})
    records[-2]["future_field"] = {"nested": True}
    path = Path("h.jsonl")
    assert text_of(dashboard(state_of(records), path)) == text_of(dashboard(state_of(known_records()), path))


def test_text_where_numbers_belong_shows_as_missing(tmp_path, capsys):
    """A hand-edited file: text in place of measurements is shown as '-', not a crash."""
    records = known_records()
    for record in records:
        if record["type"] in ("batch", "epoch", "system"):
            record.update({k: "n/a" for k in ("loss", "samples_per_s", "rss_mb", "input_bound_pct") if k in record})
    write_records(tmp_path / "edited.jsonl", records)
    assert cli.main(["tail", str(tmp_path / "edited.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "Epoch 1/3  loss -  accuracy 0.8" in out
    text_of(dashboard(state_of(records), Path("edited.jsonl")))  # draws


@pytest.mark.parametrize("value", [[1, 2], {"a": 1}, True], ids=["list", "object", "bool"])
def test_a_list_or_an_object_where_a_measurement_belongs_shows_as_missing(tmp_path, capsys, value):
    """As text does: tail failed on it ('unsupported format string passed to
    dict.__format__', 'float and list', exit 1). A vector metric stays a metric."""
    records = known_records()
    for record in records:
        if record["type"] in ("batch", "epoch", "system"):
            record.update({k: value for k in ("size", "wait_s", "step_s", "samples_per_s", "time_s", "rss_mb",
                                              "input_bound_pct", "read_mb_s", "step") if k in record})
    write_records(tmp_path / "edited.jsonl", records)
    assert cli.main(["tail", str(tmp_path / "edited.jsonl")]) == 0, capsys.readouterr().err
    assert "Epoch 1/3  loss 0.5  accuracy 0.8" in capsys.readouterr().out
    for cut in (4, 9, len(records)):  # mid-epoch too: the batches so far are summed
        text_of(dashboard(state_of(records[:cut]), Path("edited.jsonl")))  # draws


@pytest.mark.parametrize("where, key, value", [
    (0, "model", "resnet50"), (0, "host", "box"), (0, "config", ["--epochs", "3"]),
    (0, "model", {"name": "m", "params": "1M"}), (-1, "status", ["failed"]), (-1, "status", 3),
], ids=["model text", "host text", "config list", "params text", "status list", "status number"])
def test_run_and_end_records_of_another_shape_show_what_they_can(tmp_path, capsys, where, key, value):
    """A run or end record whose parts have another shape (another tool's, a hand edit):
    what is not as the schema has it shows as missing. tail, its view, ls and plot
    failed ("'str' object has no attribute 'get'", "Cannot specify ',' with 's'", exit 1)."""
    records = known_records()
    records[where][key] = value
    path = write_records(tmp_path / "runs" / "odd" / "history.jsonl", records)
    assert cli.main(["tail", str(path)]) == 0, capsys.readouterr().err
    assert "Epoch 2/3  loss 0.25" in capsys.readouterr().out
    text_of(dashboard(state_of(records), path, now=0.0))  # draws
    assert cli.main(["tail", "--raw", "--follow", str(path)]) == 0, capsys.readouterr().err  # (status of no kind: 0)
    capsys.readouterr()
    assert cli.main(["ls", str(tmp_path / "runs")]) == 0, capsys.readouterr().err
    assert "2/3" in capsys.readouterr().out
    pytest.importorskip("matplotlib")
    assert cli.main(["plot", str(path), "-o", str(tmp_path / "odd.png")]) == 0, capsys.readouterr().err


def test_epoch_lines_show_a_non_finite_metric_and_a_partial_epoch():
    record = dict(known_records()[12], loss=None, complete=False, batches=4)
    assert epoch_line(record, 3) == (
        "Epoch 1/3  loss -  accuracy 0.8  val_loss 0.6  val_accuracy 0.75  0.125 s  760 samples/s  "
        "input-bound 20.0%  (partial: 4 batches)")


# -- the views of a known history ---------------------------------------------------------------

def test_plain_view_of_a_finished_run_is_exact(runs, capsys):
    assert cli.main(["tail", "runs/done"]) == 0
    assert capsys.readouterr().out == PLAIN_FINISHED


def test_plain_view_of_a_running_job_ends_with_where_it_is(runs, capsys):
    assert cli.main(["tail", "runs/running/history.jsonl"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == PLAIN_FINISHED.splitlines()[:3]
    assert out[3:] == ["Epoch 3/3  4/10 batches  ETA 0:00:00  loss 0.0891  800 samples/s  input-bound 20.0%"]


def test_the_training_display_prints_the_same_lines_as_tail(runs, capsys):
    console = Console(file=io.StringIO(), width=300, color_system=None)  # not a terminal
    progress = Progress(console=console, history_path="runs/done/history.jsonl")
    for record in known_records():
        progress.handle(record)
    progress.close()
    assert console.file.getvalue() == PLAIN_FINISHED


def test_dashboard_of_a_running_job_is_exact(runs):
    path = Path("runs/running/history.jsonl")
    state = [u.state for u in updates(path, follow=False)][-1]
    assert text_of(dashboard(state, path, now=state.last_t + 90)) == DASHBOARD_RUNNING


def test_dashboard_of_finished_and_resumed_runs(runs):
    state = state_of(resumed_records())
    text = text_of(dashboard(state, runs / "resumed" / "history.jsonl", now=1e10))
    assert "completed: 3 epoch(s), 30 steps" in text
    assert "resumed 1x, last at epoch 2, batch 5/10" in text  # it went on with the 5th batch of the 2nd epoch
    assert epoch_column(text) == ["1", "2", "3"]
    assert "no new record" not in text and "ETA" not in text  # an ended run is not stale


def test_dashboard_before_the_first_record():
    path = Path("runs/next/history.jsonl")
    assert text_of(dashboard(RunState(), path, waiting=True)) == f"Waiting for {path} to appear...\n"
    assert text_of(dashboard(RunState(), path)) == f"Waiting for the first record of {path}...\n"


def test_long_runs_show_the_latest_epochs(tmp_path):
    records = known_records()
    epochs = [dict(records[12], epoch=i) for i in range(40)]
    state = state_of(records[:1] + epochs)
    text = text_of(dashboard(state, tmp_path / "h.jsonl", max_epochs=5))
    assert "35 earlier epoch(s) not shown" in text
    assert epoch_column(text) == ["36", "37", "38", "39", "40"]


def test_the_view_once_lists_the_latest_epochs_that_fit_on_the_terminal(tmp_path):
    """As the live view: a long run's older epochs are counted, not drawn (the whole
    list is `tail FILE | cat`, one line an epoch)."""
    records = known_records()
    path = write_records(tmp_path / "h.jsonl", records[:1] + [dict(records[12], epoch=i) for i in range(40)])
    console = Console(file=io.StringIO(), width=100, force_terminal=True, color_system=None, height=30)
    assert tail_once(path, console) == 0
    text = console.file.getvalue()
    assert "34 earlier epoch(s) not shown" in text and epoch_column(text) == [str(i) for i in range(35, 41)]


def test_records_whose_time_is_not_finite_are_skipped_by_every_view(tmp_path, capsys):
    """``1e400`` and ``NaN`` where a time belongs (a hand-edited file; json reads them)
    say nothing of when: such records are skipped like torn lines, by read_history,
    the view on a terminal, ls and plot alike, instead of crashing them."""
    lines = [encode(r) for r in known_records()]
    kinds = [json.loads(line)["type"] for line in lines]
    edited = {kinds.index("system"): b"NaN", kinds.index("epoch"): b"1e400", kinds.index("end"): b"-1e400"}
    for at, value in edited.items():
        lines[at] = lines[at].replace(b'"t":', b'"t":' + value + b',"t0":', 1)
    path = tmp_path / "runs" / "edited" / "history.jsonl"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"".join(lines))
    assert read_history(path).skipped == 3 and read_history(path).end is None
    console = Console(file=io.StringIO(), width=100, force_terminal=True, color_system=None, height=50)
    assert tail_once(path, console) == 0
    assert cli.main(["ls", str(tmp_path / "runs")]) == 0 and "runs/edited" in capsys.readouterr().out
    if pytest.importorskip("matplotlib"):
        assert cli.main(["plot", str(path), "-o", str(tmp_path / "p.png")]) == 0


def test_live_view_draws_the_final_state_and_returns(runs):
    console = Console(file=io.StringIO(), width=100, force_terminal=True, color_system=None, height=50)
    assert tail_live(runs / "done" / "history.jsonl", console, poll=0.01) == 0
    out = console.file.getvalue()
    assert "completed: 2 epoch(s), 20 steps" in out and "Finished epochs" in out


def test_a_replaced_history_starts_the_view_over(tmp_path, capsys):
    path = write_records(tmp_path / "h.jsonl", known_records(end=None, run_id="old"))
    stream = updates(path, follow=True, poll=0.01)
    first = next(stream)
    assert first.state.run["run"] == "old" and len(first.state.epochs) == 2
    replacement = write_records(tmp_path / "new.jsonl", known_records(epochs_done=1, run_id="new"))
    replacement.replace(path)  # --overwrite: a new file under the same name
    later = [u for u in stream]
    assert later[-1].state.run["run"] == "new" and len(later[-1].state.runs) == 1
    assert [e["run"] for e in later[-1].state.epochs] == ["new"]
    assert any(u.restarted for u in later)


def test_the_training_display_on_a_terminal_leaves_the_lines_and_summary():
    console = Console(file=io.StringIO(), width=120, force_terminal=True, color_system=None)
    progress = Progress(console=console)
    assert progress.live
    for record in known_records():
        progress.handle(record)
    progress.close()
    out = console.file.getvalue()
    for line in PLAIN_FINISHED.splitlines()[:-1]:  # no history path given here
        assert line in out
    assert "━" in out  # the bar was drawn (and then removed: transient)


# -- raw ------------------------------------------------------------------------------------------

def test_raw_prints_the_complete_lines_exactly(tmp_path, capfdbinary):
    path = write_records(tmp_path / "h.jsonl", known_records(end=None), tail=b'{"type":"batch","ru')
    assert cli.main(["tail", "--raw", str(path)]) == 0
    data = path.read_bytes()
    assert capfdbinary.readouterr().out == data[: data.rindex(b"\n") + 1]


def test_raw_follow_prints_every_line_until_the_end(tmp_path):
    path = tmp_path / "live" / "history.jsonl"
    lines = [encode(r) for r in resumed_records()]
    tail = subprocess.Popen([sys.executable, "-m", "pipetrain", "tail", "--raw", "--follow", "--poll", "0.02",
                             str(path.parent)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert b"waiting for" in tail.stderr.readline()  # started before the file exists
        path.parent.mkdir()
        ends = [i for i, line in enumerate(lines) if b'"type":"end"' in line]
        with path.open("ab", buffering=0) as f:
            for i, line in enumerate(lines):
                f.write(line[:9])  # half lines on the way
                time.sleep(0.001)
                if i == ends[0]:  # the resumed segment starts before the end can be seen alone
                    f.write(line[9:] + lines[i + 1][:9])
                    lines[i + 1] = lines[i + 1][9:]
                else:
                    f.write(line[9:])
        out, _ = tail.communicate(timeout=30)
    finally:
        tail.kill()
    assert tail.returncode == 0
    assert out == path.read_bytes()  # also past the first segment's end record


# -- bad input --------------------------------------------------------------------------------

def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello\nworld\n")
    cases = [
        (["tail", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such history file (--follow waits for it)"),
        (["tail", "--follow", str(tmp_path / "notes.txt" / "h.jsonl")], "cannot read the history: Not a directory"),
        (["tail", str(tmp_path / "notes.txt")], "notes.txt: not a pipetrain history (no pipetrain records in 2 line(s))"),
        (["tail", "--poll", "0", str(tmp_path / "notes.txt")], "--poll: must be a number of seconds above 0"),
    ]
    for args, message in cases:
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


# -- a real run ------------------------------------------------------------------------------

@pytest.mark.one_backend  # its subject is not the backend's: TensorFlow covers it (CI time)
@pytest.mark.model
def test_tail_follow_started_before_a_real_run_ends_by_itself(tmp_path):
    command = [sys.executable, "-m", "pipetrain"]
    tail = subprocess.Popen([*command, "tail", "runs/live", "--follow", "--poll", "0.05"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "waiting for runs/live/history.jsonl to appear" in tail.stderr.readline()
        assert tail.poll() is None
        train = subprocess.run([*command, "train", "--epochs", "2", "--name", "live"], cwd=tmp_path,
                               capture_output=True, text=True, timeout=600)
        assert train.returncode == 0, train.stderr
        out, err = tail.communicate(timeout=30)
    finally:
        tail.kill()
    assert tail.returncode == 0, err
    # The watcher prints exactly what the training process printed into its pipe.
    assert out == train.stdout
    assert [line.split()[1] for line in out.splitlines() if line.startswith("Epoch")] == ["1/2", "2/2"]
    assert out.splitlines()[-6].startswith("completed: 2 epoch(s), 90 steps")
    assert out.splitlines()[-5].startswith("best val_loss ")
    # and a snapshot taken afterwards is the same log
    again = subprocess.run([*command, "tail", "runs/live"], cwd=tmp_path, capture_output=True, text=True)
    assert again.stdout == train.stdout
    # which is what the state and lines_for make of the records
    state, lines = RunState(), []
    for line in (tmp_path / "runs/live/history.jsonl").read_text().splitlines():
        record = json.loads(line)
        state.add(record)
        lines += lines_for(record, state, "runs/live/history.jsonl")
    assert lines == train.stdout.splitlines()


@pytest.mark.parametrize("status, code", [("completed", 0), ("stopped", 0), ("failed", 1), ("interrupted", 130)])
def test_follow_exits_with_the_runs_status(tmp_path, capsys, status, code):
    """So that a script can wait on a run: `tail --follow` (plain or raw) exits 0 when
    it completed or was stopped, 1 when it failed, 130 when it was interrupted; a look
    without --follow is a view and exits 0."""
    path = write_records(tmp_path / "h.jsonl", known_records(end=status))
    assert cli.main(["tail", str(path), "--follow"]) == code
    assert cli.main(["tail", str(path), "--follow", "--raw"]) == code
    assert cli.main(["tail", str(path)]) == 0
    assert cli.main(["tail", str(path), "--raw"]) == 0
    console = Console(file=io.StringIO(), width=100, force_terminal=True, color_system=None, height=50)
    assert tail_live(path, console, poll=0.01) == code


def dead_process() -> dict:
    """The run-record description of a process of this host that has ended."""
    from pipetrain.process import boot_id

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(child.pid).create_time()
    child.wait()
    return {"pid": child.pid, "host": socket.gethostname(), "boot_id": boot_id(), "started": started}


def test_a_run_whose_process_is_gone_says_so_and_follow_exits_1(tmp_path, capsys):
    """A run killed with -9 writes no end record: on its host, tail says its process is
    gone (not an ETA), and --follow exits 1 instead of waiting for ever."""
    records = known_records(epochs_done=2, batches_in_last=4, end=None)
    records[0]["process"] = dead_process()
    records[0]["config"]["cli"] = {"epochs": 3}
    path = write_records(tmp_path / "runs" / "x" / "history.jsonl", records)
    assert cli.main(["tail", str(path), "--follow"]) == 1
    captured = capsys.readouterr()
    assert f"is gone without an end record (killed?); resume with: pipetrain train --resume {path.parent}" \
        in captured.err
    assert cli.main(["tail", str(path), "--follow", "--raw"]) == 1
    assert "is gone" in capsys.readouterr().err
    assert cli.main(["tail", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[-1].endswith("(not running)") and "is gone" in captured.err
    # pipetrain.follow ends there too, with every record (it waited for ever)
    followed: list[dict] = []
    reader = threading.Thread(target=lambda: followed.extend(pipetrain.follow(path, poll=0.05)), daemon=True)
    reader.start()
    reader.join(60)
    assert not reader.is_alive() and followed == records
    state = state_of(records)
    text = text_of(dashboard(state, path, now=state.last_t + 5, writer="gone"))
    assert "not running: the run's process (pid" in text and "it would go on at epoch 3, batch 5/10" in text
    assert "ETA" not in text


def test_whether_a_runs_process_is_there():
    from pipetrain.process import process_info, writer_state

    me = process_info()
    assert writer_state(me) == "alive"
    assert writer_state(dead_process()) == "gone"
    assert writer_state({**me, "started": me["started"] - 3600}) == "gone"  # the pid is another process now
    assert writer_state({**me, "boot_id": "another boot"}) == "gone"  # this host has booted since
    assert writer_state({**me, "host": "elsewhere"}) == "unknown"  # nothing can be known from here
    assert writer_state(None) == writer_state({}) == "unknown"  # a history from before the record said


@pytest.mark.one_backend  # its subject is not the backend's: TensorFlow covers it (CI time)
@pytest.mark.model
def test_quiet_training_prints_nothing(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pipetrain", "train", "--epochs", "1", "--quiet", "--name", "q"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""
    assert read_history(tmp_path / "runs" / "q").end["status"] == "completed"


def test_the_training_bar_and_tail_show_one_samples_per_s(tmp_path):
    """samples/s "now" has one definition, the batch records' (the batches of the last
    two seconds, over wall time): the trainer's bar and tail's view show that number."""
    from pipetrain.progress import EpochBar, RecentRate

    records = known_records(epochs_done=2, batches_in_last=4, end=None)
    rates = {}
    for r in records:
        if r["type"] == "batch":  # what the run records for these batches (one measure per epoch)
            rate = rates.setdefault(r["epoch"], RecentRate())
            r["samples_per_s"] = round(rate.add(r["t"] - r["step_s"] - r["wait_s"], r["t"], r["size"]), 1)
    assert records[-1]["samples_per_s"] == 800.0  # 10 rows per 12.5 ms
    progress = Progress(verbose=2, console=Console(file=io.StringIO(), width=100))
    for r in records:
        progress.handle(r)
    path = write_records(tmp_path / "h.jsonl", records)
    view = text_of(dashboard([u.state for u in updates(path, follow=False)][-1], path))
    assert "800 samples/s" in text_of(EpochBar(progress.state)) and "now 800 samples/s" in view


def many_metrics(records):
    for r in records:
        if r["type"] == "epoch":
            r.update(precision=0.5, recall=0.4, auc=0.9, val_precision=0.5, val_recall=0.3, val_auc=0.8)
    return records


def test_an_80_column_terminal_is_fitted(tmp_path):
    """On 80 columns: the trainer's epoch lines are cut between metrics (never inside a
    number), the epochs table keeps whole headers and names the columns it leaves out."""
    records = many_metrics(known_records(epochs_done=2, batches_in_last=4, end=None))
    console = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
    progress = Progress(verbose=2, console=console)  # lines only, on a terminal
    for r in records:
        progress.handle(r)
    out = console.file.getvalue().splitlines()
    assert all(len(line) <= 80 for line in out) and len(out) > 3
    state = state_of(records)
    plain = [run_line_or_epoch for r in records for run_line_or_epoch in lines_for(r, state)]
    assert " ".join(" ".join(out).split()) == " ".join(" ".join(plain).split())  # the same words, in order
    assert any(line.startswith("    ") and "samples/s" in line for line in out)  # a continuation line
    path = write_records(tmp_path / "h.jsonl", records)
    text = text_of(dashboard(state, path, now=state.last_t, width=80), width=80)
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "…" not in text and "val_" in text and "accuracy" in text and "epoch" in text
    assert "not shown at this width: " in text and "input-bound" in text.split("not shown at this width: ")[1]


def test_a_zombie_writer_is_gone_and_a_folder_held_by_a_resume_keeps_a_follower_following(tmp_path):
    """A trainer killed but not reaped (a zombie) is gone, not alive; an ended history
    whose folder a live process holds (a resume starting, before its run record) is not
    finished for a follower, and its writer not gone."""
    import os
    import signal
    import socket

    from pipetrain.history import Follower
    from pipetrain.process import boot_id, writer_state
    from pipetrain.runfolder import writer

    child = subprocess.Popen(["sleep", "30"])
    try:
        started = psutil.Process(child.pid).create_time()
        os.kill(child.pid, signal.SIGKILL)
        wait_until(lambda: psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE, timeout=10)
        process = {"pid": child.pid, "host": socket.gethostname(), "boot_id": boot_id(), "started": started}
        assert writer_state(process) == "gone"
    finally:
        child.wait()
    path = write_records(tmp_path / "run" / "history.jsonl", known_records())
    follower = Follower(path)
    follower.read()
    assert follower.finished
    lock = tmp_path / "run" / ".pipetrain.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "now"}))
    assert not follower.finished and writer({"process": process}, path) == "alive"
    lock.write_text(json.dumps({"pid": child.pid, "host": socket.gethostname(), "since": "then"}))  # a stale lock
    assert follower.finished and writer({"process": process}, path) == "gone"


def test_a_run_folder_named_in_bytes_that_are_not_utf8_is_shown(tmp_path, monkeypatch):
    """A folder name Python decodes with a lone surrogate (b'exp\\xff'), or a hand-edited
    record with one, is printed on a strict UTF-8 stdout (en_US.UTF-8, PYTHONIOENCODING)
    by tail and ls; both failed ('surrogates not allowed', exit 1)."""
    import os

    folder = Path(os.fsdecode(bytes(tmp_path) + b"/runs/exp\xff"))
    records = known_records()
    records[-1] = dict(records[-1], error="cannot read /data/\udcff.h5 \ud800")
    write_records(folder / "history.jsonl", records)
    for args in (["tail", str(folder)], ["ls", str(folder.parent)]):
        out = io.BytesIO()
        monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(out, encoding="utf-8", errors="strict"))
        assert cli.main(args) == 0, args
        sys.stdout.flush()
        assert b"exp\xff" in out.getvalue(), args
