"""``read_history``: one continuous :class:`~pipetrain.history.History` from a history
file of any length, batch and system records as columns.

The file is read in blocks (:mod:`pipetrain.scan`). In each block, the lines that are
not batch lines (run, epoch, end, system, anything else) are parsed one by one and kept
in file order; each run of consecutive batch lines is parsed at once and appended to a
:class:`~pipetrain.table.TableBuilder`, tagged with its *segment* (how many run records
came before it). At the end, the run records' resume points say which batches a later
segment trained again, exactly as :meth:`History.add` drops them record by record: a
batch of segment ``s`` is dropped when a run record after it resumes at or before its
(epoch, batch). Epoch records are few and replayed through ``History.add`` itself.

A run of batch lines is parsed by orjson line by line without first looking for
integers beyond 64 bits (which orjson, unlike json, reads as floats): the columns made
of them are checked instead - no float of magnitude 2**63 or more, no column of mixed
values - and parsed again exactly when the check fails. Rows sharing one key tuple
are transposed into columns in one pass (:class:`~pipetrain.table.TableBuilder`), and
the garbage collector is paused while reading (millions of new dicts, none in a cycle).

A history longer than ``PART_BYTES`` is cut at line ends into parts, one per CPU, parsed
side by side by helper processes and joined in file order (see ``_read_parts``).

What is asked for decides what is parsed: ``tables=("epochs",)`` parses neither batch
nor system lines, and a range (``epochs=``, ``since=``/``until=``) parses only the batch
lines in it (each batch line's time and epoch are read from its first bytes, where the
writer puts them; a line written otherwise is parsed whole).
"""

from __future__ import annotations

import bisect
import gc
import heapq
import math
import os
import pickle
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator
from functools import partial
from itertools import takewhile
from operator import itemgetter
from pathlib import Path

import numpy as np

from pipetrain import columnar, forked, index, scan
from pipetrain.history import History, history_file, is_number, is_shown, processes_of, resume_point, well_formed
from pipetrain.table import Table, TableBuilder

TABLES = ("batches", "epochs", "system")
# Blocks of 1 MB, not scan's 8: a block's columnar parse makes several copies of it, which
# then stay in the CPU's caches and in memory already mapped (20% less time on 200k records).
READ_BLOCK_BYTES = 1 << 20
_NUMBER_TYPES = {int, float}
_POSITION_TYPES = {int, type(None)}
_type_of = itemgetter("type")
_WIDE = 2.0**63
_COLUMNS_LEAST = 32  # batch lines worth a columnar parse of their own (it costs about 0.1 ms)
# The writer's batch lines begin with their run, time and epoch (see Run.emit).
_BATCH_HEAD = re.compile(rb'^\{"type":"batch","run":"[^"\\\n]*","t":(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?),'
                         rb'"epoch":(\d{1,18}|null)[,}]', re.M)


class _Selection:
    """Which records the caller asked for."""

    def __init__(self, tables: Iterable[str], epochs, since, until):
        tables = (tables,) if isinstance(tables, str) else tuple(tables)
        unknown = [t for t in tables if t not in TABLES]
        if unknown:
            raise ValueError(f"tables={tables!r}: unknown table {unknown[0]!r} (choose from {', '.join(TABLES)})")
        self.batches, self.epochs_table, self.system = (t in tables for t in TABLES)
        if isinstance(epochs, int) and not isinstance(epochs, bool):
            epochs = range(epochs, epochs + 1)
        if epochs is not None and not isinstance(epochs, range):
            raise ValueError(f"epochs={epochs!r}: give an epoch number or a range of them (range(3, 5))")
        for name, value in (("since", since), ("until", until)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or math.isnan(value)):
                raise ValueError(f"{name}={value!r}: give a Unix time in seconds")
        self.epoch_range, self.since, self.until = epochs, since, until
        self.ranged = epochs is not None or since is not None or until is not None

    def takes(self, record: dict) -> bool:
        """Whether a batch, epoch or system record is in the asked range."""
        kind = record["type"]
        t = record["t"]
        if (self.since is not None and t < self.since) or (self.until is not None and t >= self.until):
            return False
        if self.epoch_range is not None and kind in ("batch", "epoch"):
            return int(record.get("epoch") or 0) in self.epoch_range
        return True

    def mask(self, t: np.ndarray, epoch: np.ndarray | None) -> np.ndarray:
        """Which records may be in the range, from their times as floats (an integer time
        beyond 2**53 rounded: it may round up to ``until`` from below it; the exact test,
        :meth:`takes`, comes after) and epochs."""
        keep = np.ones(len(t), dtype=bool)
        if self.since is not None:
            keep &= t >= self.since
        if self.until is not None:
            keep &= t <= self.until
        if self.epoch_range is not None and epoch is not None:
            keep &= _within(epoch, self.epoch_range)
        return keep


def _within(values: np.ndarray, r: range) -> np.ndarray:
    """``value in r`` for each integer of ``values``, vectorised (never the range's list:
    range(0, 2**62, 2), every even epoch, is 2**61 of them)."""
    r = r if r.step > 0 else r[::-1]
    inside = (values >= r.start) & (values < r.stop)
    if r.step == 1 or not inside.any():
        return inside
    low = int(values[inside].min())
    first = r.start + -(-(low - r.start) // r.step) * r.step  # the range's first number from low on
    if r.step >= 2**64:  # (one of its numbers at most is an int64)
        return inside & (values == first) if first < 2**63 else np.zeros_like(inside)
    # Offsets from low in uint64: exact for every value inside (their spread may pass int64's).
    offsets = values.astype(np.int64).view(np.uint64) - np.uint64(low % 2**64)
    return inside & (offsets % np.uint64(r.step) == (first - low) % r.step)


class _Reader:
    def __init__(self, selection: _Selection):
        self.want = selection
        self.small: list[dict] = []  # run, epoch, end and unknown records, in file order
        self.segment = 0  # run records so far
        self.skipped = 0
        self.batches = TableBuilder()
        self.batch_segments: list[tuple[int, int]] = []  # (rows, segment) per added piece
        self.system = TableBuilder()
        self._pending_batches: list[dict] = []
        self._pending_system: list[dict] = []
        # Parts of _pending_batches parsed by scan.loads_wide: (where they begin, their lines).
        self._wide: list[tuple[int, list[bytes]]] = []

    # -- one record at a time (the general path) -----------------------------------------

    def route(self, record, line: bytes) -> None:
        """Keep one decoded line as read_history's full parse does (None: not JSON)."""
        if type(record) is not dict or not well_formed(record):
            if line.strip():
                self.skipped += 1
            return
        kind = record["type"]
        if kind == "batch":
            if self.want.batches and (not self.want.ranged or self.want.takes(record)):
                self._pending_batches.append(record)
        elif kind == "system":
            if self.want.system and (not self.want.ranged or self.want.takes(record)):
                self._pending_system.append(record)
        else:
            self._flush()
            if kind == "run":
                self.segment += 1
            elif kind == "epoch" and self.want.ranged and not self.want.takes(record):
                return
            self.small.append(record)

    def _flush(self) -> None:
        if self._pending_batches:
            records, wide = self._pending_batches, self._wide
            self._pending_batches, self._wide = [], []
            if not wide:
                self._add_batches(records)
            elif self.batches.add(records, accept=_batch_kinds_ok, check=lambda c: _narrow(c) and _finite_times(c)):
                self.batch_segments.append((len(records), self.segment))
            else:  # a wide integer may have been read as a float, or well_formed refuses one
                self._add_batches(self._exactly(records, wide))
        if self._pending_system:
            self.system.add(self._pending_system)
            self._pending_system = []

    def extend(self, other: _Reader) -> None:
        """Take on what ``other`` read from the part of the file that follows this one's."""
        self._flush()
        other._flush()
        self.small += other.small
        self.batch_segments += [(n, segment + self.segment) for n, segment in other.batch_segments]
        self.segment += other.segment
        self.skipped += other.skipped
        self.batches.extend(other.batches)
        self.system.extend(other.system)

    def _exactly(self, records: list[dict], wide: list[tuple[int, list[bytes]]]) -> list[dict]:
        """``records`` with the parts that scan.loads_wide parsed parsed again by scan.loads."""
        out, at = [], 0
        for start, lines in wide:
            out += records[at:start]
            for line, record in zip(lines, scan.loads_many(lines), strict=True):
                if type(record) is dict:  # a batch record: orjson read it as one
                    out.append(record)
                else:  # pragma: no cover - json refuses what orjson read (nesting beyond its depth)
                    self.skipped += bool(line.strip())
            at = start + len(lines)
        return out + records[at:]

    def _add_batches(self, records: list[dict]) -> None:
        if not self.batches.add(records, accept=_batch_kinds_ok, check=_finite_times):  # one well_formed refuses
            kept = [r for r in records if well_formed(r)]
            self.skipped += len(records) - len(kept)
            self.batches.add(kept)
            records = kept
        self.batch_segments.append((len(records), self.segment))

    def lines(self, lines: list[bytes]) -> None:
        for line, record in zip(lines, scan.loads_many(lines), strict=True):
            self.route(record, line)

    # -- a block ---------------------------------------------------------------------------

    def block(self, block: scan.Block) -> None:
        data = block.data
        if block.final:
            self.lines([data[: block.end]])
            return
        others = block.others()
        skipping = not self.want.batches or self.want.ranged
        if (skipping or not self.want.system) and not block.clean(others):
            self.lines([data[a:b] for a, b in block.lines()])  # parsed whole: nothing is skipped unseen
            self._flush()
            return
        runs = block.batch_runs(others)
        rows = self._columns(data, runs, others) if self.want.batches and not self.want.ranged else None
        at = 0
        for start, end in [*others, (block.end + 1, None)]:
            while at < len(runs) and runs[at][0] < start:
                if rows is None:
                    self.batch_run(data[runs[at][0]:runs[at][1]])
                else:  # parsed already: which segment its rows belong to
                    self.batch_segments.append((rows[at], self.segment))
                at += 1
            if end is None:
                break
            line = data[start:end]
            if not self.want.system and scan.is_sample(line):
                continue  # a system record (or not a record at all: no other type key can hide in it)
            self.route(scan.decode(line), line)
        self._flush()  # a block's records go into the tables together

    def _columns(self, data: bytes, runs: list[tuple[int, int]], others: list[tuple[int, int]]) -> list[int] | None:
        """The block's batch lines (``runs`` of them) parsed at once as columns
        (:mod:`pipetrain.columnar`) and added to the batch table after the batch records
        before them; the number of lines of each run (None: not parsed, they are to be
        parsed run by run). The caller says which segment they belong to."""
        if not runs or any(b'"batch"' in data[a:b] and _is_batch(scan.decode(data[a:b])) for a, b in others):
            return None  # (a batch record among the others: kept in file order by the path line by line)
        lines = data[runs[0][0]:runs[0][1]] if len(runs) == 1 else b"".join(data[a:b] for a, b in runs)
        parsed = columnar.parse(lines)
        if parsed is None or parsed[0].record["type"] != "batch" or not well_formed(parsed[0].record):
            return None
        template, ends, columns = parsed
        self._flush()  # the batch records before these first
        self.batches.add_columns(template.keys, len(ends), columns)
        run_ends = np.cumsum([b - a for a, b in runs])  # in ``lines``
        return np.diff(np.searchsorted(ends, run_ends), prepend=0).tolist()

    def batch_run(self, data: bytes) -> None:
        """Consecutive lines that begin as batch lines."""
        if not self.want.batches:
            return
        lines = data.split(b"\n")
        lines.pop()
        if self.want.ranged:
            lines = self._in_range(data, lines)
            if not lines:
                return
        if not self.want.ranged and len(lines) >= _COLUMNS_LEAST:  # (the block's were not all the writer's)
            rows = self._columns(data, [(0, len(data))], [])
            if rows is not None:
                self.batch_segments.append((rows[0], self.segment))
                return
        if not self.want.ranged:
            records = scan.loads_wide(lines, data)
            if records is not None and self._all_batches(records):
                self._wide.append((len(self._pending_batches), lines))
                self._pending_batches.extend(records)
                return
        records = scan.loads_many(lines, data if not self.want.ranged else None)
        if not self.want.ranged and self._all_batches(records):
            self._pending_batches.extend(records)
        else:  # record by record: well_formed, then the range
            for line, record in zip(lines, records, strict=True):
                self.route(record, line)

    def _in_range(self, data: bytes, lines: list[bytes]) -> list[bytes]:
        """The lines of a run of batch lines that may be in the asked range, found from
        each line's time and epoch where the writer put them, without parsing the rest."""
        heads = _BATCH_HEAD.findall(data)
        n = len(lines)
        if len(heads) != n or data.count(b'"t"') != n or data.count(b'"epoch"') != n:
            return lines  # written otherwise: parsed whole, then selected
        t = np.array([float(h[0]) for h in heads], dtype=np.float64)
        epoch = None
        if self.want.epoch_range is not None:
            epoch = np.array([0 if h[1] == b"null" else int(h[1]) for h in heads], dtype=np.int64)
        keep = self.want.mask(t, epoch)
        return lines if keep.all() else [line for line, k in zip(lines, keep.tolist(), strict=True) if k]

    @staticmethod
    def _all_batches(records: list) -> bool:
        """Every record a dict of type batch (well_formed's other checks are made on the
        columns, :func:`_batch_kinds_ok`)."""
        if set(map(type, records)) != {dict}:
            return False
        try:
            return set(map(_type_of, records)) == {"batch"}
        except KeyError:
            return False

    # -- the end -------------------------------------------------------------------------------

    def history(self) -> History:
        self._flush()
        history = History(skipped=self.skipped)
        for record in self.small:
            history.add(record)
        history.batches = self._batch_table([r for r in self.small if r["type"] == "run"])
        history.system = self.system.build()
        if not self.want.epochs_table:
            history.epochs = []
        return history

    def _batch_table(self, runs: list[dict]) -> Table:
        """The batch records that no later segment trained again. Only the segments that a
        later run record resumes can lose any, and their rows come first."""
        after: list[tuple[int, int] | None] = [None] * (len(runs) + 1)  # the earliest position a run
        for i in range(len(runs) - 1, -1, -1):  # record after segment s resumes at (None: none does)
            at, later = resume_point(runs[i]), after[i + 1]
            after[i] = later if at is None else at if later is None else min(at, later)
        pieces = list(takewhile(lambda piece: after[piece[1]] is not None, self.batch_segments))
        if not pieces:
            return self.batches.build()
        rows = sum(n for n, _ in pieces)
        segments = np.repeat(np.array([s for _, s in pieces], dtype=np.int64), [n for n, _ in pieces])
        # Positions beyond 64 bits (a hand-edited history) are compared as Python's integers.
        epoch, batch = self.batches.ints("epoch", rows, exact=True), self.batches.ints("batch", rows, exact=True)
        points = [at or (0, 0) for at in after]
        wide = any(_clip(at) != at for at in points)
        limit = np.array(points, dtype=object if wide else np.int64)[segments]
        superseded = (epoch > limit[:, 0]) | ((epoch == limit[:, 0]) & (batch >= limit[:, 1]))
        if not superseded.any():
            return self.batches.build()
        keep = np.ones(self.batches.rows, dtype=bool)
        keep[:rows] = ~superseded
        return self.batches.build(keep=keep)


def _is_batch(record) -> bool:
    return type(record) is dict and record.get("type") == "batch"


def _batch_kinds_ok(kinds: dict[str, set]) -> bool:
    """well_formed's rules for batch records, on the types of a shape's values."""
    return ("t" in kinds and kinds["t"] <= _NUMBER_TYPES and kinds.get("epoch", set()) <= _POSITION_TYPES
            and kinds.get("batch", set()) <= _POSITION_TYPES and kinds["type"] == {str})


def _finite_times(columns: dict) -> bool:
    """well_formed's rule that a time is finite, on a shape's columns (json reads the
    ``1e400`` and ``NaN`` that orjson refuses)."""
    t = columns["t"]
    if t.kind == "f":
        return bool(np.isfinite(t.values).all())
    return t.kind != "o" or all(type(v) is not float or math.isfinite(v) for v in t.values)


def _narrow(columns: dict) -> bool:
    """Whether columns parsed by scan.loads_wide are what json gives: no float of
    magnitude 2**63 or more (an integer beyond 64 bits, which orjson reads as a float)
    and no column of mixed values (where one could hide)."""
    for column in columns.values():
        if column.kind == "o" or (column.kind == "f" and bool((np.abs(column.values) >= _WIDE).any())):
            return False
    return True


def _clip(at: tuple[int, int]) -> tuple[int, int]:
    low, high = np.iinfo(np.int64).min, np.iinfo(np.int64).max
    return tuple(min(max(v, low), high) for v in at)


def read_history(
    path: str | os.PathLike,
    *,
    tables: Iterable[str] = TABLES,
    epochs: int | range | None = None,
    since: float | None = None,
    until: float | None = None,
) -> History:
    """Read a history file (or a run folder's) as one continuous :class:`History`.

    ``.batches`` and ``.system`` are :class:`~pipetrain.table.Table` s: sequences of the
    records' dicts, held as columns (``h.batches.array("loss")`` is a float64 array).
    A torn last line (a run killed mid-write, or a line still being written) and any
    other line that is not a well-formed record are skipped and counted in ``skipped``.

    Asking for less reads less: ``tables=("epochs",)`` leaves the batch and system
    lines unparsed (``.batches`` and ``.system`` come back empty, and ``skipped`` counts
    only the lines read); ``epochs=range(10, 20)`` keeps the batch and epoch records of
    those epochs; ``since``/``until`` (Unix seconds, until excluded) keep the batch,
    epoch and system records of that time (a batch line outside them is not parsed, so
    ``skipped`` does not count it if it is broken). Run records and the end record always come.

    Example::

        h = read_history("runs/exp1", tables=("epochs",))
        [e["val_loss"] for e in h.epochs]
    """
    selection = _Selection(tables, epochs, since, until)
    path = history_file(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such history file") from None
    collecting = gc.isenabled()
    gc.disable()  # millions of new dicts, none in a cycle: collections would find nothing
    try:
        size = os.fstat(fd).st_size
        if not selection.batches:  # all it wants is in the lines the index lists, if it is valid
            reader = _Reader(selection)
            known = index.read(fd, index.path_for(path), samples=selection.system)  # (samples: only if asked)
            if known.lines:
                reader.block(scan.Block(0, b"\n".join(line for _, line in known.lines) + b"\n"))
            for block in scan.blocks(fd, known.covered, size):
                reader.block(block)
            return reader.history()
        return _read_parts(fd, selection, size).history()
    finally:
        os.close(fd)
        if collecting:
            gc.enable()


# -- a long history parsed by several processes ---------------------------------------------
#
# Parsing is CPU work in one thread (orjson holds the GIL), so a long history is cut into
# parts at line ends, one per CPU: this process parses the first while helper processes
# parse the others (given the open file itself, so all read the same file), and their
# readers are joined in file order - run records counted on, segments renumbered - which
# is what one reader going through the whole file would hold. A helper is forked where
# that is safe (pipetrain.forked: no other thread runs here), else a new Python is
# started. A helper that cannot start or fails leaves its part to this process: the
# result is the same, only slower.

PART_BYTES = 32 << 20  # the least a started helper process is made for (it costs about 0.3 s)
FORKED_PART_BYTES = 8 << 20  # the least a forked one is made for (it costs milliseconds)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def _parts(fd: int, size: int, least: int) -> list[tuple[int, int]]:
    """Byte ranges (``least`` bytes or more), equal, that begin and end at line ends.
    (This process's part, the first, was made smaller for it joins the others' answers at
    the end: 0.8 of a share read 2M records in 4.8-5.1 s, equal shares in 3.5-4.0 s.)"""
    n = max(1, min(_cpus(), size // least))
    cuts = [0]
    for i in range(1, n):
        at = scan.line_end(fd, size * i // n)
        if cuts[-1] < at < size:
            cuts.append(at)
    cuts.append(size)
    return list(zip(cuts, cuts[1:], strict=False))


def _read(fd: int, selection: _Selection, start: int, stop: int) -> _Reader:
    reader = _Reader(selection)
    for block in scan.blocks(fd, start, stop, min(scan.BLOCK_BYTES, READ_BLOCK_BYTES)):
        reader.block(block)
    reader._flush()
    return reader


def _read_parts(fd: int, selection: _Selection, size: int) -> _Reader:
    fork = size >= 2 * FORKED_PART_BYTES and _cpus() > 1 and forked.safe()
    parts = _parts(fd, size, FORKED_PART_BYTES if fork else PART_BYTES)
    if fork:
        helpers = [forked.Child(partial(_read, fd, selection, start, stop)) for start, stop in parts[1:]]
    else:
        helpers = [_Helper(fd, selection, start, stop) for start, stop in parts[1:]]
    try:
        reader = _read(fd, selection, *parts[0])
        for helper, (start, stop) in zip(helpers, parts[1:], strict=True):
            part = helper.result()
            reader.extend(part if part is not None else _read(fd, selection, start, stop))
        return reader
    finally:
        for helper in helpers:
            helper.close()


class _Helper:
    """A process parsing one part of a history: it gets the open file, the part and the
    selection on its standard input and answers with its reader, pickled."""

    def __init__(self, fd: int, selection: _Selection, start: int, stop: int):
        root = str(Path(__file__).resolve().parent.parent)  # this very pipetrain, wherever it is
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", "from pipetrain.reading import _serve; _serve()"], env=env,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, pass_fds=(fd,))
            self.process.stdin.write(pickle.dumps((fd, selection, start, stop)))
            self.process.stdin.close()
        except (OSError, ValueError):  # no process to be had (limits, no executable): parsed here
            self.close()
            self.process = None

    def result(self) -> _Reader | None:
        if self.process is None:
            return None
        try:
            data = self.process.stdout.read()
            return pickle.loads(data) if self.process.wait() == 0 else None
        except Exception:  # a helper that died (out of memory, killed): its part is parsed here
            return None

    def close(self) -> None:
        process, self.process = getattr(self, "process", None), None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        if process is not None:
            process.stdout.close()


def _serve() -> None:
    """A helper process's work (see :class:`_Helper`)."""
    gc.disable()
    fd, selection, start, stop = pickle.load(sys.stdin.buffer)
    reader = _read(fd, selection, start, stop)
    pickle.dump(reader, sys.stdout.buffer, protocol=pickle.HIGHEST_PROTOCOL)
    sys.stdout.buffer.flush()


def last_look(fd: int, stop: int, index_path: os.PathLike | None = None) -> tuple[list[tuple[int, dict]], int]:
    """What a state fed every record up to ``stop`` (an offset just after a newline)
    knows, found without parsing every batch line: the records other than batches and
    system samples, the system samples that decide the state, and the batches that still
    count at the end - the last one, and the run of batches of its epoch after the last
    run record (an epoch's figures so far). Returns them as (offset, record) in file
    order, with the number of lines that are not records when none is (0 otherwise), so
    a caller can refuse a file that is not a history.

    The samples that decide the state (:class:`~pipetrain.progress.RunState`): of the
    latest segment (since the last run record: the processes running now) its first
    sample shown, its latest and the latest of each of its processes; and the peak RSS
    over all, which a sample says itself (``peak_rss_mb``: its process's peak so far).
    The index leaves unread only samples whose peak covers the ones before them in their
    segment (:mod:`pipetrain.index`), so of each earlier segment the last of those is
    read, and of the last segment, from its end, as many as it takes to meet each of its
    processes (its run record's ``distributed.processes``), then its first shown. Any
    other sample (an older pipetrain's, without its peak; one edited by hand) is among
    the lines the index lists to be read.

    With the history's index (``index_path``, when valid) the lines it lists are all that
    is read before what it covers, and of the system samples only those: what it costs
    does not grow with the file. Without one, every line but the batches is parsed."""
    known = index.read(fd, index_path, stop, samples=False)
    while True:
        look = _Look(fd, stop, known)
        try:
            look.samples()
            return look.result()
        except _Moved:  # a sample line the index lists did not check out: ``known`` now ends before it
            continue


class _Moved(Exception):
    pass


class _Look:
    """One :func:`last_look`: the lines the index lists (but its samples), the lines
    after what it covers, then the samples and batches that decide the state."""

    def __init__(self, fd: int, stop: int, known: index.Known):
        self.fd, self.stop, self.known = fd, stop, known
        self.others: list[tuple[int, dict]] = []  # records other than batches, in file order
        self.read: list[tuple[int, dict]] = []  # records of the samples read from the index
        self._cache: dict[int, dict | None] = {}  # the index's samples read: their records
        self.not_records = 0
        self.scanned_runs: list[tuple[int, int]] = []  # runs of batch-looking lines after ``covered``
        lines = known.lines
        for (at, line), record in zip(lines, scan.loads_many([line for _, line in lines]), strict=True):
            self.take(at, line, record)
        for block in scan.blocks(fd, known.covered, stop):
            spans = block.others()
            clean = block.clean(spans)
            for start, end in block.batch_runs(spans):
                self.scanned_runs.append((block.offset + start, block.offset + end))
            for start, end in spans if clean else block.lines():  # unclean: a batch-looking line may be another record
                line = block.data[start:end]
                self.take(block.offset + start, line, scan.decode(line))

    def take(self, at: int, line: bytes, record, into: list | None = None) -> None:
        if type(record) is dict and well_formed(record):
            if record["type"] != "batch":
                (self.others if into is None else into).append((at, record))
        elif line.strip() and not line.startswith(scan.BATCH_PREFIX):
            self.not_records += 1

    # -- the samples ------------------------------------------------------------------------

    def samples(self) -> None:
        """Read the samples the index lists unread that decide the state (see last_look)."""
        offsets = self.known.samples
        if not len(offsets):
            return
        runs = [(at, r) for at, r in self.others if r["type"] == "run"]
        parsed = [(at, r) for at, r in self.others if r["type"] == "system"]
        parsed_at = [at for at, _ in parsed]
        ends = [at for at, r in self.others if r["type"] == "end"]
        edges = [-1, *(at for at, _ in runs), self.stop]
        for segment in range(len(edges) - 1):
            lo, hi = edges[segment], edges[segment + 1]
            a, b = int(np.searchsorted(offsets, lo, "right")), int(np.searchsorted(offsets, hi, "left"))
            if a == b:
                continue  # none of its samples is left unread
            for at in ends:  # (samples after an end in its segment, edited in: the end says the peak before it)
                k = int(np.searchsorted(offsets, at, "left"))
                if lo < at < hi and a < k < b:
                    self._peak(a, k)
            if segment < len(edges) - 2:
                self._peak(a, b)
            else:
                mine = parsed[bisect.bisect_right(parsed_at, lo):]
                self._latest(a, b, mine, processes_of(runs[-1][1]) if runs else 0)

    def _peak(self, a: int, b: int) -> None:
        """An earlier segment's samples ``a:b`` (unread): what counts of them is their
        peak, which the last one shown says (the writer marked them so); all of them
        if it does not."""
        walk = self._walk(a, b, [])
        for record, _ in walk:
            if is_shown(record):
                if not is_number(record.get("peak_rss_mb")):
                    break
                return
        for _ in walk:
            pass

    def _latest(self, a: int, b: int, parsed: list[tuple[int, dict]], processes: int) -> None:
        """The last segment's samples: ``parsed`` already, the index's ``a:b`` unread. Its
        latest sample shown, the latest of each of its ``processes``, the peak (the last
        unread one shown says it) and its first sample shown with an RSS."""
        walk = self._walk(a, b, parsed)
        need = set(range(processes)) if processes <= b - a + len(parsed) else None  # None: cannot be met
        latest = peak = None
        if need is not None:
            for record, unread in walk:
                process = record.get("process")
                if isinstance(process, int):
                    need.discard(int(process))
                if is_shown(record):
                    latest = latest or record
                    peak = peak or (record if unread else None)
                if latest is not None and peak is not None and not need:
                    break
            else:
                return  # all of them read
        if need is None or not is_number(peak.get("peak_rss_mb")):
            for _ in walk:  # all of them: the peak is that of every sample
                pass
            return
        for record, _ in self._walk(a, b, parsed, latest_first=False):
            if is_shown(record) and is_number(record.get("rss_mb")):
                break

    def _sample(self, k: int) -> dict | None:
        """The record of the index's unread sample ``k`` (None: not a record), read once."""
        if k not in self._cache:
            line = self.known.sample(k)
            if line is None:
                raise _Moved
            records: list = []
            self.take(int(self.known.samples[k]), line, scan.decode(line), records)
            self._cache[k] = records[0][1] if records else None
            self.read += records
        return self._cache[k]

    def _walk(self, a: int, b: int, parsed: list[tuple[int, dict]], latest_first: bool = True):
        """(record, whether it was unread) of the segment's samples, latest first (or in
        file order): ``parsed``, and the index's unread ``a:b``, each read as it comes."""
        offsets = self.known.samples
        order = range(b - 1, a - 1, -1) if latest_first else range(a, b)
        unread = ((int(offsets[k]), k) for k in order)  # (lazy: a walk stops when it has what it needs)
        known = reversed(parsed) if latest_first else iter(parsed)
        for _, item in heapq.merge(unread, known, key=itemgetter(0), reverse=latest_first):
            record, was_unread = (self._sample(item), True) if type(item) is int else (item, False)
            if record is not None and record["type"] == "system":
                yield record, was_unread

    # -- the batches ------------------------------------------------------------------------

    def _batch_runs(self) -> Iterator[tuple[int, int]]:
        """File offsets of the runs of batch-looking lines, latest first: after what the
        index covers (the scan's), then between the lines it lists (a batch-looking line
        listed is one of a run too)."""
        known = self.known
        listed = [(at, at + len(line)) for at, line in known.lines if not line.startswith(scan.BATCH_PREFIX)]
        starts = np.concatenate([np.array([a for a, _ in listed], dtype=np.int64), known.samples])
        ends = np.concatenate([np.array([e for _, e in listed], dtype=np.int64), known.samples + known.sample_lengths])
        order = np.argsort(starts, kind="stable")
        run_starts = np.concatenate([[0], ends[order] + 1])
        run_ends = np.concatenate([starts[order], [known.covered]])
        keep = run_ends > run_starts
        yield from reversed(self.scanned_runs)
        for start, end in zip(reversed(run_starts[keep].tolist()), reversed(run_ends[keep].tolist()), strict=True):
            yield start, end

    def _distrust(self) -> None:
        """A run of batch lines between the index's unread samples does not lie between
        line ends: a sample before it is not where the index says. The first unread
        sample that does not check out shortens ``known`` to the entries before it; if
        none is found, the index is not used."""
        for k in range(len(self.known.samples)):
            if self.known.sample(k) is None:
                return
        self.known.become(index.Known())

    def result(self) -> tuple[list[tuple[int, dict]], int]:
        others = self.others + self.read
        last_run = max((at for at, r in others if r["type"] == "run"), default=-1)
        batches: list[tuple[int, dict]] = []
        epoch = None
        for start, end in self._batch_runs():
            before = 1 if start else 0  # (the byte before: a newline, where the index is right)
            data = os.pread(self.fd, end - start + before, start - before)
            if data[:before] != b"\n"[:before] or data[-1:] != b"\n":
                self._distrust()  # an unread sample moved (bytes cut before it and added after)
                raise _Moved
            data = data[before:]
            lines = data.split(b"\n")
            lines.pop()
            offsets = np.cumsum([0] + [len(line) + 1 for line in lines[:-1]]) + start
            for at, line, record in zip(reversed(offsets.tolist()), reversed(lines), reversed(scan.loads_many(lines)),
                                        strict=True):
                if type(record) is not dict or not well_formed(record) or record["type"] != "batch":
                    self.not_records += bool(line.strip()) and (type(record) is not dict or not well_formed(record))
                    continue
                this = int(record.get("epoch") or 0)
                if epoch is None:
                    epoch = this
                elif at < last_run or this != epoch:
                    return _in_order(others, batches), 0
                batches.append((at, record))
                if at < last_run:
                    return _in_order(others, batches), 0
        return _in_order(others, batches), self.not_records if not others and not batches else 0


def _in_order(others: list, batches: list) -> list[tuple[int, dict]]:
    return sorted(others + batches, key=itemgetter(0))
