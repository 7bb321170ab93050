"""``pipetrain ls [DIR]``: every run under a folder, one line each.

For each history under ``DIR`` (a run folder's ``history.jsonl``, or any ``*.jsonl`` file
whose first line is a ``run`` record): its status, whether its process is running, its
epochs (done/planned), its best epoch by the metric its callbacks monitor (else
``val_loss``, else ``loss``) and when it started. A history is read with
``read_history(tables=("epochs",))``: its batch and system lines are never parsed, so a
folder of long runs lists at once.

    $ pipetrain ls runs
    run        status     running  epochs  best                 started
    runs/exp1  completed  no       10/10   val_loss 0.21 @ 7    2026-11-25 15:52
    runs/gan   -          yes      3/10    d_loss 0.62 @ 3      2026-11-25 16:01
"""

from __future__ import annotations

import datetime as _dt
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from pipetrain.history import HistoryPathError, decode_line, history_file, numeric_view, read_history
from pipetrain.outcome import best_epoch
from pipetrain.process import writer_state
from pipetrain.progress import fmt, fmt_duration

FIRST_LINE_BYTES = 1 << 20  # a run record is shorter than this, unless it begins as the writer's (_RUN_LINE)
_RUN_LINE = b'{"type":"run"'  # how the history writer begins a run record (compact JSON, "type" first)


def histories(folder: Path) -> Iterator[Path]:
    """The history files under ``folder`` (itself one, or a run folder, included), in
    path order: ``*.jsonl`` files whose first line is a ``run`` record."""
    if not folder.is_dir():
        path = history_file(folder)  # (a pipe or a device: refused, not waited on)
        if path.exists() and path.stat().st_size and not _starts_a_history(path):
            raise HistoryPathError(f"{path}: is not a pipetrain history (its first line is not a run record)")
        yield path
        return
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            if name.endswith(".jsonl") and _starts_a_history(path):
                yield path


def _starts_a_history(path: Path) -> bool:
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False  # a named pipe would never answer
        with open(path, "rb") as f:
            first = f.readline(FIRST_LINE_BYTES)
            if not first.endswith(b"\n") and first.startswith(_RUN_LINE):  # a run on thousands of files: read on
                first += f.readline()
    except OSError:
        return False
    record = decode_line(first)
    return record is not None and record.get("type") == "run"


def describe(path: Path, now: float | None = None) -> dict:
    """One run, as ``ls`` lists it: run, status, running, epochs, best, started."""
    h = read_history(path, tables=("epochs",))
    h.end = numeric_view(h.end) if h.end is not None else None  # (a status of another shape shows as '?')
    run = numeric_view(h.runs[-1]) if h.runs else {}
    data = run.get("data") or {}
    done = sum(1 for e in h.epochs if e.get("complete") is not False)
    planned = data.get("epochs") or (run.get("config") or {}).get("epochs")
    best = best_epoch(h.epochs, run.get("monitor"))
    if h.end is not None:
        status, running = h.end.get("status", "?"), "no"
    else:
        state = writer_state(run.get("process"))
        status = "-"
        if state == "alive":
            running = "yes"
        elif state == "gone":
            status, running = "died", "no"  # no end record and no process: killed
        else:  # elsewhere, or an older history: how long it has been silent
            silent = (now or time.time()) - _last_t(path, h)
            running = f"? (silent {fmt_duration(silent)})"
    started = h.runs[0].get("started") if h.runs else None
    return {
        "run": str(path.parent if path.name == "history.jsonl" else path),
        "status": status,
        "running": running,
        "epochs": f"{done}/{planned}" if planned else str(done),
        "best": f"{best[0]} {fmt(best[2][best[0]])} @ {int(best[2].get('epoch') or 0) + 1}" if best else "-",
        "started": _when(started),
    }


def _last_t(path: Path, h) -> float:
    """The time of the last record (the file's last change when the records say less)."""
    times = [r.get("t") for r in (*h.runs[-1:], *h.epochs[-1:]) if isinstance(r.get("t"), (int, float))]
    return max([*times, path.stat().st_mtime])


def _when(started) -> str:
    try:
        return _dt.datetime.fromisoformat(started).strftime("%Y-%m-%d %H:%M")
    except (TypeError, ValueError):
        return "?"


def render(rows: list[dict]) -> str:
    columns = ["run", "status", "running", "epochs", "best", "started"]
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns).rstrip()]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in columns).rstrip() for r in rows]
    return "\n".join(lines)


def cmd_ls(args) -> int:
    """The ``pipetrain ls [DIR]`` command: runs in the order they started."""
    from pipetrain.cli import BadInput

    folder = Path(args.folder if args.folder is not None else "runs" if Path("runs").is_dir() else ".")
    if not folder.exists():
        raise BadInput(f"{folder}: no such folder")
    rows = []
    for path in histories(folder):
        try:
            rows.append(describe(path))
        except OSError as e:  # unreadable: said, the others listed
            rows.append({"run": str(path), "status": f"unreadable: {e.strerror or e}", "running": "?",
                         "epochs": "?", "best": "-", "started": "?"})
    if not rows:
        print(f"no runs under {folder}")
        return 0
    rows.sort(key=lambda r: (r["started"], r["run"]))
    print(render(rows))
    return 0
