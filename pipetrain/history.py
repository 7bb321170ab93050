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

import json
import math
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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
    # Anything else (a dtype, a Keras object in a config) is recorded by its text.
    return str(value)


def encode(record: Mapping) -> bytes:
    """One record as one complete line of strict JSON."""
    return (json.dumps(jsonable(record), allow_nan=False, separators=(",", ":")) + "\n").encode()


class HistoryWriter:
    """Appends records to a JSON Lines file, one ``write`` of one complete line each.

    The file is opened with ``O_APPEND`` and written without a user-space buffer, so every
    record is visible to ``tail -f`` (and ``pipetrain tail``) the moment it is written.
    :meth:`sync` (``fsync``) is called at epoch ends and on close. Several threads may
    write (the training loop and the system monitor): a lock keeps lines whole.

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
        self._end_torn_line()

    def _end_torn_line(self) -> None:
        """A process killed mid-write can leave half a line; end it so that the next
        record starts on a line of its own (readers skip the torn one)."""
        size = os.fstat(self._fd).st_size
        if size and os.pread(self._fd, 1, size - 1) != b"\n":
            self._write_bytes(b"\n")

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

    def sync(self) -> None:
        with self._lock:
            if self._fd >= 0:
                try:
                    os.fsync(self._fd)
                except OSError as e:
                    raise HistoryWriteError(f"{self.path}: cannot sync the history: {e.strerror or e}") from e

    def close(self) -> None:
        with self._lock:
            if self._fd < 0:
                return
            fd, self._fd = self._fd, -1
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def __enter__(self) -> HistoryWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parse_lines(data: bytes) -> tuple[list[dict], int]:
    """The records in ``data`` and how many lines were skipped (torn or not JSON objects).
    A trailing fragment without its newline is not a record yet."""
    records, skipped = [], 0
    for line in data.split(b"\n")[:-1]:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            skipped += 1
            continue
        if isinstance(record, dict) and "type" in record:
            records.append(record)
        else:
            skipped += 1
    return records, skipped


def _position(record: Mapping) -> tuple[int, int]:
    return int(record.get("epoch", 0)), int(record.get("batch", 0))


@dataclass
class History:
    """One continuous history, read from a JSON Lines file.

    A resumed run appends a new ``run`` record whose ``resume`` names the (epoch, batch)
    it continues from; the batches and epochs that the earlier segment recorded at or
    after that position were trained again, so only their new records are kept: every
    (epoch, batch) appears once.
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
        if kind == "run":
            resume = record.get("resume")
            if resume:
                at = _position(resume)
                self.batches = [b for b in self.batches if _position(b) < at]
                self.epochs = [e for e in self.epochs if int(e.get("epoch", 0)) < at[0]]
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

    def to_pandas(self):
        """The epoch, batch and system tables as pandas DataFrames (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("History.to_pandas needs pandas: pip install pandas") from e
        return {
            "epochs": pd.DataFrame(self.epochs),
            "batches": pd.DataFrame(self.batches),
            "system": pd.DataFrame(self.system),
        }


def read_history(path: str | os.PathLike) -> History:
    """Read a history file as one continuous :class:`History`.

    A torn last line (a run killed mid-write, or a line still being written) and any
    other line that is not a JSON object are skipped and counted in ``skipped``.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such history file") from None
    if data and not data.endswith(b"\n"):
        # No proper prefix of a JSON object parses, so a torn last line is skipped
        # below while a complete last object that lacks only its newline still counts.
        data += b"\n"
    records, skipped = parse_lines(data)
    history = History(skipped=skipped)
    for record in records:
        history.add(record)
    return history


def follow(
    path: str | os.PathLike,
    *,
    until_end: bool = True,
    poll: float = 0.2,
    timeout: float | None = None,
) -> Iterator[dict]:
    """Yield the records of a history file as they are appended, from its first line.

    Waits for the file to appear; never yields half a line; starts again from the top
    when the file is truncated or replaced (a new inode). With ``until_end`` (the
    default) it returns after an ``end`` record; ``timeout`` returns after that many
    seconds without a new record.
    """
    path = Path(path)
    handle, inode, pending, mtime = None, None, b"", None
    last_news = time.monotonic()
    try:
        while True:
            if handle is None:
                try:
                    handle = open(path, "rb")  # noqa: SIM115 - kept open across iterations
                    inode, pending = os.fstat(handle.fileno()).st_ino, b""
                except FileNotFoundError:
                    handle = None
            if handle is not None:
                chunk = handle.read()
                if chunk:
                    mtime = os.fstat(handle.fileno()).st_mtime_ns
                    pending += chunk
                    lines = pending.split(b"\n")
                    pending = lines.pop()
                    for line in lines:
                        records, _ = parse_lines(line + b"\n")
                        for record in records:
                            last_news = time.monotonic()
                            yield record
                            if until_end and record.get("type") == "end":
                                return
                    continue
                if _replaced_or_truncated(path, handle, inode, mtime):
                    handle.close()
                    handle = None
                    continue
            if timeout is not None and time.monotonic() - last_news > timeout:
                return
            time.sleep(poll)
    finally:
        if handle is not None:
            handle.close()


def _replaced_or_truncated(path: Path, handle, inode: int, mtime: int | None) -> bool:
    """A new file under the same name, a shorter file, or one rewritten to the very
    length we had read (modified, yet nothing new to read)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False  # removed: keep reading what we have until a new file appears
    position = handle.tell()
    if st.st_ino != inode or st.st_size < position:
        return True
    return mtime is not None and st.st_size == position and st.st_mtime_ns != mtime
