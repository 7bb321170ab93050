"""The JSON Lines history: a writer that appends one complete line per record, a tolerant
reader that presents one continuous history across resumed runs, and a follower that
yields records as another process appends them.

The format (schema 1) is a public contract, described in README.md. Each record is one
JSON object on one line; every record has ``type``, ``run`` and ``t``. Read it with jq::

    jq -c 'select(.type == "epoch") | {epoch, loss, val_loss}' runs/exp1/history.jsonl

or with pandas::

    pandas.read_json("runs/exp1/history.jsonl", lines=True)
"""

from __future__ import annotations

import enum
import errno
import json
import math
import os
import stat
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from pipetrain import scan
from pipetrain.errors import InputError
from pipetrain.index import IndexWriter

SCHEMA = 1


class HistoryWriteError(OSError):
    """The history could not be written (disk full, permissions, removed folder)."""


def jsonable(value):
    """``value`` as plain JSON types: numpy scalars and arrays become numbers and lists,
    non-finite floats become ``None`` (strict JSON has no NaN or Infinity)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    # Anything else (a dtype, a Keras object in a config) is recorded by its text.
    return str(value)


# orjson writes a batch line in a tenth of json's time (about 1 us against 7, warm); what
# it would write unlike jsonable (a datetime, a dataclass, a subclass of str) it refuses.
# Both write an enum as its value.
_ORJSON = (orjson.OPT_APPEND_NEWLINE | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
           | orjson.OPT_PASSTHROUGH_SUBCLASS)


def encode(record: Mapping) -> bytes:
    """One record as one complete line of strict JSON (non-finite floats as null)."""
    try:  # the common case: plain values (orjson writes NaN and infinity as null, as jsonable does)
        return orjson.dumps(record, option=_ORJSON)
    except TypeError:  # numpy values, a Path, an integer beyond 64 bits, a key not a string, a lone surrogate
        line = json.dumps(jsonable(record), allow_nan=False, separators=(",", ":"))
    return (line + "\n").encode()


class HistoryWriter:
    """Appends records to a JSON Lines file, one ``write`` of one complete line each.

    The file is opened with ``O_APPEND`` and written without a user-space buffer, so every
    record is visible to ``tail -f`` (and ``pipetrain tail``) the moment it is written.
    :meth:`sync` (``fsync``) is called at epoch ends and on close. Several threads may
    write (the training loop and the system monitor): a lock keeps lines whole. Where
    each line other than a batch line is goes to the history's index
    (:mod:`pipetrain.index`), for readers that want only those.

    Example::

        with HistoryWriter("runs/a/history.jsonl") as w:
            w.write({"type": "batch", "run": "a", "t": time.time(), "loss": 0.3})
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as e:
            raise HistoryWriteError(f"{self.path}: cannot write the history: {e.strerror or e}") from e
        self._index = IndexWriter(self.path, self._fd)  # checked before a cut changes the file's mtime
        self._end_torn_line()
        self._index.update()  # what it does not cover yet (all of a history from an older pipetrain)

    def _end_torn_line(self) -> None:
        """A process killed mid-write can leave half a line at the end: cut it off, so
        the file stays strict JSON Lines for jq and pandas. (It never held a record; a
        follower sees the file shrink and reads it again from the top.) A whole record
        that lacks only its newline is a record (read_history shows it): it gets one."""
        size = os.fstat(self._fd).st_size
        end = scan.line_end(self._fd, size)
        if end == size:
            return
        if decode_line(os.pread(self._fd, size - end, end)) is not None:
            os.write(self._fd, b"\n")
        else:
            os.ftruncate(self._fd, end)

    def write(self, record: Mapping) -> None:
        self._write_bytes(encode(record))

    def _write_bytes(self, line: bytes) -> None:
        with self._lock:
            if self._fd < 0:
                raise HistoryWriteError(f"{self.path}: the history is closed")
            try:
                written = os.write(self._fd, line)
            except OSError as e:
                raise HistoryWriteError(f"{self.path}: cannot write the history: {e.strerror or e}") from e
            if written != len(line):  # a short write means the disk is full
                raise HistoryWriteError(
                    f"{self.path}: cannot write the history: only {written} of {len(line)} bytes "
                    "written (disk full?)"
                )
            if not line.startswith(scan.BATCH_PREFIX):  # nothing more for a batch line
                self._index.update()

    def sync(self) -> None:
        """Flush what is written to disk (another thread may go on writing meanwhile)."""
        with self._lock:
            if self._fd < 0:
                return
            try:
                fd = os.dup(self._fd)  # its own descriptor: a close meanwhile cannot pull the file away
            except OSError as e:
                raise HistoryWriteError(f"{self.path}: cannot sync the history: {e.strerror or e}") from e
        try:
            self._fsync(fd)
        finally:
            os.close(fd)

    def _fsync(self, fd: int) -> None:
        try:
            os.fsync(fd)
        except OSError as e:
            if e.errno == errno.EINVAL:  # not a regular file (a pipe, /dev/null): nothing to sync
                return
            raise HistoryWriteError(f"{self.path}: cannot sync the history: {e.strerror or e}") from e

    def close(self) -> None:
        with self._lock:
            if self._fd < 0:
                return
            fd, self._fd = self._fd, -1
            try:
                self._index.close()  # sealed: the file's size and mtime now
                self._fsync(fd)
            finally:
                os.close(fd)

    def __enter__(self) -> HistoryWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class HistoryPathError(InputError):
    """A folder that holds several histories, none of them ``history.jsonl``."""


def history_file(path: str | os.PathLike) -> Path:
    """The history file that ``path`` names: the file itself, or in a folder its
    ``history.jsonl``, else its one ``*.jsonl`` file (several: an error naming them).
    A path that does not exist yet names a file if it ends in ``.jsonl`` or ``.json``,
    else a run folder (so a watcher can start before the run). ``tail``, ``plot``,
    ``ls``, ``read_history`` and ``--resume`` all find a history by this one rule.

    >>> history_file("runs/exp1/history.jsonl"), history_file("runs/not-yet")
    (PosixPath('runs/exp1/history.jsonl'), PosixPath('runs/not-yet/history.jsonl'))
    """
    path = Path(path)
    if path.is_dir():
        if (path / "history.jsonl").exists():
            return _a_file(path / "history.jsonl")
        found = sorted(p for p in path.glob("*.jsonl") if p.is_file())
        if len(found) > 1:
            raise HistoryPathError(f"{path}: holds several histories; name one: {', '.join(str(f) for f in found)}")
        return found[0] if found else path / "history.jsonl"
    if not path.exists() and path.suffix not in (".jsonl", ".json"):
        return path / "history.jsonl"
    return _a_file(path)


def _a_file(path: Path) -> Path:
    """``path``, unless it is a pipe, a socket or a device, which a reader would wait on
    forever (or read without end)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return path  # not there (yet): the reader says so, or waits for the run
    if not stat.S_ISREG(mode):
        raise HistoryPathError(f"{path}: is {file_kind(mode)}, not a history file")
    return path


def file_kind(mode: int) -> str:
    """What a file that is not a regular file is, for a message ("a named pipe")."""
    for test, name in ((stat.S_ISBLK, "a block device"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def run_name(path: str | os.PathLike, run: Mapping | None = None) -> str:
    """A run's name for people: its folder's name when the file is a run folder's
    ``history.jsonl``, else the run id of its ``run`` record, else the file's name.

    >>> run_name("runs/exp1/history.jsonl"), run_name("h.jsonl", {"run": "20250101-abc"})
    ('exp1', '20250101-abc')
    """
    path = Path(path)
    if path.name == "history.jsonl" and path.parent.name not in ("", "."):
        return path.parent.name
    return str((run or {}).get("run") or path.stem)


def decode_line(line: bytes) -> dict | None:
    """The record on one line, or None if the line is blank, torn or not a record."""
    record = scan.decode(line)
    return record if isinstance(record, dict) and well_formed(record) else None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_shown(sample: Mapping) -> bool:
    """Whether a system sample is one the view shows (memory, CPU): process 0's, or one
    without a process index (a run of one process). A bool counts as the int it is."""
    process = sample.get("process")
    return not isinstance(process, int) or process == 0


def processes_of(run: Mapping) -> int:
    """How many processes a run record says its segment runs on (0: not a distributed run)."""
    distributed = run.get("distributed")
    count = distributed.get("processes") if isinstance(distributed, Mapping) else None
    return count if type(count) is int and count > 0 else 0


# The schema's measurements that are single numbers (a metric may be a vector, gpu_mb a dict).
_MEASUREMENTS = frozenset({"step", "size", "step_s", "wait_s", "samples_per_s", "samples", "batches", "time_s",
                           "input_bound_pct", "read_mb", "read_mb_s", "disk_mb", "val_time_s", "rss_mb",
                           "peak_rss_mb", "cpu_pct", "sys_available_mb", "threads"})


def numeric_view(record: dict) -> dict:
    """A record as it is displayed and plotted: in a ``batch``, ``epoch`` or ``system``
    record, text where measurements are numbers, or a list or an object where the schema
    has one number (a hand-edited file), shows as missing; so do the parts of a ``run``
    or ``end`` record that have another shape than the schema's (another tool's: a
    ``model`` given as text, a ``status`` that is not text). Other records are returned
    as they are."""
    kind = record.get("type")
    if kind == "run":
        odd = {k for k in ("model", "host", "config") if record.get(k) is not None and not isinstance(record[k], dict)}
        model = record.get("model")
        params = model.get("params") if isinstance(model, dict) else None
        if not odd and (params is None or _is_int(params)):
            return record
        view = {k: v for k, v in record.items() if k not in odd}
        if "model" not in odd and params is not None and not _is_int(params):
            view["model"] = {k: v for k, v in model.items() if k != "params"}
        return view
    if kind == "end":
        status = record.get("status")
        return record if status is None or isinstance(status, str) else {k: v for k, v in record.items()
                                                                           if k != "status"}
    if kind not in ("batch", "epoch", "system"):
        return record
    return {k: None if (isinstance(v, str) and k not in ("type", "run"))
            or (isinstance(v, (list, dict)) and k in _MEASUREMENTS) else v for k, v in record.items()}


_NUMBERS = {int, float}
_POSITIONS = {"batch": ("epoch", "batch"), "epoch": ("epoch",), "system": ()}  # whole numbers (or missing)


def well_formed(record: Mapping) -> bool:
    """Whether a record has what readers rely on (schema 1): a ``type``, a time ``t``,
    whole-number positions and counts (a missing one counts as 0). Records written
    by pipetrain always are; a file edited by hand or by another tool may not be, and
    such a record is skipped like a torn line. A time that is not finite (``1e400`` or
    ``NaN`` in the file: pipetrain never writes one) says nothing of when, so it counts
    as no time."""
    kind = record.get("type")
    t = record.get("t")
    if not isinstance(kind, str) or type(t) not in _NUMBERS and not is_number(t):
        return False
    if isinstance(t, float) and not math.isfinite(t):
        return False
    positions = _POSITIONS.get(kind)
    if positions is not None:
        for key in positions:  # a loop, not all(...): readers call this for every line they keep
            value = record.get(key)
            if value is not None and type(value) is not int and not _is_int(value):
                return False
        return True
    if kind == "run":
        resume, data = record.get("resume"), record.get("data", {})
        if resume is not None and not (isinstance(resume, dict) and all(
                _is_int(resume.get(k) or 0) for k in ("epoch", "batch"))):
            return False
        return isinstance(data, dict) and all(
            data.get(k) is None or _is_int(data[k]) for k in ("rows", "batch_size", "steps_per_epoch", "epochs"))
    if kind == "end":
        return all(record.get(k) is None or _is_int(record[k]) for k in ("epochs", "steps"))
    return True


def parse_lines(data: bytes) -> tuple[list[dict], int]:
    """The records in ``data`` and how many lines were skipped (torn or not JSON objects).
    A trailing fragment without its newline is not a record yet.

    >>> parse_lines(b'{"type":"end","run":"r","t":1}\\n{"type":"ba')
    ([{'type': 'end', 'run': 'r', 't': 1}], 0)
    """
    records, skipped = [], 0
    for line in data.split(b"\n")[:-1]:
        if not line.strip():
            continue
        record = decode_line(line)
        if record is None:
            skipped += 1
        else:
            records.append(record)
    return records, skipped


def _position(record: Mapping) -> tuple[int, int]:
    """(epoch, batch) of a record or a ``resume``; a missing or null field counts as 0."""
    return int(record.get("epoch") or 0), int(record.get("batch") or 0)


def resume_point(run: Mapping) -> tuple[int, int] | None:
    """The (epoch, batch) that a ``run`` record resumes from, or None for a fresh start."""
    resume = run.get("resume")
    return _position(resume) if isinstance(resume, Mapping) else None


def superseded(record: Mapping, at: tuple[int, int]) -> bool:
    """Whether a segment resumed at ``at`` (epoch, batch) trains ``record`` again: the
    batches from that position on, and the epoch records of that epoch and later."""
    kind = record.get("type")
    if kind == "batch":
        return _position(record) >= at
    if kind == "epoch":
        return _position(record)[0] >= at[0]
    return False


@dataclass
class History:
    """One continuous history, read from a JSON Lines file.

    ``batches`` and ``system`` are :class:`~pipetrain.table.Table` s when read from a
    file (sequences of the records' dicts, held as columns); the other fields are lists.

    A resumed run appends a new ``run`` record whose ``resume`` names the (epoch, batch)
    it continues from; the batches and epochs that the earlier segment recorded at or
    after that position were trained again, so only their new records are kept: every
    (epoch, batch) appears once. System records are kept: they are measurements in time.

    Example::

        h = read_history("runs/exp1/history.jsonl")
        [e["val_loss"] for e in h.epochs], h.end["status"] if h.end else "running"
    """

    runs: list[dict] = field(default_factory=list)
    batches: list[dict] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)
    system: list[dict] = field(default_factory=list)
    end: dict | None = None
    other: list[dict] = field(default_factory=list)
    skipped: int = 0

    def add(self, record: dict) -> None:
        kind = record.get("type")
        if not isinstance(self.batches, list) or not isinstance(self.system, list):
            self.batches, self.system = list(self.batches), list(self.system)  # tables become lists to grow
        if kind == "run":
            at = resume_point(record)
            if at is not None:
                self.batches = [b for b in self.batches if not superseded(b, at)]
                self.epochs = [e for e in self.epochs if not superseded(e, at)]
            self.end = None
            self.runs.append(record)
        elif kind == "batch":
            self.batches.append(record)
        elif kind == "epoch":
            self.epochs.append(record)
        elif kind == "system":
            self.system.append(record)
        elif kind == "end":
            self.end = record
        else:  # unknown record types are kept, not interpreted (forward compatible)
            self.other.append(record)

    @property
    def config(self) -> dict:
        """The settings of the latest run segment."""
        return self.runs[-1].get("config", {}) if self.runs else {}

    def to_pandas(self) -> dict:
        """The ``epochs``, ``batches`` and ``system`` tables as pandas DataFrames, one
        row per record, one column per field (needs pandas).

        Example::

            tables = read_history("runs/exp1/history.jsonl").to_pandas()
            tables["batches"].loss.rolling(50).mean().plot()
        """
        try:
            import pandas as pd
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError('History.to_pandas needs pandas: pip install "pipetrain[pandas]"') from e
        return {"epochs": pd.DataFrame(self.epochs), "batches": _frame(self.batches), "system": _frame(self.system)}


def _frame(records):
    """A DataFrame of records: from a Table's columns, or from a list of dicts."""
    import pandas as pd

    return records.to_pandas() if hasattr(records, "to_pandas") else pd.DataFrame(records)


def run_records(path: str | os.PathLike) -> list[dict]:
    """The ``run`` records of a history file, in order, as read_history finds them,
    parsing neither batch nor system lines (a long history is not read into memory)."""
    return read_history(path, tables=()).runs


def read_history(path: str | os.PathLike, **selection) -> History:
    """Read a history file (or a run folder's) as one continuous :class:`History`; see
    :func:`pipetrain.reading.read_history` for what it reads and how to ask for less."""
    from pipetrain.reading import read_history as read  # the reader builds on this module

    return read(path, **selection)


class Follower:
    """The complete lines appended to a history file, read without blocking.

    Each :meth:`read` returns the lines completed since the last one, each with its
    record (None for a line that is not one); a line still being written waits for its
    newline. The file may appear late. When it is truncated, rewritten or replaced by a
    new file (a new inode), reading starts again at the new file's first line and
    ``restarts`` counts up. ``finished`` tells that the run has ended: the last record is
    an ``end`` (no resumed segment after it) and nothing more is there to read.

    The follower never reads on from inside a line: it stands just after the last
    complete line it returned, and reads a line still being written again from its
    start at the next look. So a resumed run that cuts a torn last line and appends
    more than it cut is read as the lines it wrote, never as a splice of the old
    fragment and the new lines. A rewrite is noticed by the inode, by the size (shorter
    than what was read), and by the bytes read so far: the file's first bytes and the
    last bytes before where it stands must still be the same.

    Example::

        with Follower("runs/exp1/history.jsonl") as follower:
            while not follower.finished:
                for line, record in follower.read():
                    print(line.decode(), end="")
                time.sleep(0.2)
    """

    CHECK_BYTES = 256  # bytes compared at the start and before the position, each look

    def __init__(self, path: str | os.PathLike, chunk_bytes: int = 1 << 20):
        self.path = Path(path)
        self.chunk_bytes = chunk_bytes  # bounded reads: a long history is not read at once
        self.restarts = 0
        self.at_eof = False
        self.ended = False
        self._fd = -1
        self._inode: int | None = None
        self.position = 0  # just after the last complete line returned
        self._pending = b""  # a line still being written, as seen at the last look
        self._head = b""  # the file's first bytes, as read
        self._behind = b""  # the bytes just before ``position``, as read
        self.lines_seen = self.records_seen = 0  # by read_bytes: lines it decoded, records among them
        self.last_run: dict | None = None  # the latest run record read (the segment's writer)
        self.last_end: dict | None = None  # the end record that ended the run, if it has ended

    @property
    def exists(self) -> bool:
        """Whether the file has been opened (it may not exist yet)."""
        return self._fd >= 0

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def finished(self) -> bool:
        # Half a line after the end record means a resumed segment is being written; a
        # live holder of the run's folder, a resume starting there (before its run record).
        if not (self.ended and self.at_eof and not self._pending):
            return False
        from pipetrain.runfolder import held  # (runfolder reads histories)

        return not held(self.path)

    def look(self) -> bool:
        """Open the file, or notice that it was rewritten (and start over); whether it
        is there to read."""
        if self._fd < 0 and not self._open():
            self.at_eof = True
            return False
        if self._rewritten() or (self._at_end() and self._replaced()):
            self._restart()
            if self._fd < 0:  # removed again in between
                self.at_eof = True
                return False
        return True

    def read(self) -> list[tuple[bytes, dict | None]]:
        """The complete lines (with their ``\\n``) and records read since the last call."""
        data = self._read_lines()
        return [self._take(line + b"\n") for line in data.split(b"\n")[:-1]]

    def read_bytes(self) -> bytes:
        """The complete lines read since the last call, as they are in the file (only the
        records that can end a run are decoded, to know when it has)."""
        data = self._read_lines()
        if data:
            self._note_ends(data)
        return data

    def _read_lines(self) -> bytes:
        if not self.look():
            return b""
        data = os.pread(self._fd, self.chunk_bytes, self.position)
        size = self.position + len(data)
        while len(data) >= self.chunk_bytes and data.rfind(b"\n") < 0:  # a line longer than a chunk
            more = os.pread(self._fd, self.chunk_bytes, size)
            if not more:
                break
            data += more
            size += len(more)
        self.at_eof = size >= os.fstat(self._fd).st_size
        cut = data.rfind(b"\n") + 1
        self._pending = data[cut:] if self.at_eof else b""
        data = data[:cut]
        if data:
            self.advance(data)
        return data

    def advance(self, data: bytes) -> None:
        """Stand after ``data``, the complete lines at the current position."""
        if self.position < self.CHECK_BYTES:
            self._head = (self._head + data)[: self.CHECK_BYTES]
        self._behind = (self._behind + data)[-self.CHECK_BYTES:]
        self.position += len(data)

    def skip_to(self, position: int, ended: bool) -> None:
        """Stand at ``position`` (just after a newline, found by the caller in this
        file), with ``ended`` saying whether the last record before it ends the run."""
        self._head = os.pread(self._fd, min(self.CHECK_BYTES, position), 0)
        start = max(0, position - self.CHECK_BYTES)
        self._behind = os.pread(self._fd, position - start, start)
        self.position, self.ended = position, ended

    def _note_ends(self, data: bytes) -> None:
        """Whether the run has ended, from the records among ``data``'s lines that can
        say so (batch lines cannot); and whether the file holds records at all."""
        block = scan.Block(0, data)
        lines = block.others()
        spans = lines if block.clean(lines) and self.records_seen else block.lines()
        for start, end in spans:
            line = data[start:end]
            _, record = self._take(line)
            self.lines_seen += bool(line.strip())
            self.records_seen += record is not None

    def _take(self, line: bytes) -> tuple[bytes, dict | None]:
        record = decode_line(line)
        if record is not None:
            kind = record.get("type")
            # A resumed segment starts with a run record: the run goes on after an end.
            self.ended = kind == "end" or (self.ended and kind != "run")
            if kind == "run":
                self.last_run, self.last_end = record, None
            elif kind == "end":
                self.last_end = record
        return line, record

    def _open(self) -> bool:
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        self._inode = os.fstat(self._fd).st_ino
        self.position, self._pending, self._head, self._behind, self.ended = 0, b"", b"", b"", False
        self.lines_seen = self.records_seen = 0
        self.last_run = self.last_end = None
        return True

    def _restart(self) -> None:
        self.close()
        self.restarts += 1
        self._open()

    def _rewritten(self) -> bool:
        """The same file made shorter, or with other bytes than we read before where we
        stand (its first bytes or the last ones before our position)."""
        if os.fstat(self._fd).st_size < self.position:
            return True
        if self._head and os.pread(self._fd, len(self._head), 0) != self._head:
            return True
        start = self.position - len(self._behind)
        return bool(self._behind) and os.pread(self._fd, len(self._behind), start) != self._behind

    def _at_end(self) -> bool:
        return self.position + len(self._pending) >= os.fstat(self._fd).st_size

    def _replaced(self) -> bool:
        """Another file under the same name; a removed file is read to its end."""
        try:
            return os.stat(self.path).st_ino != self._inode
        except FileNotFoundError:
            return False

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Follower:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def follow(
    path: str | os.PathLike,
    *,
    until_end: bool = True,
    poll: float = 0.2,
    timeout: float | None = None,
) -> Iterator[dict]:
    """Yield the records of a history file (or a run folder's) as they are appended,
    from its first line.

    Waits for the file to appear; never yields half a line; starts again from the top
    when the file is truncated or replaced (a new inode). With ``until_end`` (the
    default) it returns once the run has ended: after an ``end`` record that is the last
    record in the file (an ``end`` followed by a resumed segment does not stop it), or
    once the run's process is known to be gone without writing one (killed, on this host;
    the last record is then not an ``end``). ``timeout`` returns after that many seconds
    without a new record.

    Example::

        for record in pipetrain.follow("runs/exp1"):
            if record["type"] == "epoch":
                print(record["epoch"], record["loss"])
    """
    from pipetrain.runfolder import writer  # (runfolder reads histories: imported here)

    last_news = time.monotonic()
    path = history_file(path)
    with Follower(path) as follower:
        while True:
            for _, record in follower.read():
                if record is not None:
                    last_news = time.monotonic()
                    yield record
            if until_end and follower.finished:
                return
            if until_end and follower.at_eof and follower.last_run is not None \
                    and writer(follower.last_run, path) == "gone":
                return  # killed: no end record will come (as tail --follow, which says so)
            if follower.at_eof:
                if timeout is not None and time.monotonic() - last_news > timeout:
                    return
                time.sleep(poll)
